"""Each method's forward against an independent float64 implementation of its METHODS.md formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ref_place, ref_svd
from torch import nn

import nora

D, K = 12, 10


def _linear() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(K, D)).double()


def _perturb(model) -> dict[str, np.ndarray]:
    """Move every trainable tensor off its init so the reference is not trivially W0 x."""
    g = torch.Generator().manual_seed(3)
    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
                out[name.rsplit(".", 1)[-1]] = p.detach().numpy().copy()
    return out


def _run(config, **kw):
    base = _linear()
    W0, b = base[0].weight.detach().numpy().copy(), base[0].bias.detach().numpy().copy()
    model = nora.get_peft_model(base, config, **kw)
    p = _perturb(model)
    x = torch.randn(5, K, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, W0, b, p, x.numpy(), model(x).detach().numpy()


SVD64 = dict(svd_dtype="float64")


def test_lora():
    cfg = nora.LoraConfig(r=3, alpha=6, target_modules=["0"])
    _, W0, b, p, x, y = _run(cfg)
    s = 6 / 3
    np.testing.assert_allclose(y, x @ (W0 + s * p["lora_B"] @ p["lora_A"]).T + b, rtol=1e-10, atol=1e-12)


def test_lora_rslora_scale():
    cfg = nora.LoraConfig(r=4, alpha=6, use_rslora=True, target_modules=["0"])
    _, W0, b, p, x, y = _run(cfg)
    np.testing.assert_allclose(y, x @ (W0 + 6 / 2 * p["lora_B"] @ p["lora_A"]).T + b, rtol=1e-10, atol=1e-12)


def test_pissa():
    cfg = nora.PissaConfig(r=3, alpha=3, target_modules=["0"], **SVD64)
    _, W0, b, p, x, y = _run(cfg)
    B0, A0 = ref_place(*ref_svd(W0, 3), "sqrt")
    W_base = W0 - B0 @ A0
    np.testing.assert_allclose(y, x @ (W_base + p["lora_B"] @ p["lora_A"]).T + b, rtol=1e-9, atol=1e-10)


def test_dora():
    cfg = nora.DoraConfig(r=3, alpha=6, target_modules=["0"])
    _, W0, b, p, x, y = _run(cfg)
    V = W0 + 2 * p["lora_B"] @ p["lora_A"]
    W = p["magnitude"][:, None] * V / np.linalg.norm(V, axis=1, keepdims=True)
    np.testing.assert_allclose(y, x @ W.T + b, rtol=1e-10, atol=1e-12)


def test_dora_dropout_is_one_mask_on_the_adapter_path():
    base = _linear()
    W0, b = base[0].weight.detach().numpy().copy(), base[0].bias.detach().numpy().copy()
    model = nora.get_peft_model(base, nora.DoraConfig(r=3, alpha=6, dropout=0.5, target_modules=["0"])).train()
    p = _perturb(model)
    x = torch.randn(5, K, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    y = model(x).detach().numpy()
    torch.manual_seed(7)
    dropped = nn.functional.dropout(x, 0.5, True).numpy()  # the one mask the layer draws
    V = W0 + 2 * p["lora_B"] @ p["lora_A"]
    factor = p["magnitude"] / np.linalg.norm(V, axis=1)
    # PEFT's DoRA forward: the base output sees x; the rescaled base term and the LoRA path see dropout(x)
    lora = 2 * dropped @ (p["lora_B"] @ p["lora_A"]).T
    expected = x.numpy() @ W0.T + b + (factor - 1) * (dropped @ W0.T) + factor * lora
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-12)


def test_dora_training_forward_with_dropout_equals_peft():
    import copy

    import peft

    base = _linear()
    config = peft.LoraConfig(r=3, lora_alpha=6, use_dora=True, lora_dropout=0.5, target_modules=["0"])
    theirs = peft.get_peft_model(copy.deepcopy(base), config).train()
    ours = nora.get_peft_model(base, nora.DoraConfig(r=3, alpha=6, dropout=0.5, target_modules=["0"])).train()
    layer, core = theirs.base_model.model[0], ours.model[0].adapters["default"]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(generator=torch.Generator().manual_seed(2))
        core["lora_A"].copy_(layer.lora_A["default"].weight)
        core["lora_B"].copy_(layer.lora_B["default"].weight)
        core["magnitude"].copy_(layer.lora_magnitude_vector["default"].weight)
    x = torch.randn(5, K, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    expected = theirs(x)
    torch.manual_seed(7)
    torch.testing.assert_close(ours(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("core_init", ["normal", "zeros"])
def test_lora_xs(core_init):
    cfg = nora.LoraXSConfig(r=4, alpha=8, core_init=core_init, target_modules=["0"], **SVD64)
    _, W0, b, p, x, y = _run(cfg)
    U, S, Vt = ref_svd(W0, 4)
    dW = 2 * U @ p["core"] @ (S[:, None] * Vt)
    np.testing.assert_allclose(y, x @ (W0 + dW).T + b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("placement", ["sqrt", "out", "in", "none"])
@pytest.mark.parametrize("inner", ["serial", "out"])
def test_nora(placement, inner):
    cfg = nora.NoraConfig(r=6, inner_r=2, alpha=3, inner=inner, placement=placement, target_modules=["0"], **SVD64)
    _, W0, b, p, x, y = _run(cfg)
    Bo, Ao = ref_place(*ref_svd(W0, 6), placement)
    inner_w = p["inner_B"] @ p["inner_A"]
    dW = 0.5 * (Bo @ inner_w @ Ao if inner == "serial" else inner_w @ Bo @ Ao)
    np.testing.assert_allclose(y, x @ (W0 + dW).T + b, rtol=1e-9, atol=1e-10)


def test_nora_fractional_rank_and_randn_init():
    cfg = nora.NoraConfig(r=0.8, inner_r=2, inner_init="randn", placement="sqrt", target_modules=["0"], **SVD64)
    model, W0, b, p, x, y = _run(cfg)
    r = int(0.8 * min(D, K))
    assert p["inner_A"].shape == (2, r)
    Bo, Ao = ref_place(*ref_svd(W0, r), "sqrt")
    np.testing.assert_allclose(y, x @ (W0 + Bo @ p["inner_B"] @ p["inner_A"] @ Ao).T + b, rtol=1e-9, atol=1e-10)


def test_nora_awsvd():
    base = _linear()
    W0, b = base[0].weight.detach().numpy().copy(), base[0].bias.detach().numpy().copy()
    calib = [torch.randn(4, K, dtype=torch.float64) * torch.linspace(0.1, 3, K, dtype=torch.float64) for _ in range(3)]
    # scales are kept (and saved) in float32
    a = (np.mean(np.abs(torch.cat(calib).numpy()), axis=0) ** 0.5).astype(np.float32).astype(np.float64)
    cfg = nora.NoraConfig(r=5, inner_r=2, awsvd=True, awsvd_power=0.5, placement="sqrt", target_modules=["0"], **SVD64)
    model = nora.get_peft_model(base, cfg, calibration_data=calib)
    p = _perturb(model)
    x = torch.randn(5, K, dtype=torch.float64)
    U, S, Vt = ref_svd(W0 * a[None, :], 5)
    Bo, Ao = ref_place(U, S, Vt, "sqrt")
    Ao = Ao / a[None, :]
    dW = (5 / 5) * Bo @ p["inner_B"] @ p["inner_A"] @ Ao
    np.testing.assert_allclose(model(x).detach().numpy(), x.numpy() @ (W0 + dW).T + b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("energy", [None, 0.9])
def test_svfit(energy):
    cfg = nora.SVFitConfig(r=4 if energy is None else None, energy=energy or 0.99, target_modules=["0"], **SVD64)
    _, W0, b, p, x, y = _run(cfg)
    S_all = np.linalg.svd(W0, compute_uv=False)
    r = 4 if energy is None else int(np.searchsorted(np.cumsum(S_all**2) / np.sum(S_all**2), energy) + 1)
    assert p["sigma"].shape == (r,)
    U, S, Vt = ref_svd(W0, r)
    W_e = W0 - U @ np.diag(S) @ Vt
    np.testing.assert_allclose(y, x @ W_e.T + (U @ (p["sigma"][:, None] * (Vt @ x.T))).T + b, rtol=1e-9, atol=1e-10)


def test_svfit_energy_sum_measure():
    base = _linear()
    cfg = nora.SVFitConfig(energy=0.9, energy_measure="sum", target_modules=["0"], **SVD64)
    model = nora.get_peft_model(base, cfg)
    S = np.linalg.svd(base[0].base_layer.weight.detach().numpy(), compute_uv=False)
    expected = int(np.searchsorted(np.cumsum(S) / S.sum(), 0.9) + 1)
    assert model.layers()["0"].adapters["default"].r == expected
