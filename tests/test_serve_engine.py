"""The serving engine on a tiny Llama with real adapters: batches that mix adapters (and rows that join a running
batch) give exactly the greedy tokens of `generate` run one adapter at a time; sampling, stop strings, EOS,
cancellation, adapter load/unload between steps, and bad input."""

from __future__ import annotations

import queue
import threading

import pytest
import torch
from test_serve_support import load_model, reference, save_adapters, tiny_tokenizer

import nora
from nora.serving import Engine, EngineConfig, SamplingParams
from nora.serving.errors import BadRequest, Busy, LimitExceeded, NotFound
from nora.serving.text_stream import TextStream

PROMPTS = [
    "the cat sat on the mat",
    "hello",
    "one two three four five six seven eight",
    "big red house",
    "sky sea fish bird",
    "good day",
    "the dog ran to the big tree and sat",
    "we",
]
ADAPTERS = ["a", "b", nora.BASE, "c", "a", "c", "b", nora.BASE]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return save_adapters(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def ref_model(adapters):
    return load_model(adapters)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _engine(adapters, tok, names=("a", "b", "c"), **config) -> Engine:
    model = load_model({n: adapters[n] for n in names})
    return Engine(model, tok, EngineConfig(**{"max_batch_size": 8, "batch_window_s": 0.2, **config}))


def _all_at_once(engine: Engine, jobs: list[tuple[list[int], str, SamplingParams]]):
    """Submit every job from its own thread at the same moment; returns the completions in order."""
    results: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        barrier.wait()
        results[i] = engine.generate(*jobs[i], timeout=60)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_mixed_batch_equals_each_adapter_alone(adapters, ref_model, tok):
    jobs = [(tok(p).input_ids, a, GREEDY) for p, a in zip(PROMPTS, ADAPTERS, strict=True)]
    with _engine(adapters, tok) as engine:
        results = _all_at_once(engine, jobs)
        assert engine.stats["peak_rows"] >= 4  # the prompts really shared batches
    distinct = set()
    for (ids, adapter, params), done in zip(jobs, results, strict=True):
        expected = reference(ref_model, ids, adapter, params.max_tokens)
        assert done.token_ids == expected, adapter
        assert done.finish_reason == ("length" if len(expected) == params.max_tokens else "stop")
        assert done.text.strip() == tok.decode(expected, skip_special_tokens=True)
        assert (done.prompt_tokens, done.completion_tokens) == (len(ids), len(expected))
        distinct.add(tuple(expected))
    assert len(distinct) >= 6  # the adapters really differ


def test_rows_that_join_a_running_batch_match_too(adapters, ref_model, tok):
    """Later requests join while a long one decodes: first a wave with longer prompts (the running rows get
    padded), then a short prompt (the newcomer gets padded); padding is trimmed as rows leave."""
    long_ids = tok(PROMPTS[1]).input_ids
    waves = {
        1: [(tok(p).input_ids, a, 3 + 2 * i) for i, (p, a) in enumerate(zip(PROMPTS[:5], ADAPTERS[:5], strict=True))],
        10: [(tok(PROMPTS[7]).input_ids, "c", 5)],
    }
    late = [job for wave in waves.values() for job in wave]
    done: dict[int, list[int]] = {}
    finished = queue.SimpleQueue()
    seen = []
    with _engine(adapters, tok, batch_window_s=0.0) as engine:

        def long_sink(event):
            seen.append(event)
            for ids, adapter, max_tokens in waves.get(len(seen), []):  # on the worker: they join at the next step
                i = late.index((ids, adapter, max_tokens))
                engine.submit(ids, adapter, SamplingParams(max_tokens, 0.0), _collector(i, done, finished))
            _collector(-1, done, finished)(event)

        engine.submit(long_ids, "b", SamplingParams(40, 0.0), long_sink)
        for _ in range(len(late) + 1):
            finished.get(timeout=60)
        assert engine.stats["prefills"] == 3 and engine.stats["peak_rows"] == 6
    assert done[-1] == reference(ref_model, long_ids, "b", 40)
    for i, (ids, adapter, max_tokens) in enumerate(late):
        assert done[i] == reference(ref_model, ids, adapter, max_tokens), i


def _collector(i, done, finished):
    def sink(event):
        if event.finish_reason:
            done[i] = list(event.token_ids)
            finished.put(i)

    return sink


def test_seeded_sampling_does_not_depend_on_batch_mates(adapters, tok):
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.8, seed=1234)
    ids = tok(PROMPTS[0]).input_ids
    with _engine(adapters, tok) as engine:
        alone = engine.generate(ids, "a", params).token_ids
        jobs = [(ids, "a", params)] + [(tok(p).input_ids, "b", params) for p in PROMPTS[1:5]]
        together = _all_at_once(engine, jobs)[0].token_ids
        others = [engine.generate(ids, "a", SamplingParams(10, 0.9, 0.8, seed)).token_ids for seed in (1, 2)]
    assert alone == together
    assert others[0] != alone or others[1] != alone


def test_stop_strings_and_eos_end_a_row(adapters, ref_model, tok):
    ids = tok(PROMPTS[0]).input_ids
    expected = reference(ref_model, ids, "a", 12)
    words = tok.decode(expected).split()
    # a word that is new at its place and followed by another: " word " first occurs there
    i = next(i for i in range(2, len(words) - 1) if words[i] not in words[:i])
    # a token id the greedy text reaches for the first time at step k ≥ 3, to be declared an EOS id
    k = next(k for k in range(3, len(expected)) if expected[k] not in expected[:k])
    with _engine(adapters, tok) as engine:
        cut = engine.generate(ids, "a", SamplingParams(12, 0.0, stop=(f" {words[i]} ", "never")))
        engine.eos_ids.add(expected[k])
        eos = engine.generate(ids, "a", GREEDY)
    assert cut.finish_reason == "stop" and cut.text == " " + " ".join(words[:i])
    assert eos.finish_reason == "stop" and eos.token_ids == expected[:k]


