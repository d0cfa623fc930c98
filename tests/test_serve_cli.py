"""`nora serve` as a user runs it: a real process serving a saved base model and adapter on 127.0.0.1, answering
like `generate`, and on SIGTERM finishing the stream in flight before it exits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest
from conftest import tiny_llama
from test_serve_support import load_model, reference, save_adapters, tiny_tokenizer, wait_until_serving
from typer.testing import CliRunner

from nora.cli import app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The tiny model decodes 100 tokens in milliseconds on a fast machine, so the whole stream could sit in the socket
# buffers before SIGTERM arrives. 20 ms per forward (the pace of a real model) keeps the stream in flight at SIGTERM.
_SLOW_SERVE = (
    "import time; from transformers import LlamaForCausalLM as M; f = M.forward; "
    "M.forward = lambda self, *a, **k: (time.sleep(0.02), f(self, *a, **k))[1]; "
    "from nora.cli import app; app()"
)


@pytest.mark.bad_input("serve", "interrupted")
def test_nora_serve_answers_and_drains_on_sigterm(tmp_path):
    base = tmp_path / "base"
    tiny_llama(max_position_embeddings=512).save_pretrained(base)  # the same weights, room for a long answer
    tok = tiny_tokenizer()
    tok.save_pretrained(base)
    adapters = save_adapters(tmp_path / "adapters", names=("a", "c"))
    port = _free_port()
    command = [sys.executable, "-c", _SLOW_SERVE, "serve", "--base", str(base)]
    command += ["--adapter", f"a={adapters['a']}", "--port", str(port), "--device", "cpu", "--log-level", "info"]
    env = {**os.environ, "NORA_API_KEY": "k"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ref_model = load_model({"a": adapters["a"]}, max_position_embeddings=512)  # while the server starts
        ids = tok("the cat sat").input_ids
        short = tok.decode(reference(ref_model, ids, "a", 20), skip_special_tokens=True)
        expected = tok.decode(reference(ref_model, ids, "a", 100), skip_special_tokens=True)
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(proc, url)
        client = httpx.Client(base_url=url, headers={"Authorization": "Bearer k"}, timeout=60)
        body = {"model": "a", "prompt": "the cat sat", "max_tokens": 20, "temperature": 0}
        assert client.post("/v1/completions", json=body).json()["choices"][0]["text"].strip() == short
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
        body["max_tokens"] = 100
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as reply:
            lines = reply.iter_lines()
            first = next(line for line in lines if line)
            proc.send_signal(signal.SIGTERM)  # mid-stream: the server stops taking requests, finishes this one
            rest = [line for line in lines if line]
        chunks = [json.loads(line[6:]) for line in [first, *rest[:-1]]]
        assert rest[-1] == "data: [DONE]"
        assert "".join(c["choices"][0]["text"] for c in chunks).strip() == expected
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, -signal.SIGTERM), err
        assert "Traceback" not in err and "Finished server process" in err
        assert "Waiting for connections to close" in err  # the stream was still running at SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.bad_input("serve", "missing")
@pytest.mark.bad_input("serve", "malformed")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--adapter", "nonsense"], "NAME=PATH"),
        (["--adapter", "a=/no/such/dir"], "not a directory"),
        (["--adapter-root", "/no/such/dir"], "not a directory"),
        (["--reserve-adapters", "-5"], "--reserve-adapters"),
    ],
)
def test_nora_serve_refuses_bad_arguments_before_loading_anything(args, message):
    result = CliRunner().invoke(app, ["serve", "--base", "unused", *args])
    assert result.exit_code == 2 and message in result.output
