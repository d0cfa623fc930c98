"""`nora export`: a saved nora adapter as a PEFT LoRA directory (a causal LM, a classifier with its trained head)
that PEFT loads to the same logits, and what it refuses. The diffusers format is tested in test_dreambooth.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llm, tiny_bert
from test_bad_input import refused
from typer.testing import CliRunner

import nora
from nora.cli import app


def _perturbed(model, seed: int = 0):
    torch.manual_seed(seed)
    with torch.no_grad():  # a trained-looking adapter: every trainable tensor moved off its init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _export(adapter: Path, out: Path, *extra) -> None:
    result = CliRunner().invoke(app, ["export", str(adapter), "-o", str(out), *map(str, extra)])
    assert result.exit_code == 0, result.output + repr(result.exception)


@pytest.mark.parametrize("method", ["nora", "svfit", "dora"])
def test_export_writes_a_peft_adapter_with_the_same_logits(tmp_path, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = save_tiny_llm(tmp_path / "llm")
    config = nora.AdapterConfig.from_dict({"method": method, "r": 8, "inner_r": 2} if method == "nora" else
                                          {"method": method, "r": 8})  # fmt: skip
    model = _perturbed(nora.get_peft_model(AutoModelForCausalLM.from_pretrained(base), config))
    model.save_pretrained(tmp_path / "adapter")
    _export(tmp_path / "adapter", tmp_path / "peft")
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)


def test_export_keeps_a_classifiers_trained_head(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    tiny_bert(num_labels=3).save_pretrained(tmp_path / "bert")
    bert = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert")
    config = nora.LoraConfig(r=4, target_modules="all-linear", modules_to_save=["classifier"])
    model = _perturbed(nora.get_peft_model(bert, config))
    model.save_pretrained(tmp_path / "adapter")
    nora_config = tmp_path / "adapter" / "adapter_config.json"  # as nora train records a classifier's head
    import json

    saved = json.loads(nora_config.read_text())
    saved["nora"]["head"] = {"task": "seq-cls", "labels": ["a", "b", "c"]}
    nora_config.write_text(json.dumps(saved))
    _export(tmp_path / "adapter", tmp_path / "peft")
    ids = torch.tensor([[2, 7, 4, 9, 3]])
    fresh = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert")
    peft_model = PeftModel.from_pretrained(fresh, tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.bad_input("export", "missing")
@pytest.mark.bad_input("export", "malformed")
@pytest.mark.bad_input("export", "unwritable")
def test_export_refuses_what_it_cannot_write(tmp_path):
    from transformers import AutoModelForCausalLM

    base = save_tiny_llm(tmp_path / "llm")
    model = nora.get_peft_model(AutoModelForCausalLM.from_pretrained(base), nora.LoraConfig(r=4))
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    refused(["export", tmp_path / "adapter", "-o", tmp_path / "full"], "not empty", "--overwrite")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    refused(["export", tmp_path / "adapter", "-o", tmp_path / "out", "--format", "diffusers"], "--format peft")
    refused(["export", tmp_path / "adapter", "-o", tmp_path / "out", "--format", "onnx"], "choose peft or diffusers")
    refused(["export", tmp_path / "nothing", "-o", tmp_path / "out"], "no such adapter directory")
    model.export_lora(tmp_path / "peft")
    refused(["export", tmp_path / "peft", "-o", tmp_path / "out"], "already a PEFT adapter")