def test_unload_waits_for_running_rows_and_load_leaves_them_untouched(adapters, ref_model, tok):
    ids = tok(PROMPTS[2]).input_ids
    done: dict[int, list[int]] = {}
    finished = queue.SimpleQueue()
    ops = {}
    with _engine(adapters, tok, names=("a", "b")) as engine:
        started = threading.Event()

        def sink(event):
            if not started.is_set():
                started.set()
                ops["unload"] = engine.request_unload("a")
                ops["load"] = engine.request_load("c", str(adapters["c"]))
            _collector(0, done, finished)(event)

        engine.submit(ids, "a", SamplingParams(30, 0.0), sink)
        assert finished.get(timeout=60) == 0
        assert ops["unload"].result(60) >= 0 and ops["load"].result(60) >= 0
        with pytest.raises(NotFound, match="not loaded"):
            engine.generate(ids, "a", GREEDY)
        after_load = engine.generate(ids, "c", GREEDY).token_ids
        assert [a.name for a in engine.adapters()] == ["b", "c"]
    assert done[0] == reference(ref_model, ids, "a", 30)
    assert after_load == reference(ref_model, ids, "c", GREEDY.max_tokens)


def test_a_cancelled_request_ends_with_abort_and_the_others_finish(adapters, ref_model, tok):
    ids = tok(PROMPTS[3]).input_ids
    with _engine(adapters, tok) as engine:
        events = queue.SimpleQueue()
        request = engine.submit(ids, "b", SamplingParams(40, 0.0), events.put)
        request.cancel()
        ok = engine.generate(ids, "c", GREEDY)
        last = events.get(timeout=60)
        while last.finish_reason is None:
            last = events.get(timeout=60)
    assert last.finish_reason == "abort" and last.completion_tokens < 40
    assert ok.token_ids == reference(ref_model, ids, "c", GREEDY.max_tokens)


def test_bad_input_is_refused_with_a_clear_error(adapters, tok):
    engine = _engine(adapters, tok)
    with pytest.raises(NotFound, match=r"'zz' is not loaded.*POST /v1/adapters"):
        engine.submit([1, 5], "zz", GREEDY, print)
    with pytest.raises(BadRequest, match="empty"):
        engine.submit([], "a", GREEDY, print)
    with pytest.raises(BadRequest, match=r"\[0, 64\)"):
        engine.submit([1, 64], "a", GREEDY, print)
    with pytest.raises(LimitExceeded, match="context of 64 tokens"):
        engine.submit([1] * 60, "a", SamplingParams(max_tokens=5), print)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(BadRequest, match="without '.'"):
        engine.request_load("x.y", str(adapters["c"]))
    engine.stop()
    with pytest.raises(Busy, match="shutting down"):
        engine.submit([1, 5], "a", GREEDY, print)


def test_a_broken_adapter_file_fails_the_load_and_serving_goes_on(adapters, ref_model, tok, tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")
    ids = tok(PROMPTS[1]).input_ids
    with _engine(adapters, tok, names=("a",)) as engine:
        with pytest.raises(BadRequest, match="not valid JSON"):
            engine.load_adapter("broken", str(tmp_path), timeout=60)
        assert [a.name for a in engine.adapters()] == ["a"]
        assert engine.generate(ids, "a", GREEDY).token_ids == reference(ref_model, ids, "a", GREEDY.max_tokens)


def test_text_stream_holds_back_what_may_become_a_stop_string(tok):
    ids = tok("one two three four five").input_ids[1:]
    stream = TextStream(tok, stop=("three four", "five six"), prompt_ids=tok("hello").input_ids)
    pieces = [stream.push(i) for i in ids]
    assert pieces[:3] == [" one", " two", " "]  # "three" may start "three four": held back
    assert stream.stopped and stream.text == " one two " and pieces[3:] == ["", ""]
    plain = TextStream(tok, stop=("five six",))
    out = [plain.push(i) for i in ids]
    assert out[-1] == " " and plain.finish() == "five"  # held back, then released at the end
    assert "".join(out) + "five" == plain.text == "one two three four five"


@torch.no_grad()
def test_engine_serves_a_bare_model_until_an_adapter_is_loaded(adapters, ref_model, tok):
    from conftest import tiny_llama

    ids = tok(PROMPTS[4]).input_ids
    with Engine(tiny_llama(), tok, EngineConfig(max_batch_size=4, reserve_adapters=100)) as engine:
        base = engine.generate(ids, nora.BASE, GREEDY).token_ids
        assert engine.load_adapter("c", str(adapters["c"]), timeout=60) < 10_000
        jobs = [(ids, "c", GREEDY), (ids, nora.BASE, GREEDY)]
        with_c, base_again = (r.token_ids for r in _all_at_once(engine, jobs))
        assert engine.load_adapter("a", str(adapters["a"]), timeout=60) < 10_000
        bank = engine.model.resident_bank("a")  # an inference-only slot, no module per layer
        assert bank is not None and bank.capacity == 100  # reserved when the bare model became an AdaptedModel
        assert not any(m.training for m in engine.model.modules())
        assert not any(p.requires_grad for p in engine.model.parameters())
        with_a = engine.generate(ids, "a", GREEDY).token_ids
    assert base == base_again == reference(ref_model, ids, nora.BASE, GREEDY.max_tokens)
    assert with_c == reference(ref_model, ids, "c", GREEDY.max_tokens)
    assert with_a == reference(ref_model, ids, "a", GREEDY.max_tokens)
