"""Shared parts of the serving tests (no tests here): a tiny real tokenizer for the tiny Llama, adapters saved to
disk, and greedy references computed one adapter at a time with `generate`."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from conftest import tiny_llama

import nora

_TEXT = (
    "system user assistant the a cat dog sat on mat and ran to big small red blue green house tree sun moon "
    "star sky sea fish bird is was very happy sad one two three four five six seven eight nine ten up down "
    "left right in out yes no hello world good bad day night it he she we"
)
WORDS = _TEXT.split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = (
    "<s>{% for m in messages %}{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}assistant{% endif %}"
)
ADAPTERS = {"a": nora.NoraConfig(r=12, inner_r=3), "b": nora.NoraConfig(r=12, inner_r=3), "c": nora.LoraConfig(r=4)}


def tiny_tokenizer(chat: bool = True):
    """A word-level sentencepiece-style tokenizer over exactly the tiny Llama's 64 ids (BOS 1, EOS 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + ["▁" + w for w in WORDS])}
    assert len(vocab) == 64
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def perturb(model: nora.AdaptedModel, name: str, seed: int) -> None:
    """Move an adapter away from its identity init, so each adapter generates differently."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers().values():
            for p in layer.adapters[name].parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=g))


def save_adapters(root: Path, names=tuple(ADAPTERS)) -> dict[str, Path]:
    """Train-free adapters for the tiny Llama (seed 0), saved as root/<name>."""
    first, *rest = names
    model = nora.get_peft_model(tiny_llama(), ADAPTERS[first], adapter_name=first)
    for name in rest:
        model.add_adapter(name, ADAPTERS[name])
    for i, name in enumerate(names):
        perturb(model, name, 100 + i)
    model.save_pretrained(root, selected_adapters=list(names))
    return {name: root / name for name in names}


def load_model(paths: dict[str, Path], **overrides) -> nora.AdaptedModel:
    """The tiny Llama (seed 0; `overrides` change its config) with the adapters saved at `paths`."""
    (first, path), *rest = paths.items()
    model = nora.AdaptedModel.from_pretrained(tiny_llama(**overrides), path, first)
    for name, p in rest:
        model.load_adapter(p, name)
    model.eval_mode_frozen()
    return model.eval()


@torch.no_grad()
def reference(model: nora.AdaptedModel, prompt_ids: list[int], adapter: str, max_tokens: int) -> list[int]:
    """Greedy tokens of `generate` for one prompt under one adapter alone (EOS dropped), as the engine returns."""
    kw = dict(max_new_tokens=max_tokens, do_sample=False, pad_token_id=0, eos_token_id=2)
    ids = torch.tensor([prompt_ids])
    if adapter == nora.BASE:
        with model.disable_adapter():
            out = model.generate(input_ids=ids, **kw)
    else:
        model.set_adapter(adapter)
        out = model.generate(input_ids=ids, **kw)
    return [t for t in out[0, len(prompt_ids) :].tolist() if t != 2]


@contextmanager
def serving(app) -> Iterator[str]:
    """Run `app` with uvicorn (or `app` itself where it is a uvicorn Server, as nora.serving.Server is) on a free port
    of 127.0.0.1 in a background thread; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    # Accepted connections inherit this. Without it every request on this socket took 44 ms instead of 1.4 ms (a
    # response sent in more than one write waits out Nagle's algorithm against the client's delayed ACK); a socket
    # uvicorn binds itself, as `nora serve` does, measured 1.3 ms
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    server = app if isinstance(app, uvicorn.Server) else uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


def wait_until_serving(proc: subprocess.Popen, url: str, seconds: float = 120) -> None:
    """Poll a `nora serve` process's /health until it answers 200; fail with its stderr if it exits first."""
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "nora serve did not come up"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
