"""The OpenAI-compatible server over real HTTP on 127.0.0.1 (uvicorn in a background thread): concurrent requests
for different adapters each get the one-adapter-at-a-time answer; streaming; adapters loaded and unloaded while
serving; every kind of bad request gets its status code and a clear message, and the server keeps serving."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from test_serve_support import load_model, reference, save_adapters, serving, tiny_tokenizer

import nora
from nora.serving import Engine, EngineConfig, ServerSettings, create_app

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = dict(max_prompt_tokens=32, max_new_tokens=24, max_request_bytes=4000)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return save_adapters(tmp_path_factory.mktemp("adapter-root"))


@pytest.fixture(scope="module")
def ref_model(adapters):
    return load_model(adapters)


@pytest.fixture(scope="module")
def engine(adapters, tok):
    return Engine(load_model({n: adapters[n] for n in ("a", "b")}), tok, EngineConfig(8, batch_window_s=0.1))


@pytest.fixture(scope="module")
def server(adapters, engine):
    settings = ServerSettings(api_key=KEY, adapter_root=adapters["a"].parent, base_name="tiny-llama", **LIMITS)
    with serving(create_app(engine, settings)) as url, httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        yield client


def _completion(client, model, prompt, max_tokens=10, **extra):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return client.post("/v1/completions", json=body)


def _chat_ids(tok, messages):
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


def _expect(reply, ref_model, tok, ids, adapter, max_tokens, chat=False):
    assert reply.status_code == 200, reply.text
    body = reply.json()
    expected = reference(ref_model, ids, adapter, max_tokens)
    choice = body["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    assert text.strip() == tok.decode(expected, skip_special_tokens=True)
    assert choice["finish_reason"] == ("length" if len(expected) == max_tokens else "stop")
    assert body["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": len(expected),
        "total_tokens": len(ids) + len(expected),
    }


def _sse(lines) -> list:
    """The `data:` payloads of a Server-Sent Events body, JSON-decoded except the final "[DONE]"."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", line
    return out


def test_models_lists_the_base_and_the_adapters(server):
    reply = server.get("/v1/models")
    assert reply.status_code == 200
    ids = [m["id"] for m in reply.json()["data"]]
    assert ids == ["tiny-llama", "a", "b"]
    assert server.get("/v1/models/a").json()["parent"] == "tiny-llama"
    assert server.get("/health").json() == {"status": "ok", "adapters": 2}


