"""Fused MoE expert stacks (nora.layers.experts): every method adapts each expert of a 3-D expert parameter, on
config-built Qwen3-MoE, Mixtral and gpt-oss (transposed layout, biases) in float64: ΔW per expert against the same
method on that expert's matrix as an nn.Linear, the model's logits against a copy holding W_e + ΔW_e, merge →
unmerge, save → load, mixed batches, PEFT's target_parameters export (DoRA's refusal), target selection and its
warning, and a short training run whose expert adapters learn."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import FLOAT32_TOL, RECORDS, assert_float_close, char_tokenizer
from safetensors.torch import load_file
from torch import nn
from transformers import (
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import nora
from nora import AdapterError
from nora.layers import ExpertsLayer

SMALL = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             head_dim=8, num_experts_per_tok=2)  # fmt: skip


def tiny_qwen3_moe(seed: int = 0, **overrides) -> nn.Module:
    fields = {**SMALL, "intermediate_size": 32, "moe_intermediate_size": 8, "num_experts": 4, "mlp_only_layers": []}
    cfg = Qwen3MoeConfig(**{**fields, **overrides})
    return _built(Qwen3MoeForCausalLM, cfg, seed)


def tiny_mixtral(seed: int = 0) -> nn.Module:
    return _built(MixtralForCausalLM, MixtralConfig(**SMALL, intermediate_size=8, num_local_experts=4), seed)


def tiny_gpt_oss(seed: int = 0) -> nn.Module:
    cfg = GptOssConfig(**SMALL, intermediate_size=8, num_local_experts=4, layer_types=["full_attention"] * 2)
    model = _built(GptOssForCausalLM, cfg, seed)
    with torch.no_grad():  # its biases start at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                p.normal_(0, 0.1)
    return model


def _built(cls, cfg, seed: int) -> nn.Module:
    cfg._experts_implementation = "eager"  # the grouped-matmul kernels take no float64
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return cls(cfg).double().eval()


MODELS = {"qwen3-moe": tiny_qwen3_moe, "mixtral": tiny_mixtral, "gpt-oss": tiny_gpt_oss}
CONFIGS = {
    "nora": lambda: nora.NoraConfig(r=4, inner_r=2),
    "svfit": lambda: nora.SVFitConfig(r=4),
    "lora": lambda: nora.LoraConfig(r=4),
    "pissa": lambda: nora.PissaConfig(r=4),
    "lora-xs": lambda: nora.LoraXSConfig(r=4),
    "dora": lambda: nora.DoraConfig(r=4),
}
IDS = torch.tensor([[3, 17, 5, 40, 9, 22], [8, 1, 33, 12, 60, 2], [14, 14, 7, 51, 28, 4]])


def adapted(model_name: str, method: str, seed: int = 1) -> tuple[nn.Module, nora.AdaptedModel]:
    """(an untouched copy of the base, the base with adapter "default" of `method`, its tensors moved off init)."""
    base = MODELS[model_name]()
    untouched = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nora.get_peft_model(base, CONFIGS[method]())
    perturb(model, "default", seed)
    return untouched, model


def perturb(model: nora.AdaptedModel, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers().values():
            if name in layer.adapters:
                for p in layer.adapters[name].parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def expert_layers(model: nora.AdaptedModel) -> dict[str, nora.AdapterLayer]:
    return {n: layer for n, layer in model.layers().items() if ".experts." in n}


def logits(model: nn.Module, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, **kwargs).logits


def reference_weight(layer: nora.AdapterLayer, method: str) -> torch.Tensor:
    """W_e + ΔW_e by the same method on expert e's matrix as an nn.Linear (its own SVD, its tensors copied in)."""
    W = layer.base_weight().detach()
    linear = nn.Sequential(nn.Linear(W.shape[1], W.shape[0], bias=False, dtype=torch.float64))
    with torch.no_grad():
        linear[0].weight.copy_(W)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = nora.get_peft_model(linear, dataclass_replace(CONFIGS[method](), target_modules=["0"]))
    with torch.no_grad():
        for pname, p in ref.layers()["0"].adapters["default"].params.items():
            p.copy_(layer.adapters["default"].params[pname])
    ref.merge()
    return linear[0].weight.detach().clone()


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def with_weights(untouched: nn.Module, weights: dict[str, dict[int, torch.Tensor]]) -> nn.Module:
    """A copy of the base whose expert parameters hold the given d × k matrices (in the parameter's layout)."""
    ref = copy.deepcopy(untouched)
    with torch.no_grad():
        for path, experts in weights.items():
            module_path, _, param = path.rpartition(".")
            module = ref.get_submodule(module_path)
            stored = getattr(module, param)
            for e, W in experts.items():
                stored[e].copy_(W.T if getattr(module, "is_transposed", False) else W)
    return ref


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_every_method_adapts_each_expert_exactly(model_name, method, tmp_path):
    untouched, model = adapted(model_name, method)
    experts = expert_layers(model)
    assert len(experts) == 2 * 2 * 4  # 2 blocks × (gate_up, down) × 4 experts
    # ΔW per expert: the method on that expert's matrix alone (its own SVD basis), float64
    weights: dict[str, dict[int, torch.Tensor]] = {}
    for name, layer in experts.items():
        path, _, e = name.rpartition(".")
        expected = reference_weight(layer, method)
        merged = layer.merged_weight(layer.adapters["default"])[0]
        assert_float_close(merged, expected, f"{name}: W_e + ΔW_e")
        assert not torch.allclose(merged, layer.base_weight()), name
        weights.setdefault(path, {})[int(e)] = expected
    if method in ("nora", "svfit", "lora-xs", "pissa"):  # an outer basis per expert, not one shared
        bases = {next(iter(layer.bases)) for layer in experts.values()}
        assert len(bases) == len(experts)
    # the model's logits: attention layers as adapted, experts holding the reference W_e + ΔW_e
    out = logits(model)
    ref = with_weights(untouched, weights)
    for name, layer in model.layers().items():
        if name not in experts:
            target = ref.get_submodule(name)
            with torch.no_grad():
                target.weight.copy_(layer.merged_weight(layer.adapters["default"])[0].to(target.weight.dtype))
    assert_float_close(out, logits(ref), "adapted logits against W + ΔW written into a copy")
    assert not torch.allclose(out, logits(untouched))

    # merge → unmerge
    stored = {n: p.detach().clone() for n, p in untouched.named_parameters() if ".experts." in n}
    model.merge()
    assert_float_close(logits(model), out, "merged")
    model.unmerge()
    params = dict(model.model.named_parameters())
    for n, p in stored.items():
        module_path, _, param = n.rpartition(".")
        assert_float_close(params[f"{module_path}.base_layer.{param}"], p, f"{n} after unmerge")
    assert_float_close(logits(model), out, "unmerged")

    # save → load onto a fresh base: the same logits
    model.save_pretrained(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["nora"]["layers"]
    assert set(experts) <= set(meta)
    loaded = nora.AdaptedModel.from_pretrained(copy.deepcopy(untouched), tmp_path / "a")
    assert_float_close(logits(loaded), out, "loaded")
    assert not loaded.resident.of  # expert layers load as modules

    # a mixed batch: each row as its adapter alone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("b", CONFIGS[method]())
    perturb(model, "b", seed=2)
    model.set_adapter("b")
    out_b = logits(model)
    model.set_adapter("default")
    with model.disable_adapter():
        out_base = logits(model)
    mixed = logits(model, adapter_names=["b", nora.BASE, "default"])
    assert_float_close(mixed, torch.stack([out_b[0], out_base[1], out[2]]), "mixed batch")


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_export_loads_in_peft_with_the_same_outputs(model_name, method, tmp_path):
    from peft import PeftModel

    untouched, model = adapted(model_name, method)
    if method == "dora":
        with pytest.raises(AdapterError, match="ParamWrapper.*use_dora.*magnitude.*merge_and_unload"):
            model.export_lora(tmp_path / "peft")
        return
    model.export_lora(tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert len(config["target_parameters"]) == 4  # gate_up and down of each of the 2 blocks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(untouched), tmp_path / "peft").eval()
    out = logits(peft_model)
    torch.testing.assert_close(out, logits(model), **FLOAT32_TOL)  # exported as float32
    assert not torch.allclose(out, logits(untouched), **FLOAT32_TOL)  # PEFT applied the experts' update


def test_all_linear_adapts_experts_and_names_what_it_leaves(recwarn):
    model = nora.get_peft_model(tiny_qwen3_moe(), nora.LoraConfig(r=2))
    said = [str(w.message) for w in recwarn if "all-linear" in str(w.message)]
    assert len(said) == 1 and "model.layers.*.mlp.gate.weight (Qwen3MoeTopKRouter) ×2" in said[0], said
    assert len(expert_layers(model)) == 16
    assert isinstance(model.model.model.layers[0].mlp.experts, ExpertsLayer)

    recwarn.clear()
    model = nora.get_peft_model(tiny_qwen3_moe(), nora.LoraConfig(r=2, target_parameters=[]))
    said = [str(w.message) for w in recwarn if "all-linear" in str(w.message)]
    assert "model.layers.*.mlp.experts.gate_up_proj ×2" in said[0] and "target_parameters" in said[0]
    assert not expert_layers(model)


def test_expert_parameters_can_be_named():
    named = nora.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"])
    model = nora.get_peft_model(tiny_qwen3_moe(), named)
    names = set(model.layers())
    assert {n.rsplit(".", 2)[-2] for n in names} == {"self_attn", "down_proj"}
    every = nora.LoraConfig(r=2, target_modules=["q_proj"], target_parameters="all-experts")
    model = nora.get_peft_model(tiny_mixtral(), every)
    assert len(expert_layers(model)) == 16
    model = nora.get_peft_model(tiny_mixtral(), nora.LoraConfig(r=2, target_modules=["q_proj"]))
    assert not expert_layers(model)  # named modules alone leave the experts out
    cfg = nora.LoraConfig(r=2, target_parameters=["mlp.experts.down_proj"])
    assert nora.AdapterConfig.from_dict(cfg.to_dict()).target_parameters == ["mlp.experts.down_proj"]
    assert "target_parameters" not in nora.LoraConfig(r=2).to_dict()  # files without experts stay as they were


def test_awsvd_on_experts_is_refused_before_any_work():
    batches = [IDS]
    with pytest.raises(AdapterError, match="awsvd=False.*target_parameters=\\[\\]"):
        nora.get_peft_model(tiny_qwen3_moe(), nora.NoraConfig(r=2, awsvd=True), calibration_data=batches)


def test_dropout_is_said_not_to_reach_experts():
    with pytest.warns(UserWarning, match="dropout=0.1 is not applied to the 16 expert layers"):
        nora.get_peft_model(tiny_qwen3_moe(), nora.LoraConfig(r=2, dropout=0.1))


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_every_expert_adapter_gets_a_gradient(model_name):
    """PiSSA starts with both factors non-zero, so every expert that a token is routed to (all of them, on these
    tokens) has a non-zero gradient on each of its tensors."""
    model = nora.get_peft_model(MODELS[model_name](), nora.PissaConfig(r=2))
    model.train()
    model(IDS, labels=IDS).loss.backward()
    for name, layer in expert_layers(model).items():
        for pname, p in layer.adapters["default"].named_parameters():
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, f"{name}.{pname}"


def test_nora_train_lowers_the_loss_and_trains_the_named_experts(tmp_path: Path):
    """`nora train` on a config-built Qwen3-MoE saved as a model directory, with the experts' gate_up_proj named
    by --target-parameters: the loss falls, every gate_up_proj expert adapter moved off its initialisation (its
    gradients were not zero), and down_proj, not named, has none."""
    from typer.testing import CliRunner

    from nora.cli import app

    base = tmp_path / "base"
    tokenizer = char_tokenizer(base)
    model = tiny_qwen3_moe(vocab_size=len(tokenizer), max_position_embeddings=256, initializer_range=0.3).float()
    model.config._experts_implementation = None
    model.save_pretrained(base)
    data = tmp_path / "train.json"
    data.write_text(json.dumps(RECORDS))
    run = tmp_path / "run"
    args = ["train", "--model", base, "--data", data, "--eval-data", data, "-o", run, "--batch-size", "8",
            "--max-steps", "40", "--logging-steps", "5", "--no-progress", "--no-plot", "--method", "nora",
            "--rank", "8", "--inner-rank", "4", "--learning-rate", "0.1",
            "--target-parameters", "gate_up_proj"]  # fmt: skip
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    s = json.loads((run / "summary.json").read_text())
    assert s["eval_loss"] < 0.9 * s["initial_eval_loss"], (s["initial_eval_loss"], s["eval_loss"])
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    inner_B = {k: t for k, t in tensors.items() if ".experts." in k and k.endswith(".inner_B")}
    assert len(inner_B) == 8 and all(".gate_up_proj." in k for k in inner_B)
    assert all(t.abs().sum() > 0 for t in inner_B.values())  # zero at init: each expert's core had a gradient
