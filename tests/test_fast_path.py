"""The training path of the frozen-outer methods: exact against the reference formula, lean in what it saves."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch import nn

import nora
from nora.accel import adapter_checkpoint_policy, compile_model, enable_adapter_checkpointing, enable_fused_kernels
from nora.basis import SVDRequest, compute_factors
from nora.chain import terms_apply
from nora.svd import BASIS_CACHE, SVDSettings, truncated_svd

K, D, ROWS = 64, 48, 200  # input width, output width, tokens: an input-sized tensor has ROWS*K elements

FROZEN_OUTER = {
    "nora": lambda: nora.NoraConfig(r=16, inner_r=4, target_modules=["0"], svd_dtype="float64"),
    "nora-out": lambda: nora.NoraConfig(r=16, inner_r=4, inner="out", target_modules=["0"], svd_dtype="float64"),
    "lora-xs": lambda: nora.LoraXSConfig(r=8, target_modules=["0"], svd_dtype="float64"),
    "svfit": lambda: nora.SVFitConfig(r=8, target_modules=["0"], svd_dtype="float64"),
}


def _model(config):
    torch.manual_seed(0)
    model = nora.get_peft_model(nn.Sequential(nn.Linear(K, D)).double(), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.parametrize("method", list(FROZEN_OUTER))
def test_fast_path_outputs_and_gradients_equal_the_reference(method):
    model = _model(FROZEN_OUTER[method]())
    layer = model.layers()["0"]
    core = layer.adapters["default"]
    x = torch.randn(4, ROWS // 4, K, dtype=torch.float64, requires_grad=True)

    fast = model(x)
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad(fast, [x, *core.parameters()], g)

    ref = layer.base_layer(x) + terms_apply(core.method.terms(core, layer.basis_of(core)), x)
    grads_ref = torch.autograd.grad(ref, [x, *core.parameters()], g)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_fast, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _saved_numels(model, x) -> list[int]:
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sizes


@pytest.mark.parametrize("method", list(FROZEN_OUTER))
def test_frozen_outer_keeps_nothing_of_the_input_size_for_backward(method):
    model = _model(FROZEN_OUTER[method]())
    x = torch.randn(ROWS, K, dtype=torch.float64, requires_grad=True)
    sizes = _saved_numels(model, x)
    assert sizes, "something must be saved for the core's gradient"
    assert max(sizes) < x.numel() // 2, sizes  # only r-wide activations (ROWS × 16) and weights (D × K)
    assert ROWS * K not in sizes and ROWS * D not in sizes


def test_lora_does_keep_the_input_for_backward():
    """The contrast that makes the test above meaningful: LoRA's trainable A needs x for dA."""
    model = _model(nora.LoraConfig(r=8, target_modules=["0"]))
    x = torch.randn(ROWS, K, dtype=torch.float64, requires_grad=True)
    assert ROWS * K in _saved_numels(model, x)


def test_batched_svd_equals_one_at_a_time():
    g = torch.Generator().manual_seed(0)
    Ws = [torch.randn(40, 30, generator=g) for _ in range(5)]
    settings = SVDSettings("randomized", niter=3, seed=2)
    requests = [SVDRequest(f"k{i}", W, 6, None, f"w{i}") for i, W in enumerate(Ws)]
    BASIS_CACHE.clear()
    batched = compute_factors(requests, settings)
    for i, W in enumerate(Ws):
        U, S, Vh = truncated_svd(W, 6, settings)
        torch.testing.assert_close(batched[f"k{i}"]["U"], U, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batched[f"k{i}"]["S"], S, rtol=1e-5, atol=1e-6)
    assert BASIS_CACHE.misses == 5
    again = compute_factors(requests, settings)
    assert BASIS_CACHE.hits == 5 and all(torch.equal(again[k]["U"], batched[k]["U"]) for k in batched)


def test_checkpoint_policy_keeps_only_narrow_matmuls():
    policy = adapter_checkpoint_policy(16)
    mm = torch.ops.aten.mm.default
    addmm = torch.ops.aten.addmm.default
    narrow, wide = torch.empty(64, 16), torch.empty(64, 256)
    assert policy(None, mm, torch.empty(100, 64), narrow).name == "MUST_SAVE"
    assert policy(None, mm, torch.empty(4, 16), torch.empty(16, 100)).name == "MUST_SAVE"  # a core on xᵀ: r' × tokens
    assert policy(None, mm, torch.empty(100, 64), wide).name == "PREFER_RECOMPUTE"
    assert policy(None, addmm, torch.empty(256), torch.empty(100, 64), wide).name == "PREFER_RECOMPUTE"
    assert policy(None, torch.ops.aten.silu.default, narrow).name == "PREFER_RECOMPUTE"


def test_adapter_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = nora.get_peft_model(tiny_llama(hidden_size=64, intermediate_size=96), nora.NoraConfig(r=8, inner_r=2))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05)
        if checkpointing:
            enable_adapter_checkpointing(model)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_accelerations_fall_back_cleanly_without_a_gpu():
    model = nora.get_peft_model(tiny_llama(), nora.NoraConfig(r=8, inner_r=2))
    ids = torch.randint(0, 64, (1, 5))
    before = model(input_ids=ids).logits
    report = enable_fused_kernels(model)
    if not torch.cuda.is_available():
        assert report["liger"].startswith("off (")
    torch.testing.assert_close(model(input_ids=ids).logits, before)
    compiled, status = compile_model(model)
    assert status == "on" or status.startswith("off (")
