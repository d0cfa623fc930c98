"""No tenant hurts another in `nora serve` (loopback only, bounded counts and times):

- a malformed adapter posted to /v1/adapters is refused with 400 naming the tensor or file (it was 201 for NaN and
  int64 tensors, an opaque 500 for a truncated file or a lora_B of the wrong rank), and serving goes on;
- adapters whose files are valid but fail while serving (weights that overflow to NaN logits; a layer that raises
  on the decode step, or on the prefill) fail their own requests only: under many concurrent requests across
  healthy and poisoned adapters, mixed in the same batches, every healthy response is identical to a server
  without the poisoned adapters, and each poisoned one ends with a structured error (500, or an error event and
  [DONE] on a stream);
- graceful shutdown (`--shutdown-timeout 1`) ends every stream with an error event and [DONE], a whole-body
  request with 503, and logs no traceback, also for a client that went away.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file
from test_adapter_validation import damaged, make_adapters
from test_serve_support import WORDS, load_model, save_adapters, serving, tiny_tokenizer, wait_until_serving

import nora
from nora.methods import METHODS
from nora.methods.base import Variant
from nora.methods.lora import LoRA, LoraConfig
from nora.serving import Engine, EngineConfig, Server, ServerSettings


# ---- adapters whose files are valid and which fail while serving -----------------------------------------------
@dataclass
class FaultConfig(LoraConfig):
    method = "fault-test"
    fail_on: str = "decode"  # "decode": one-token steps; "prefill": the prompt pass


class FaultVariant(Variant):
    """LoRA's forward, except that it raises on the pass its config names: a fault in one adapter's layer."""

    def forward(self, method, core, x, base_out, W, bias, apply):
        one_token = x.shape[-2] == 1
        if one_token == (core.config.fail_on == "decode"):
            raise RuntimeError(f"injected fault on the {core.config.fail_on} pass")
        return base_out + apply(method.terms(core, None), x).to(base_out.dtype)

    def merge(self, method, core, W):
        return W + (core.scale * core["lora_B"] @ core["lora_A"]).to(W.dtype), None

    def unmerge(self, method, core, W, cache):
        return W - (core.scale * core["lora_B"] @ core["lora_A"]).to(W.dtype)


class Fault(LoRA):
    name = "fault-test"
    config_cls = FaultConfig
    variant = FaultVariant()


@pytest.fixture(autouse=True, scope="module")
def _fault_method():
    METHODS[Fault.name] = Fault()
    yield
    del METHODS[Fault.name]


def overflowing(source: Path, target: Path) -> Path:
    """A copy of a healthy adapter with every tensor scaled by 1e18: finite, so loading takes it, but its forward
    overflows float32 and its logits come out NaN."""
    target.mkdir()
    (target / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    tensors = {k: v * 1e18 for k, v in load_file(source / "adapter_model.safetensors").items()}
    save_file(tensors, target / "adapter_model.safetensors")
    return target


def faulty(root: Path, fail_on: str) -> Path:
    torch.manual_seed(3)
    model = nora.get_peft_model(tiny_llama(), FaultConfig(r=4, fail_on=fail_on))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(root / f"fault-{fail_on}")
    return root / f"fault-{fail_on}"


# ---- servers on loopback ------------------------------------------------------------------------------------------
@contextmanager
def running(engine: Engine, settings: ServerSettings):
    """`Server` (as `nora serve` runs it) on a free port of 127.0.0.1 in a background thread; yields a client."""
    server = Server(engine, settings, log_config=None, log_level="warning")
    with serving(server) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    root = tmp_path_factory.mktemp("tenants")
    healthy = save_adapters(root / "healthy")  # a, b: NoRA (resident slots); c: LoRA (modules)
    poisoned = {
        "overflow": overflowing(healthy["a"], root / "overflow"),
        "fault-decode": faulty(root, "decode"),
        "fault-prefill": faulty(root, "prefill"),
    }
    return healthy, poisoned


# ---- malformed adapters posted to /v1/adapters --------------------------------------------------------------------
def _wrong_rank_b(directory: Path) -> str:
    weights = directory / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key] = torch.cat([tensors[key], tensors[key][:, :1]], dim=1)  # out × (r + 1)
    save_file(tensors, weights)
    return key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")


@pytest.mark.bad_input("serve", "malformed")
@pytest.mark.bad_input("serve", "hostile")
def test_a_malformed_adapter_gets_400_naming_the_tensor_and_serving_goes_on(tmp_path, tok):
    sources = make_adapters(tmp_path / "sources")
    root = tmp_path / "root"
    root.mkdir()
    posted = {}
    cases = [("nora", "nan"), ("nora", "int64"), ("lora", "inf"), ("peft", "truncated"), ("peft", "missing-tensor"),
             ("peft", "dora-flag-without-magnitudes"), ("nora", "wrong-shape")]  # fmt: skip
    for kind, case in cases:
        directory, named = damaged(sources, kind, case, root)
        posted[directory.name] = named
    wrong = shutil.copytree(sources["peft"], root / "peft-wrong-rank-b")
    posted[wrong.name] = _wrong_rank_b(wrong)
    engine = Engine(load_model({"a": save_adapters(tmp_path / "good", ("a",))["a"]}), tok, EngineConfig(4))
    with running(engine, ServerSettings(adapter_root=root)) as client:
        for name, named in posted.items():
            reply = client.post("/v1/adapters", json={"name": name, "path": name})
            assert reply.status_code == 400, (name, reply.text)
            error = reply.json()["error"]
            assert error["code"] == "invalid_adapter" and error["param"] == "path", (name, error)
            assert named in error["message"], (name, error["message"])
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [nora.BASE, "a"]
        body = {"model": "a", "prompt": "the cat sat", "max_tokens": 5, "temperature": 0}
        assert client.post("/v1/completions", json=body).status_code == 200


# ---- the load test ------------------------------------------------------------------------------------------------
def _requests(adapters: list[str], count: int) -> list[dict]:
    """`count` requests cycling over `adapters`: varied prompts and lengths, greedy and seeded sampling, half
    streamed."""
    out = []
    for i in range(count):
        words = [WORDS[4 + (7 * i + 3 * j) % (len(WORDS) - 4)] for j in range(2 + i % 5)]
        sampled = i % 4 == 3
        out.append({"model": adapters[i % len(adapters)], "prompt": " ".join(words), "max_tokens": 6 + i % 9,
                    "temperature": 0.8 if sampled else 0, "seed": i if sampled else None,
                    "stream": i % 2 == 0})  # fmt: skip
    return out


def _ask(client: httpx.Client, body: dict) -> dict:
    """What one request got: the text (and finish reason) of a success, or the structured error."""
    if not body["stream"]:
        reply = client.post("/v1/completions", json=body)
        payload = reply.json()
        if reply.status_code != 200:
            return {"status": reply.status_code, "error": payload["error"]}
        choice = payload["choices"][0]
        return {"status": 200, "text": choice["text"], "finish": choice["finish_reason"]}
    events = []
    with client.stream("POST", "/v1/completions", json=body) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    assert events and events[-1] == "[DONE]", events  # every stream ends with [DONE]
    errors = [e["error"] for e in events[:-1] if "error" in e]
    if errors:
        return {"status": "stream-error", "error": errors[0]}
    chunks = events[:-1]
    return {"status": 200, "text": "".join(c["choices"][0]["text"] for c in chunks),
            "finish": chunks[-1]["choices"][0]["finish_reason"]}  # fmt: skip


def _ask_all(client: httpx.Client, requests: list[dict]) -> list[dict]:
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda body: _ask(client, body), requests))


@pytest.mark.bad_input("serve", "hostile")
def test_many_concurrent_requests_poisoned_adapters_fail_alone(tenants, tok, caplog):
    healthy, poisoned = tenants
    names = [*healthy, nora.BASE, *poisoned]
    requests = _requests(names, 6 * len(names))  # 42 requests, 6 per adapter
    config = EngineConfig(max_batch_size=16, batch_window_s=0.2)  # a burst gathers: poisoned rows batch with others
    with caplog.at_level(logging.INFO):
        everyone = Engine(load_model({**healthy, **poisoned}), tok, config)
        with running(everyone, ServerSettings()) as client:
            mixed = _ask_all(client, requests)
    clean = Engine(load_model(healthy), tok, config)
    with running(clean, ServerSettings()) as client:
        alone = _ask_all(client, [body for body in requests if body["model"] not in poisoned])
    expected = iter(alone)
    for body, got in zip(requests, mixed, strict=True):
        if body["model"] in poisoned:
            assert got["status"] == (500 if not body["stream"] else "stream-error"), (body, got)
            assert got["error"]["code"] == "adapter_failed" and f"adapter {body['model']!r}" in got["error"]["message"]
        else:
            reference = next(expected)
            assert reference["status"] == 200 and got == reference, (body, got, reference)
    assert everyone.stats["peak_rows"] > 7  # the burst was decoded together
    logged = caplog.text
    assert "decode step failed for adapter 'fault-decode'; its" in logged  # a shared step failed and was rerun
    assert "prefill failed for fault-prefill" in logged and "computed non-finite logits" in logged


# ---- graceful shutdown --------------------------------------------------------------------------------------------
# 20 ms per forward (a real model's pace), so that the streams are still running when SIGTERM arrives
_SLOW_SERVE = (
    "import time; from transformers import LlamaForCausalLM as M; f = M.forward; "
    "M.forward = lambda self, *a, **k: (time.sleep(0.02), f(self, *a, **k))[1]; "
    "from nora.cli import app; app()"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.bad_input("serve", "interrupted")
def test_shutdown_ends_every_stream_with_an_error_event_and_done_and_logs_no_traceback(tmp_path):
    base = tmp_path / "base"
    tiny_llama(max_position_embeddings=1024).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    adapters = save_adapters(tmp_path / "adapters", names=("a",))
    port = _free_port()
    command = [sys.executable, "-c", _SLOW_SERVE, "serve", "--base", str(base), "--adapter", f"a={adapters['a']}",
               "--port", str(port), "--device", "cpu", "--shutdown-timeout", "1", "--max-batch-size", "64"]  # fmt: skip
    proc = subprocess.Popen(command, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, url)
        count = 50
        started = threading.Barrier(count + 3)
        body = {"model": "a", "prompt": "the cat", "max_tokens": 900, "temperature": 0}

        def stream(_: int) -> list[str]:
            lines = []
            with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as reply:
                for line in reply.iter_lines():
                    if line:
                        lines.append(line)
                        if len(lines) == 1:
                            started.wait()
            return lines

        def whole() -> httpx.Response:
            with httpx.Client(timeout=60) as client:
                started.wait()
                return client.post(f"{url}/v1/completions", json=body)

        def goes_away() -> None:  # a client that closes its stream before the shutdown
            with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as reply:
                next(line for line in reply.iter_lines() if line)
            started.wait()

        with ThreadPoolExecutor(count + 2) as pool:
            streams = [pool.submit(stream, i) for i in range(count)]
            single, gone = pool.submit(whole), pool.submit(goes_away)
            started.wait(timeout=60)
            time.sleep(0.3)
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            results = [s.result(timeout=60) for s in streams]
            reply = single.result(timeout=60)
            gone.result(timeout=60)
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - sent < 15, "the shutdown took too long"
        for lines in results:
            assert lines[-1] == "data: [DONE]", lines[-3:]
            last = json.loads(lines[-2][6:])
            assert last["error"]["code"] == "server_shutdown" and last["index"] == 0, last
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "server_shutdown", reply.text
        assert proc.returncode in (0, -signal.SIGTERM), err
        assert "Traceback" not in err and "CancelledError" not in err, err[-3000:]
        assert "Finished server process" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
