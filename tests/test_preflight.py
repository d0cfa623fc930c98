"""Checked before any slow step, refused by name: an output folder nothing can be written in (`nora eval -o`,
`nora export -o`, `nora generate -o / --image-dir`), exporting or evaluating onto a base of another architecture, a
base model whose weights are only pickled, and a missing bitsandbytes (quantizing a base; evaluating an adapter
trained on a quantized one). Each used to fail only after the slow part, or in a traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from conftest import RECORDS, save_tiny_llm, tiny_bert, tiny_vit
from typer.testing import CliRunner

import nora
from nora.cli import app
from nora.errors import AdapterError

runner = CliRunner(env={"COLUMNS": "1000"})  # one line per message: a long tmp path wraps mid-word
LOADED = "Loading weights"  # transformers' progress line: a base model was being loaded


def _plain(output: str) -> str:
    return " ".join(re.sub("[│╭╮╰╯─]", " ", output).split())


def refused(args: list, pattern: str, code: int = 2) -> str:
    """`nora ARGS` exits with `code` (2: a bad value; nora train says "error:" and exits 1) and a message matching
    `pattern`, before any model was loaded."""
    result = runner.invoke(app, [str(a) for a in args])
    assert isinstance(result.exception, SystemExit) and result.exit_code == code, (result.exception, result.output)
    assert re.search(pattern, _plain(result.output)), result.output
    assert LOADED not in result.output, result.output  # refused before any model was loaded
    return result.output


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny Llama saved as a base directory, a LoRA adapter on it, and a commonsense task file."""
    root = tmp_path_factory.mktemp("preflight")
    base = save_tiny_llm(root / "base")
    from transformers import AutoModelForCausalLM

    adapted = nora.get_peft_model(AutoModelForCausalLM.from_pretrained(base), nora.LoraConfig(r=2))
    adapted.save_pretrained(root / "adapter")
    task = root / "data" / "commonsense" / "boolq" / "test.json"
    task.parent.mkdir(parents=True)
    record = {"instruction": "Is ice cold?\n\nAnswer format: true/false", "input": "", "output": "true",
              "answer": "true"}  # fmt: skip
    task.write_text(json.dumps([record]))
    return {"root": root, "base": base, "adapter": root / "adapter", "data": root / "data"}


@pytest.fixture
def locked(tmp_path):
    """A folder nothing can be written in: read-only for an ordinary user, immutable (chattr +i) for root."""
    folder = tmp_path / "locked"
    folder.mkdir()
    root = os.geteuid() == 0
    if root:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("running as root where chattr +i is not available: no folder root cannot write in")
    else:
        folder.chmod(0o555)
    try:
        (folder / "probe").touch()
        writable = True
    except OSError:
        writable = False
    try:
        if writable:
            pytest.skip("this user can write in a read-only folder")
        yield folder
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)


# ---- outputs ------------------------------------------------------------------------------------------------------
@pytest.mark.bad_input("eval", "unwritable")
def test_eval_refuses_an_unwritable_output_before_evaluating(run, locked, tmp_path):
    """It used to evaluate every task, then lose the results in a traceback."""
    start = time.perf_counter()
    args = ["eval", run["adapter"], "--tasks", "boolq", "--data-dir", run["data"], "--no-progress"]
    refused([*args, "-o", locked / "results.json"], r"--output .*nothing can be written in .*locked")
    refused([*args, "-o", run["adapter"] / "adapter_config.json" / "results.json"], r"is a file, not a folder")
    assert time.perf_counter() - start < 20
    ok = runner.invoke(app, [str(a) for a in [*args, "-o", tmp_path / "new" / "deeper" / "results.json"]])
    assert ok.exit_code == 0 and (tmp_path / "new" / "deeper" / "results.json").is_file(), ok.output


@pytest.mark.bad_input("export", "unwritable")
def test_export_refuses_an_unwritable_output_before_loading(run, locked):
    """It used to load the base and compute the export, then fail on a bare Errno 30."""
    refused(["export", run["adapter"], "-o", locked / "peft"], r"--output .*nothing can be written in .*locked")
    refused(["export", run["adapter"], "-o", locked / "a" / "b"], r"nothing can be written in .*locked")


@pytest.mark.bad_input("generate", "unwritable")
def test_generate_refuses_unwritable_image_outputs_before_loading_the_pipeline(locked, tmp_path):
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")  # enough to be taken for a pipeline; nothing is loaded
    refused(["generate", "--base", pipeline, "-p", "a dog", "-o", locked / "grid.png"], r"--output .*nothing can be")
    refused(["generate", "--base", pipeline, "-p", "a dog", "-o", tmp_path / "grid.png", "--image-dir", locked],
            r"--image-dir .*nothing can be written")  # fmt: skip


