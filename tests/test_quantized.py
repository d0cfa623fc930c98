"""Adapters on quantized bases (bitsandbytes nf4 / fp4 / int8, here on its CPU backend): the basis and digest come
from the dequantized weight, training and save → load work, cross-loading onto the full-precision weights and back
says what it implies, merging refuses, requantizes or dequantizes as documented; `nora train --quantize`."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes", reason='bitsandbytes is the quantizer (pip install -e ".[quant]")')

from conftest import ref_svd, save_tiny_llm  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import nora  # noqa: E402
from nora import quant  # noqa: E402
from nora.errors import AdapterError  # noqa: E402
from nora.pretrained import load_model  # noqa: E402

SCHEMES = ["nf4", "int8"]


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))


def _train(adapted, ids, steps=6, lr=1e-2) -> list[float]:
    opt = torch.optim.Adam([p for p in adapted.parameters() if p.requires_grad], lr=lr)
    losses = []
    adapted.train()
    for _ in range(steps):
        loss = adapted(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("scheme", SCHEMES)
def test_real_weights_quantized_train_save_reload_and_cross_load(stories260k_dir, tmp_path, scheme):
    base = load_model(str(stories260k_dir), quantize=scheme)
    assert quant.scheme_of(base.model.layers[0].self_attn.q_proj)["scheme"] == scheme
    ids = _ids(base.config.vocab_size)
    torch.manual_seed(0)
    adapted = nora.get_peft_model(base, nora.NoraConfig(r=16, inner_r=4, placement="sqrt"))
    layer = adapted.layers()["model.layers.0.self_attn.q_proj"]
    W = quant.dequantized(layer.base_layer).double().numpy()
    U, S, Vt = ref_svd(W, 16)  # the outer basis is the SVD of the dequantized weight (float64 reference)
    basis = layer.basis_of(layer.adapters["default"])
    product = (basis.B.double() @ basis.A.double()).numpy()
    assert abs(product - (U * S) @ Vt).max() < 1e-4
    losses = _train(adapted, ids)
    assert losses[-1] < losses[0]
    adapted.eval()
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
    adapted.save_pretrained(tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["nora"]["layers"]
    assert all(info["quant"]["scheme"] == scheme for info in meta.values())
    deltas = {n: lay.delta_weight("default") for n, lay in adapted.layers().items()}
    adapted.unload()

    again = nora.AdaptedModel.from_pretrained(base, tmp_path / "ad")  # the same quantized base: identical
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, expected)
    again.unload()

    full = load_model(str(stories260k_dir))  # its full-precision weights: the basis rebuilt, the update exact
    with pytest.warns(UserWarning, match=rf"trained on a {scheme}-quantized base .* onto a full-precision one "
                      r"\(\d+ layers\).* exactly the trained one.* differ .* by \d+\.\d+% on average"):  # fmt: skip
        crossed = nora.AdaptedModel.from_pretrained(full, tmp_path / "ad")
    for n, lay in crossed.layers().items():
        assert torch.allclose(lay.delta_weight("default"), deltas[n], atol=1e-5), n

    other = AutoModelForCausalLM.from_pretrained(stories260k_dir)  # other weights of the same shapes: refused
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
    with pytest.raises(AdapterError, match="made for a different base model"):
        nora.AdaptedModel.from_pretrained(other, tmp_path / "ad")


def test_a_full_precision_adapter_on_a_quantized_base_says_only_shapes_are_checked(stories260k_dir, tmp_path):
    full = load_model(str(stories260k_dir))
    torch.manual_seed(0)
    adapted = nora.get_peft_model(full, nora.LoraConfig(r=4))
    _train(adapted, _ids(full.config.vocab_size), steps=2)
    adapted.save_pretrained(tmp_path / "lora")
    deltas = {n: lay.delta_weight("default") for n, lay in adapted.layers().items()}
    base = load_model(str(stories260k_dir), quantize="nf4")
    with pytest.warns(UserWarning, match="trained on a full-precision base .* onto a nf4-quantized one.* only their "
                      "shapes are checked; its update does not depend on W0"):  # fmt: skip
        loaded = nora.AdaptedModel.from_pretrained(base, tmp_path / "lora")
    for n, lay in loaded.layers().items():
        assert torch.allclose(lay.delta_weight("default"), deltas[n], atol=1e-6)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_merging_into_quantized_layers(tmp_path, scheme):
    directory = save_tiny_llm(tmp_path / "base")
    ids = _ids(50)

    def adapted_model():
        torch.manual_seed(0)
        config = nora.NoraConfig(r=8, inner_r=4, placement="sqrt")
        model = nora.get_peft_model(load_model(str(directory), quantize=scheme), config)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.5)
        return model.eval()

    model = adapted_model()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    refused = rf"{scheme}-quantized weight cannot hold W0 \+ ΔW exactly.*merge_and_unload"
    with pytest.raises(AdapterError, match=refused):
        model.merge()
    with pytest.warns(UserWarning, match=r"requantizing: the stored weights differ from the exact W0 \+ ΔW by \d"):
        merged = model.merge_and_unload()
    assert quant.is_quantized(merged.model.layers[0].self_attn.q_proj)
    with torch.no_grad():
        requantized = merged(input_ids=ids).logits
    gap = (requantized - expected).abs().max().item()
    assert 0 < gap < 0.5 * expected.abs().max().item()  # rounding: close, not equal

    fresh = adapted_model()
    wanted = {n: (quant.dequantized(lay.base_layer) + lay.delta_weight("default")) for n, lay in fresh.layers().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact: nothing to say
        exact = fresh.merge_and_unload(dequantize=True)
    for name, W in wanted.items():
        layer = exact.get_submodule(name)
        assert type(layer) is torch.nn.Linear and torch.equal(layer.weight, W.to(layer.weight.dtype)), name
    with torch.no_grad():  # int8's kernel also rounds the activations to int8, so only close there
        assert torch.allclose(exact(input_ids=ids).logits, expected, atol=1e-4 if scheme == "nf4" else 2e-3)


def test_nora_train_quantize_writes_a_quantized_base_adapter(tmp_path):
    from conftest import RECORDS

    from nora.training import TrainConfig, train

    directory = save_tiny_llm(tmp_path / "base")
    data = tmp_path / "train.json"
    data.write_text(json.dumps(RECORDS))
    config = TrainConfig(model=str(directory), data=str(data), output_dir=str(tmp_path / "run"), batch_size=4,
                         max_steps=8, progress=False, plot=False, quantize="nf4", adapter={"r": 8, "inner_r": 4},
                         learning_rate=1e-2)  # fmt: skip
    result = train(config)
    assert result.summary["final_loss"] < result.summary["first_loss"] and result.summary["loftq_error_left"] is None
    from dataclasses import replace

    fitted = train(replace(config, loftq=True, output_dir=str(tmp_path / "loftq"), max_steps=1))
    assert 0 < fitted.summary["loftq_error_left"] < 1
    meta = json.loads((result.adapter_dir / "adapter_config.json").read_text())["nora"]["layers"]
    assert {info["quant"]["scheme"] for info in meta.values()} == {"nf4"}
    loaded = nora.AdaptedModel.from_pretrained(load_model(str(directory), quantize="nf4"), result.adapter_dir)
    assert len(loaded.layers()) == len(meta)
    with pytest.raises(AdapterError, match="--quantize int4: choose from nf4, fp4, int8"):
        TrainConfig(model=str(directory), data=str(data), quantize="int4")
    with pytest.raises(AdapterError, match="--loftq fits the adapter to a quantized base's error: add --quantize"):
        TrainConfig(model=str(directory), data=str(data), loftq=True)
    with pytest.raises(AdapterError, match="--method dora has no such fit"):  # refused before the base loads
        TrainConfig(model=str(directory), data=str(data), quantize="nf4", loftq=True, method="dora")
    with pytest.raises(AdapterError, match="--quantize with --fsdp is not supported"):
        TrainConfig(model=str(directory), data=str(data), quantize="nf4", fsdp=True)


@pytest.mark.parametrize(
    "config",
    [
        nora.LoraConfig(r=4),
        nora.PissaConfig(r=4),
        nora.NoraConfig(r=8, inner_r=2),
        nora.NoraConfig(r=8, inner_r=2, inner_core="diag", inner_init="orthogonal"),
        nora.LoraXSConfig(r=4),
        nora.SVFitConfig(r=6),
    ],  # fmt: skip
    ids=lambda c: f"{c.method}-{getattr(c, 'inner_core', '')}",
)
def test_loftq_init_fits_the_quantization_error_by_least_squares(stories260k_dir, config):
    import numpy as np

    full = load_model(str(stories260k_dir))
    torch.manual_seed(0)
    adapted = nora.get_peft_model(load_model(str(stories260k_dir), quantize="nf4"), config)
    left = nora.loftq_init(adapted, full)
    assert len(left) == len(adapted.layers()) and all(0 < v < 1 for v in left.values())
    name = "model.layers.1.mlp.down_proj"
    layer = adapted.layers()[name]
    W0 = full.get_submodule(name).weight.detach().double()
    E = (W0 - quant.dequantized(layer.base_layer).double()).numpy()
    delta = layer.delta_weight("default").detach().double().numpy()
    core, basis = layer.adapters["default"], layer.basis_of(layer.adapters["default"])
    B_o, A_o = (basis.B.double().numpy(), basis.A.double().numpy()) if basis is not None else (None, None)
    if config.method in ("lora", "pissa"):  # the fitted B·A is the best rank-r matrix (Eckart–Young), float64
        target = E if config.method == "lora" else E + core.scale * (B_o @ A_o)
        U, S, Vt = np.linalg.svd(target, full_matrices=False)
        best = (U[:, :4] * S[:4]) @ Vt[:4]
        fitted = delta if config.method == "lora" else delta + target - E
        assert np.abs(fitted - best).max() < 1e-5
    else:  # the least-squares optimum over the method's free values: the residual is orthogonal to every direction
        L, R = B_o, A_o
        residual = E - delta
        if config.method == "svfit":
            assert np.abs(np.einsum("di,dk,ik->i", L, residual, R)).max() < 1e-6
        elif config.method == "lora-xs" or getattr(config, "inner_r", 0) >= 8:
            assert np.abs(L.T @ residual @ R.T).max() < 1e-6
        else:  # NoRA's rank-r' core: the best rank-r' fit of the projected error
            middle = np.linalg.pinv(L) @ E @ np.linalg.pinv(R)
            U, S, Vt = np.linalg.svd(middle)
            best = L @ ((U[:, :2] * S[:2]) @ Vt[:2]) @ R
            assert np.abs(delta - best).max() < 1e-5
    with pytest.raises(AdapterError, match="is on no quantized layer"):
        nora.loftq_init(nora.get_peft_model(load_model(str(stories260k_dir)), config), full)


def test_loftq_init_brings_the_quantized_model_closer_and_dora_refuses(stories260k_dir):
    full = load_model(str(stories260k_dir))
    ids = _ids(full.config.vocab_size)
    with torch.no_grad():
        reference = full(input_ids=ids).logits
        base = load_model(str(stories260k_dir), quantize="nf4").train()  # (eval mode: bnb repacks for its CPU kernel)
        plain = (base(input_ids=ids).logits - reference).norm()
    torch.manual_seed(0)
    adapted = nora.get_peft_model(base, nora.LoraConfig(r=16)).eval()
    nora.loftq_init(adapted, full.state_dict())
    with torch.no_grad():
        fitted = (adapted(input_ids=ids).logits - reference).norm()
    assert fitted < 0.9 * plain  # the error the 4-bit base makes, partly absorbed before any training
    dora = nora.get_peft_model(load_model(str(stories260k_dir), quantize="nf4"), nora.DoraConfig(r=4))
    with pytest.raises(AdapterError, match="dora has no least-squares fit"):
        nora.loftq_init(dora, full)
