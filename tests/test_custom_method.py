"""A method defined here, in one class and one registry line, works everywhere nora's own methods do: `nora train
--method NAME`, save → load, merge / unmerge, export to PEFT LoRA, and mixed batches over resident adapters."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import RECORDS, assert_float_close
from safetensors.torch import load_file
from transformers import LlamaForCausalLM
from typer.testing import CliRunner

import nora
from nora.chain import Term
from nora.cli import app
from nora.config import AdapterConfig
from nora.methods import METHODS, Method


@dataclass
class GainConfig(AdapterConfig):
    method = "gain-test"
    r: int | float = 8
    placement: str = "in"


class Gain(Method):
    """ΔW = s · B_o diag(g) A_o: one trainable gain per outer singular direction, zero at init."""

    name = "gain-test"
    config_cls = GainConfig
    default_lr = 2e-2

    def init_params(self, config, W, basis, r, dtype):
        return {"gain": torch.zeros(r, dtype=dtype, device=W.device)}

    def terms(self, core, basis):
        return [Term(core.scale, [core["gain"]], left=[basis.B], right=[basis.A])]


@pytest.fixture(autouse=True)
def registered():
    METHODS[Gain.name] = Gain()
    yield
    del METHODS[Gain.name]


def _base(directory: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(directory).eval()


def _trained(directory: Path, seed: int) -> nora.AdaptedModel:
    model = nora.get_peft_model(_base(directory), GainConfig(r=8, alpha=16))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    return model.eval()


@torch.no_grad()
def test_a_method_defined_in_a_test_file_merges_saves_loads_exports_and_mixes(stories260k_dir, tmp_path):
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    base_logits = _base(stories260k_dir)(input_ids=ids).logits
    models = [_trained(stories260k_dir, seed) for seed in (1, 2)]
    logits = [m(input_ids=ids).logits for m in models]
    assert (logits[0] - base_logits).abs().max() > 1e-2  # the update is real

    # ΔW against a float64 reference built from the layer's own basis
    layer = next(iter(models[0].layers().values()))
    core = layer.adapters["default"]
    basis = layer.basis_of(core)
    reference = core.scale * basis.B.double() @ torch.diag(core["gain"].double()) @ basis.A.double()
    torch.testing.assert_close(layer.delta_weight("default").double(), reference, rtol=1e-5, atol=1e-6)

    # merge / unmerge
    models[0].merge()
    torch.testing.assert_close(models[0](input_ids=ids).logits, logits[0], rtol=1e-4, atol=1e-4)
    models[0].unmerge()
    # unmerge subtracts ΔW again: W + ΔW − ΔW rounds in float32, and the error grows through the layers
    torch.testing.assert_close(models[0](input_ids=ids).logits, logits[0], rtol=1e-5, atol=5e-5)

    # save → load (module and resident), then one batch mixing both adapters and the base
    for i, m in enumerate(models):
        m.save_pretrained(tmp_path / f"a{i}")
    loaded = nora.AdaptedModel.from_pretrained(_base(stories260k_dir), tmp_path / "a0", "a0")
    assert torch.equal(loaded(input_ids=ids).logits, logits[0])
    loaded.load_adapter(tmp_path / "a1", "a1")
    assert loaded.resident_bank("a1") is not None  # a linear method on an outer basis: a resident slot
    rows = ["a0", "a0", "a1", "a1", nora.BASE, nora.BASE]
    mixed = loaded(input_ids=ids.repeat(3, 1), adapter_names=rows).logits
    for got, want in zip(mixed.split(2), (logits[0], logits[1], base_logits), strict=True):
        assert_float_close(got, want)

    # export to PEFT LoRA, loaded by PEFT itself
    from peft import PeftModel

    loaded.export_lora(tmp_path / "peft", "a1")
    peft_model = PeftModel.from_pretrained(_base(stories260k_dir), tmp_path / "peft").eval()
    torch.testing.assert_close(peft_model(input_ids=ids).logits, logits[1], rtol=1e-4, atol=1e-4)


def test_nora_train_takes_the_method_by_name(stories260k_dir, tmp_path):
    data = tmp_path / "train.json"
    data.write_text(json.dumps(RECORDS))
    out = tmp_path / "run"
    args = ["train", "--model", str(stories260k_dir), "--data", str(data), "--output-dir", str(out)]
    args += ["--method", Gain.name, "--max-steps", "12", "--batch-size", "8", "--no-progress", "--no-plot"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    used = json.loads((out / "train_config.json").read_text())
    assert used["method"] == Gain.name and used["learning_rate"] == Gain.default_lr
    assert used["adapter"]["r"] == GainConfig.r
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    gains = [t for k, t in tensors.items() if k.endswith(".gain")]
    assert gains and all(g.abs().max() > 0 for g in gains)  # trained away from the zero init
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0]