# ---- inputs -------------------------------------------------------------------------------------------------------
@pytest.mark.bad_input("export", "hostile")
@pytest.mark.bad_input("eval", "hostile")
@pytest.mark.bad_input("generate", "hostile")
def test_another_architecture_is_refused_by_name_before_loading(run, tmp_path):
    """A ViT base used to end in transformers' ValueError traceback, a BERT one was loaded before the refusal."""
    tiny_vit().save_pretrained(tmp_path / "vit")
    tiny_bert().save_pretrained(tmp_path / "bert")
    vit, bert = tmp_path / "vit", tmp_path / "bert"
    refused(["export", run["adapter"], "-o", tmp_path / "out", "--base", vit], r"vit model, which has no causal model")
    refused(["export", run["adapter"], "-o", tmp_path / "out", "--base", bert], r"which this model does not have")
    eval_args = ["--tasks", "boolq", "--data-dir", run["data"], "--no-progress"]
    refused(["eval", run["adapter"], "--base", vit, *eval_args], r"vit model, which has no causal model")
    refused(["generate", "--adapter", run["adapter"], "--base", bert, "-p", "hi"], r"which this model does not have")
    assert not (tmp_path / "out").exists()


@pytest.mark.bad_input("train", "hostile")
@pytest.mark.bad_input("eval", "hostile")
@pytest.mark.bad_input("export", "hostile")
@pytest.mark.bad_input("generate", "hostile")
def test_a_base_whose_weights_are_only_pickled_is_refused_by_name(run, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (run["base"] / name).is_file():
            (pickled / name).write_text((run["base"] / name).read_text())
    from safetensors.torch import load_file

    torch.save(load_file(run["base"] / "model.safetensors"), pickled / "pytorch_model.bin")
    message = r"holds its weights only as pickled files \(pytorch_model.bin\), which nora does not load"
    refused(["eval", pickled, "--tasks", "boolq", "--data-dir", run["data"], "--no-progress"], message)
    refused(["export", run["adapter"], "-o", tmp_path / "out", "--base", pickled], message)
    refused(["generate", "--base", pickled, "-p", "hi"], message)
    refused(["train", "--model", pickled, "--data", tmp_path / "none.json", "-o", tmp_path / "run"], message, code=1)


# bitsandbytes made absent for one process: an import of it fails, as where it is not installed
NO_BNB = "import sys; sys.modules['bitsandbytes'] = None; from nora.cli import app; app()"


def _without_bitsandbytes(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", NO_BNB, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(os.environ))


@pytest.mark.bad_input("train", "missing")
def test_a_missing_bitsandbytes_is_refused_by_name_before_loading(run, tmp_path):
    """`nora train --quantize nf4` used to end in transformers' ImportError traceback."""
    data = tmp_path / "train.json"
    data.write_text(json.dumps(RECORDS[:8]))
    trained = _without_bitsandbytes("train", "--model", run["base"], "--data", data, "-o", tmp_path / "run",
                                    "--quantize", "nf4", "--max-steps", "1", "--no-progress")  # fmt: skip
    output = _plain(trained.stdout + trained.stderr)
    assert trained.returncode == 1 and "Traceback" not in output, output[-2000:]  # nora train's "error:" exit
    assert "quantize=nf4 (a bitsandbytes base) needs bitsandbytes, which is not installed" in output, output[-2000:]
    assert LOADED not in output


@pytest.mark.bad_input("eval", "missing")
def test_an_adapter_trained_on_a_quantized_base_needs_bitsandbytes_said_before_loading(run, tmp_path):
    from nora.pretrained import load_model

    adapted = nora.get_peft_model(load_model(str(run["base"]), quantize="nf4"), nora.LoraConfig(r=2))
    adapted.save_pretrained(tmp_path / "qlora")
    result = _without_bitsandbytes("eval", tmp_path / "qlora", "--tasks", "boolq", "--data-dir", run["data"],
                                   "--no-progress")  # fmt: skip
    output = _plain(result.stdout + result.stderr)
    assert result.returncode == 2 and "Traceback" not in output, output[-2000:]
    assert re.search(r"trained on a nf4 base, needs bitsandbytes", output), output[-2000:]
    assert LOADED not in output


def test_load_model_checks_bitsandbytes_before_reading_weights(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    from nora.pretrained import load_model

    with pytest.raises(AdapterError, match=r'needs bitsandbytes, which is not installed: pip install -e ".\[quant\]"'):
        load_model(str(run["base"]), quantize="int8")
