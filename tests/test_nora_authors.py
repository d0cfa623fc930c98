"""NoRA as the authors' released code does it (METHODS.md, "NoRA as the authors' released code does it"): the
core R_A diag(λ) R_B between B_o = U_r Σ_r and A_o = V_rᵀ, orthogonal init with λ = 0.1, scale alpha/√r. Checked
against a float64 reference written from METHODS.md: forward, merge, export; then files and mixed batches."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_float_close, model_input, ref_svd, tiny_llama
from safetensors.torch import load_file
from torch import nn

import nora
from nora.errors import AdapterError


def _layer_model(d: int = 20, k: int = 24, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(k, d, dtype=torch.float64))


def test_the_preset_is_the_released_code_form():
    c = nora.NoraConfig.authors()
    assert (c.inner_core, c.inner_init, c.lambda_init, c.use_rslora, c.placement) == (
        "diag", "orthogonal", 0.1, True, "out"
    )  # fmt: skip
    assert (c.svd, c.niter, c.seed, c.r, c.inner_r, c.alpha, c.dropout) == ("randomized", 10, 42, 0.8, 7, 1.0, 0.25)
    assert nora.NoraConfig().inner_init == "kaiming"  # nora's own form keeps its defaults
    with pytest.raises(AdapterError, match="orthogonal"):
        nora.NoraConfig(inner_core="diag", inner_init="kaiming")
    with pytest.raises(AdapterError, match="inner_core"):
        nora.NoraConfig(inner_core="triple")


@torch.no_grad()
def test_forward_merge_and_export_match_a_float64_reference(tmp_path):
    r, k_inner, alpha = 12, 3, 2.0
    model = nora.get_peft_model(
        _layer_model(),
        nora.NoraConfig.authors(r=r, inner_r=k_inner, alpha=alpha, dropout=0.0, svd="exact", svd_dtype="float64"),
    ).eval()
    layer = model.layers()["0"]
    core = layer.adapters["default"]
    RA, lam, RB = (core[n].numpy() for n in ("inner_RA", "inner_lambda", "inner_RB"))
    # the init: orthonormal columns of R_A and rows of R_B, λ = 0.1, so ΔW ≠ 0 from the start
    np.testing.assert_allclose(RA.T @ RA, np.eye(k_inner), atol=1e-12)
    np.testing.assert_allclose(RB @ RB.T, np.eye(k_inner), atol=1e-12)
    assert np.all(lam == 0.1)
    for p in core.params.values():  # as after training
        p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype))
    RA, lam, RB = (core[n].numpy() for n in ("inner_RA", "inner_lambda", "inner_RB"))
    W = layer.base_layer.weight.numpy().copy()
    b = layer.base_layer.bias.numpy().copy()
    U, S, Vt = ref_svd(W, r)
    dW = alpha / math.sqrt(r) * (U * S) @ RA @ np.diag(lam) @ RB @ Vt  # s · B_o · R_A diag(λ) R_B · A_o
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = x.numpy() @ (W + dW).T + b
    np.testing.assert_allclose(model(x).numpy(), want, rtol=0, atol=1e-10)
    np.testing.assert_allclose(layer.delta_weight("default").numpy(), dW, rtol=0, atol=1e-12)
    model.merge()
    np.testing.assert_allclose(layer.base_layer.weight.numpy(), W + dW, rtol=0, atol=1e-12)
    model.unmerge()
    np.testing.assert_allclose(layer.base_layer.weight.numpy(), W, rtol=0, atol=1e-12)
    model.export_lora(tmp_path / "peft")
    t = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    B, A = t["base_model.model.0.lora_B.weight"].double(), t["base_model.model.0.lora_A.weight"].double()
    assert A.shape[0] == k_inner  # cut at the narrowest inner width
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    np.testing.assert_allclose(cfg["lora_alpha"] / cfg["r"] * (B @ A).numpy(), dW, rtol=0, atol=1e-6)


@torch.no_grad()
def test_lambda_zero_is_an_identity_at_init():
    base = _layer_model()
    x = torch.randn(3, 24, dtype=torch.float64)
    want = base(x)
    model = nora.get_peft_model(base, nora.NoraConfig.authors(r=8, inner_r=2, lambda_init=0.0, dropout=0.0))
    assert torch.equal(model(x), want)


@torch.no_grad()
def test_saves_loads_and_mixes_with_other_adapters(tmp_path):
    inputs = model_input("llama")
    outputs = {}
    for i, config in enumerate([nora.NoraConfig.authors(r=8, inner_r=2), nora.NoraConfig.authors(r=8, inner_r=2)]):
        model = nora.get_peft_model(tiny_llama(), config)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        model.eval().save_pretrained(tmp_path / f"a{i}")
        outputs[f"a{i}"] = model(**inputs).logits
    with torch.no_grad():
        base = tiny_llama()(**inputs).logits
    loaded = nora.AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "a0", "a0")
    assert torch.equal(loaded(**inputs).logits, outputs["a0"])
    loaded.load_adapter(tmp_path / "a1", "a1")
    assert loaded.resident_bank("a1") is not None
    rows = ["a0", "a1", nora.BASE]
    batch = {k: v[:1].repeat(3, 1) for k, v in inputs.items()}
    mixed = loaded(**batch, adapter_names=rows).logits
    for i, want in enumerate([outputs["a0"][:1], outputs["a1"][:1], base[:1]]):
        assert_float_close(mixed[i : i + 1], want)