def test_concurrent_requests_for_different_adapters_get_their_own_answers(server, engine, ref_model, tok):
    prompts = ["the cat sat on the mat", "hello", "one two three four", "big red house", "sky sea fish", "we"]
    models = ["a", "b", "tiny-llama", "a", "b", nora.BASE]
    chats = [[{"role": "user", "content": p}] for p in ("hello world", "good day")]
    chat_models = ["b", "a"]
    barrier = threading.Barrier(len(prompts) + len(chats))
    replies: dict = {}

    def complete(i):
        barrier.wait()
        replies[i] = _completion(server, models[i], prompts[i], max_tokens=12 + i)

    def chat(i):
        barrier.wait()
        body = {"model": chat_models[i], "messages": chats[i], "max_tokens": 8, "temperature": 0}
        replies[("chat", i)] = server.post("/v1/chat/completions", json=body)

    threads = [threading.Thread(target=complete, args=(i,)) for i in range(len(prompts))]
    threads += [threading.Thread(target=chat, args=(i,)) for i in range(len(chats))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, prompt in enumerate(prompts):
        adapter = nora.BASE if models[i] in ("tiny-llama", nora.BASE) else models[i]
        _expect(replies[i], ref_model, tok, tok(prompt).input_ids, adapter, 12 + i)
        assert replies[i].json()["model"] == models[i]
    for i, messages in enumerate(chats):
        _expect(replies[("chat", i)], ref_model, tok, _chat_ids(tok, messages), chat_models[i], 8, chat=True)
    assert engine.stats["peak_rows"] >= 2  # requests over HTTP were decoded together


@pytest.mark.parametrize("chat", [False, True])
def test_streaming_sends_openai_chunks_then_done(server, chat):
    if chat:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "the sun"}]}
    else:
        path, body = "/v1/completions", {"prompt": "the sun"}
    body.update(model="a", max_tokens=9, temperature=0)
    whole = server.post(path, json=body).json()
    with server.stream("POST", path, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    usage, chunks = events[-2], events[:-2]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    if chat:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == whole["choices"][0]["message"]["content"]
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert text == whole["choices"][0]["text"]
    assert len(chunks) > 2 and [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"


def _chunked(data: bytes):
    yield data[: len(data) // 2]
    yield data[len(data) // 2 :]


JSON = {"Content-Type": "application/json"}
BAD_REQUESTS = {
    "unknown adapter": (dict(json={"model": "nope", "prompt": "hi"}), 404, "'nope' is not loaded"),
    "bad JSON": (dict(content=b'{"model": "a", "prompt": ', headers=JSON), 400, "not valid JSON"),
    "not an object": (dict(content=b"hello", headers={"Content-Type": "text/plain"}), 400, "JSON object"),
    "oversize (Content-Length)": (dict(json={"model": "a", "prompt": "the " * 2000}), 413, "4000 bytes"),
    "oversize (chunked)": (dict(content=_chunked(b'{"prompt": "' + b"a " * 3000 + b'"}'), headers=JSON), 413, "4000"),
    "missing token": (dict(json={"model": "a", "prompt": "hi"}, headers={"Authorization": ""}), 401, "missing API"),
    "wrong token": (dict(json={"model": "a", "prompt": "hi"}, headers={"Authorization": "Bearer x"}), 401, "invalid"),
    "max_tokens < 1": (dict(json={"model": "a", "prompt": "hi", "max_tokens": 0}), 422, "max_tokens"),
    "max_tokens over limit": (dict(json={"model": "a", "prompt": "hi", "max_tokens": 25}), 400, "limit of 24"),
    "prompt over limit": (dict(json={"model": "a", "prompt": "the " * 40}), 400, "at most 32"),
    "missing field": (dict(json={"prompt": "hi"}), 422, "model: Field required"),
    "unsupported parameter": (dict(json={"model": "a", "prompt": "hi", "echo": True}), 422, "`echo` is not supported"),
    "temperature out of range": (dict(json={"model": "a", "prompt": "hi", "temperature": 3}), 422, "temperature"),
}


TOO_LARGE = ("oversize (Content-Length)", "oversize (chunked)", "max_tokens over limit", "prompt over limit")


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.bad_input("serve", "too large" if c in TOO_LARGE else "malformed"))
             for c in BAD_REQUESTS]
)  # fmt: skip
def test_bad_requests_get_a_clear_error_and_the_server_keeps_serving(server, ref_model, tok, case):
    kwargs, status, message = BAD_REQUESTS[case]
    reply = server.post("/v1/completions", **kwargs)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert message in error["message"] and error["type"]
    if status == 401:
        assert reply.headers["www-authenticate"] == "Bearer"
    _expect(_completion(server, "b", "good day"), ref_model, tok, tok("good day").input_ids, "b", 10)


def test_adapters_load_and_unload_while_serving(server, adapters, ref_model, tok):
    ids = tok("the dog ran").input_ids
    assert _completion(server, "c", "the dog ran").status_code == 404
    loaded = server.post("/v1/adapters", json={"name": "c", "path": "c"})
    assert loaded.status_code == 201, loaded.text
    assert loaded.json()["id"] == "c" and loaded.json()["load_ms"] > 0
    _expect(_completion(server, "c", "the dog ran"), ref_model, tok, ids, "c", 10)
    # a second copy of NoRA adapter "a" reuses the outer basis already resident: no SVD
    again = server.post("/v1/adapters", json={"name": "a2", "path": str(adapters["a"])})
    assert again.status_code == 201, again.text
    _expect(_completion(server, "a2", "the dog ran"), ref_model, tok, ids, "a", 10)
    times = loaded.json()["load_ms"], again.json()["load_ms"]
    print("\nadapter load over HTTP: LoRA {} ms, NoRA on a resident basis {} ms".format(*times))
    refused = {
        409: server.post("/v1/adapters", json={"name": "c", "path": "c"}),
        403: server.post("/v1/adapters", json={"name": "d", "path": "../.."}),
        404: server.post("/v1/adapters", json={"name": "d", "path": "missing"}),
        400: server.post("/v1/adapters", json={"name": "tiny-llama", "path": "c"}),
        422: server.post("/v1/adapters", json={"name": "d"}),
    }
    for status, reply in refused.items():
        assert reply.status_code == status, reply.text
    assert [m["id"] for m in server.get("/v1/models").json()["data"]] == ["tiny-llama", "a", "b", "c", "a2"]
    for name in ("c", "a2"):
        gone = server.delete(f"/v1/adapters/{name}")
        assert gone.status_code == 200 and gone.json()["deleted"] is True
    assert server.delete("/v1/adapters/c").status_code == 404
    assert _completion(server, "c", "the dog ran").status_code == 404
    _expect(_completion(server, "a", "the dog ran"), ref_model, tok, ids, "a", 10)


def test_chat_needs_a_chat_template_and_loading_needs_an_adapter_root(adapters):
    engine = Engine(load_model({"a": adapters["a"]}), tiny_tokenizer(chat=False))
    with serving(create_app(engine)) as url, httpx.Client(base_url=url, timeout=60) as client:
        body = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
        reply = client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 400 and "no chat template" in reply.json()["error"]["message"]
        reply = client.post("/v1/adapters", json={"name": "c", "path": str(adapters["c"])})
        assert reply.status_code == 403 and "--adapter-root" in reply.json()["error"]["message"]
        assert client.post("/v1/completions", json={"model": "a", "prompt": "hi"}).status_code == 200  # no key set
