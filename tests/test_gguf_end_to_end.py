"""An adapter trained from a GGUF file goes through every later step with no flag naming the base: it records the
GGUF file itself, so `nora export` (PEFT loads the export to the same logits), `nora eval`, `nora serve` and
`nora generate` find it; a recorded or given GGUF path that is not there is refused at once, naming it and the fix."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from test_bad_input import refused
from test_eval_fewshot import _record
from test_eval_support import write_task
from test_serve_support import wait_until_serving
from typer.testing import CliRunner

pytest.importorskip("gguf", reason="the gguf package writes the test checkpoint (a dev dependency)")
from test_gguf_cache import write_tiny_gguf  # noqa: E402

import nora  # noqa: E402
from nora.cli import app  # noqa: E402
from nora.evaluation import LoglikRequest, continuation_logliks  # noqa: E402
from nora.pretrained import load_model, load_tokenizer  # noqa: E402

IDS = torch.tensor([[1, 20, 33, 41, 5, 17, 50]])
# The tiny GGUF's tokenizer holds bytes 0x00-0x3C only: digits, spaces and punctuation encode, letters do not.
RECORDS = [{"instruction": f"{a}+{b}=", "input": "", "output": f"{a + b}"} for a in range(5) for b in range(5)]


def _invoke(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A tiny GGUF model and an adapter `nora train --model DIR --gguf-file F.gguf` trained on it."""
    root = tmp_path_factory.mktemp("gguf-e2e")
    (root / "model").mkdir()
    gguf_file = write_tiny_gguf(root / "model" / "tiny.gguf")
    (root / "data.json").write_text(json.dumps(RECORDS))
    _invoke("train", "--model", root / "model", "--gguf-file", "tiny.gguf", "--data", root / "data.json",
            "-o", root / "run", "--rank", 4, "--lr", 0.05, "--max-steps", 3, "--batch-size", 4, "--no-plot",
            "--no-progress", "--threads", 1)  # fmt: skip
    return {"root": root, "gguf": gguf_file, "adapter": root / "run" / "adapter"}


def _adapted(run, merge: bool = False):
    model = nora.AdaptedModel.from_pretrained(load_model(str(run["gguf"])), run["adapter"]).eval()
    return model.merge_and_unload() if merge else model


def test_the_adapter_records_its_gguf_file_and_exports_to_peft_with_the_same_logits(run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recorded = json.loads((run["adapter"] / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(run["gguf"].resolve())
    _invoke("export", run["adapter"], "-o", tmp_path / "peft")
    plain = AutoModelForCausalLM.from_pretrained(run["gguf"].parent, gguf_file=run["gguf"].name)  # no nora involved
    peft_model = PeftModel.from_pretrained(plain, tmp_path / "peft").eval()
    with torch.no_grad():
        adapted = _adapted(run)(IDS).logits
        base = load_model(str(run["gguf"]))(IDS).logits
        torch.testing.assert_close(peft_model(IDS).logits, adapted, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(_adapted(run, merge=True)(IDS).logits, adapted, rtol=1e-4, atol=1e-5)
    assert (adapted - base).abs().max() > 1e-3  # the adapter trained: the comparisons above can fail


def test_eval_scores_the_adapter_on_its_recorded_gguf_base(run, tmp_path):
    write_task(tmp_path / "data", "ARC-Easy", [_record(i) for i in range(4)])
    out = tmp_path / "results.json"
    _invoke("eval", run["adapter"], "--tasks", "arc-e", "--data-dir", tmp_path / "data", "--log-samples",
            "--no-merge", "--no-progress", "--device", "cpu", "-o", out)  # fmt: skip
    payload = json.loads(out.read_text())
    assert payload["base"] == str(run["gguf"].resolve())
    samples = payload["results"]["loglik"]["tasks"]["ARC-Easy"]["samples"]
    requests = [LoglikRequest(s["prompt"], tuple(s["choices"])) for s in samples]
    expected = continuation_logliks(_adapted(run), load_tokenizer(run["adapter"]), requests)
    for sample, logliks in zip(samples, expected, strict=True):
        torch.testing.assert_close(torch.tensor(sample["logliks"]), torch.tensor(logliks), rtol=1e-4, atol=1e-4)


def test_generate_continues_prompts_with_the_merged_adapter(run):
    out = _invoke("generate", "--adapter", run["adapter"], "-p", "12+3=", "--max-new-tokens", 6, "--device", "cpu")
    tokenizer = load_tokenizer(str(run["gguf"]))
    ids = tokenizer("12+3=", return_tensors="pt").input_ids
    with torch.no_grad():
        greedy = _adapted(run, merge=True).generate(ids, max_new_tokens=6, do_sample=False)
    expected = "12+3=" + tokenizer.decode(greedy[0, ids.shape[1] :], skip_special_tokens=True)
    assert out.rstrip("\n") == expected


def test_serve_finds_the_base_the_adapter_records(run):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "nora", "serve", "--adapter", f"a={run['adapter']}", "--port", str(port),
               "--device", "cpu", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        tokenizer = load_tokenizer(str(run["gguf"]))
        ids = tokenizer("12+3=", return_tensors="pt").input_ids
        with torch.no_grad():
            greedy = _adapted(run).generate(ids, max_new_tokens=6, do_sample=False)  # while the server starts
        expected = tokenizer.decode(greedy[0, ids.shape[1] :], skip_special_tokens=True)
        wait_until_serving(proc, f"http://127.0.0.1:{port}")
        body = {"model": "a", "prompt": "12+3=", "max_tokens": 6, "temperature": 0}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["text"] == expected
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    assert f"nora serve: {run['gguf'].resolve()} with adapters ['a']" in out and "Traceback" not in err


def test_a_gguf_path_that_is_not_there_is_named_with_the_fix(run, tmp_path):
    moved = tmp_path / "adapter"
    shutil.copytree(run["adapter"], moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    gone = str(tmp_path / "gone" / "tiny.gguf")
    config["base_model_name_or_path"] = gone
    (moved / "adapter_config.json").write_text(json.dumps(config))
    named = [rf"the base model the adapter records \(pass --base for another\) {gone}: no such GGUF file"]
    write_task(tmp_path / "data", "ARC-Easy", [_record(i) for i in range(2)])
    refused(["eval", moved, "--tasks", "arc-e", "--data-dir", tmp_path / "data"], *named)
    refused(["export", moved, "-o", tmp_path / "out"], *named)
    refused(["generate", "--adapter", moved, "-p", "1"], *named)
    refused(["serve", "--adapter", f"a={moved}"], *named)
    refused(["eval", moved, "--tasks", "arc-e", "--data-dir", tmp_path / "data", "--base", gone],
            rf"--base {gone}: no such GGUF file. Check the path")  # fmt: skip
    refused(["train", "--model", gone, "--data", run["root"] / "data.json", "-o", tmp_path / "run"],
            rf"--model {gone}: no such GGUF file")  # fmt: skip
    refused(["export", run["adapter"], "-o", tmp_path / "out", "--gguf-file", "other.gguf"],
            r"is a GGUF file and --gguf-file names another \(other.gguf\)")  # fmt: skip
