"""Prompts longer than the model's context: nora cuts their start (as lm-evaluation-harness does), counts them per
task and protocol in the results and the eval JSON, and warns once, naming how many and the context length;
transformers' misleading 'indexing errors' line (nothing is indexed out of range: nora cut the prompt) is gone."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from conftest import tiny_llama
from test_eval_fewshot import _record
from test_eval_support import BYTE_VOCAB, byte_tokenizer, write_task
from typer.testing import CliRunner

from nora.cli import app
from nora.evaluation import LoglikRequest, continuation_logliks, evaluate_tasks

CONTEXT = 512  # a zero-shot prompt (~300 bytes, one token each) fits; one with two solved examples (~900) does not
ITEMS = 6


def _model():
    return tiny_llama(0, vocab_size=BYTE_VOCAB, max_position_embeddings=CONTEXT, pad_token_id=256, eos_token_id=257)


def _tokenizer():
    tokenizer = byte_tokenizer()
    tokenizer.model_max_length = CONTEXT  # what transformers compares a long text with, to print its warning
    return tokenizer


@pytest.fixture
def data_dir(tmp_path):
    write_task(tmp_path / "data", "ARC-Easy", [_record(i) for i in range(ITEMS)])
    return tmp_path / "data"


@contextmanager
def transformers_log() -> Iterator[list[str]]:
    """What transformers logs meanwhile (its handler writes to the stderr of whichever test first imported it)."""
    lines: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("transformers").addHandler(handler)
    try:
        yield lines
    finally:
        logging.getLogger("transformers").removeHandler(handler)


def _evaluate(data_dir, num_fewshot: int):
    with warnings.catch_warnings(record=True) as caught, transformers_log() as logged:
        warnings.simplefilter("always")
        results = evaluate_tasks(_model(), _tokenizer(), ["arc-e"], ["loglik", "generate"], data_dir=data_dir,
                                 num_fewshot=num_fewshot, log_samples=True, max_new_tokens=4)  # fmt: skip
    assert not [line for line in logged if "indexing errors" in line]
    return results, [str(w.message) for w in caught if "context" in str(w.message)]


def test_prompts_cut_to_fit_are_counted_and_warned_of_once(data_dir):
    results, said = _evaluate(data_dir, num_fewshot=2)
    prompts = [s["prompt"] for s in results["loglik"]["tasks"]["ARC-Easy"]["samples"]]
    assert min(len(p.encode()) for p in prompts) > CONTEXT  # byte tokens: every prompt is longer than the context
    for protocol in ("loglik", "generate"):
        metrics = results[protocol]["tasks"]["ARC-Easy"]
        assert (metrics["truncated"], metrics["context"]) == (ITEMS, CONTEXT)
    assert said == [
        f"{2 * ITEMS} of {2 * ITEMS} commonsense prompt(s) were longer than the model's {CONTEXT}-token context and "
        f"lost their beginning (left-truncated to fit): ARC-Easy loglik {ITEMS}, ARC-Easy generate {ITEMS}. "
        "Fewer few-shot examples (--num-fewshot) keep them whole."
    ]

    results, said = _evaluate(data_dir, num_fewshot=0)
    prompts = [s["prompt"] for s in results["loglik"]["tasks"]["ARC-Easy"]["samples"]]
    assert max(len(p.encode()) for p in prompts) < CONTEXT - 50  # these fit, with room for any choice
    assert [results[p]["tasks"]["ARC-Easy"]["truncated"] for p in ("loglik", "generate")] == [0, 0] and not said


def test_scoring_alone_warns_of_the_prompts_it_cut():
    requests = [LoglikRequest("1 2 3 " * 200, ("4",)), LoglikRequest("1 2 3", ("4",))]
    said = rf"1 of 2 log-likelihood prompt\(s\) were longer than the model's {CONTEXT}-token context"
    with transformers_log() as logged, pytest.warns(UserWarning, match=said):
        continuation_logliks(_model(), _tokenizer(), requests)
    assert not [line for line in logged if "indexing errors" in line]


def test_nora_eval_records_the_count_in_its_json_and_says_it_once(data_dir, tmp_path):
    _model().save_pretrained(tmp_path / "model")
    _tokenizer().save_pretrained(tmp_path / "model")
    out = tmp_path / "results.json"
    args = ["eval", tmp_path / "model", "--tasks", "arc-e", "--data-dir", data_dir, "--num-fewshot", 2, "-o", out]
    with transformers_log() as logged, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # each warning given is recorded, whatever earlier tests gave
        result = CliRunner().invoke(app, [*map(str, args), "--no-progress"])
    assert result.exit_code == 0, result.output
    said = [str(w.message) for w in caught]
    assert sum(f"longer than the model's {CONTEXT}-token context" in m for m in said) == 1, said
    assert not [line for line in logged if "indexing errors" in line]
    assert json.loads(out.read_text())["results"]["loglik"]["tasks"]["ARC-Easy"]["truncated"] == ITEMS
