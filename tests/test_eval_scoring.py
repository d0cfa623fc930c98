"""Both commonsense protocols on tiny models: known answers, a direct computation, batching and padding."""

from __future__ import annotations

import math

import pytest
import test_eval_support as support
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from test_eval_support import RECORDS, byte_gpt2, byte_llama, byte_tokenizer, items, write_task

import nora
from nora import AdapterError
from nora.evaluation import (
    LoglikRequest,
    best,
    best_per_char,
    continuation_logliks,
    evaluate_tasks,
    generate_responses,
    score_commonsense,
)
from nora.evaluation.classification import accuracy_stderr
from nora.evaluation.report import print_results
from nora.evaluation.runner import average

label_model, text_model = support.label_model, support.text_model  # session fixtures, trained once


def direct_logliks(model, tokenizer, request: LoglikRequest) -> list[float]:
    """One unpadded forward per continuation, summing log-softmax over its tokens (lm-eval's token split)."""
    context = request.context.rstrip()
    moved = request.context[len(context) :]
    n_context = len(tokenizer(context).input_ids)
    scores = []
    for continuation in request.continuations:
        ids = tokenizer(context + moved + continuation).input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        scores.append(sum(logp[t - 1, ids[t]].item() for t in range(n_context, len(ids))))
    return scores


REQUESTS = [
    LoglikRequest("Question: is ice cold?\nAnswer:", (" true", " false")),
    LoglikRequest("### Response:\n", ("a", "the correct answer is answer2", "xyz")),
    LoglikRequest("A much longer context, so the batch is padded. " * 3, ("yes", "no", "maybe", "ok")),
]


@pytest.mark.parametrize("build", [byte_llama, byte_gpt2], ids=["llama-rope", "gpt2-absolute-positions"])
def test_loglik_equals_a_direct_computation(build):
    model, tokenizer = build(), byte_tokenizer()
    got = continuation_logliks(model, tokenizer, REQUESTS, batch_size=3)
    for request, scores in zip(REQUESTS, got, strict=True):
        assert scores == pytest.approx(direct_logliks(model, tokenizer, request), abs=2e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_loglik_batched_equals_unbatched_whatever_the_padding_side(side):
    model, tokenizer = byte_gpt2(), byte_tokenizer(padding_side=side)  # absolute positions: padding shows
    alone = [continuation_logliks(model, tokenizer, [r], batch_size=1)[0] for r in REQUESTS]
    for batch_size in (2, 3):
        batched = continuation_logliks(model, tokenizer, REQUESTS, batch_size=batch_size)
        for a, b in zip(alone, batched, strict=True):
            assert a == pytest.approx(b, abs=1e-4)


def test_known_answers_generation_and_label_loglik(label_model, tmp_path):
    model, tokenizer = label_model
    for name, record in RECORDS.items():
        write_task(tmp_path, name, [record])
    results = evaluate_tasks(model, tokenizer, ["commonsense"], ["generate", "loglik-label"], data_dir=tmp_path)
    assert set(results["generate"]["tasks"]) == set(RECORDS)
    for protocol in ("generate", "loglik-label"):
        assert results[protocol]["average"] == pytest.approx({"tasks": 6, "n": 6, "acc": 1.0, "acc_stderr": 0.0})
    assert all(m["unparsed"] == 0 and m["correct"] == 1 for m in results["generate"]["tasks"].values())


def test_an_untrained_model_does_not_score_the_known_answers():
    tokenizer = byte_tokenizer()
    scored = score_commonsense(byte_llama(), tokenizer, items(), ["generate"], max_new_tokens=8, batch_size=6)
    assert scored["generate"]["acc"] < 1.0 and scored["generate"]["unparsed"] > 0  # garbage is wrong, not a crash


def test_known_answers_choice_loglik(text_model):
    model, tokenizer = text_model
    scored = score_commonsense(model, tokenizer, items(), ["loglik"], batch_size=4, log_samples=True)["loglik"]
    assert (scored["acc"], scored["acc_norm"], scored["n"]) == (1.0, 1.0, 6)
    assert [s["pred"] for s in scored["samples"]] == [i.answer for i in items()]


def test_generation_batched_equals_unbatched_with_a_right_padding_tokenizer(label_model):
    model, tokenizer = label_model
    tokenizer.padding_side = "right"  # a decoder-only model must be left-padded: nora does it itself
    prompts = [i.prompt for i in items()]
    assert len({len(tokenizer(p).input_ids) for p in prompts}) > 1  # rows of different lengths get padded
    batched = generate_responses(model, tokenizer, prompts, batch_size=6, max_new_tokens=8)
    alone = [generate_responses(model, tokenizer, [p], batch_size=1, max_new_tokens=8)[0] for p in prompts]
    assert batched == alone == [i.label_targets[i.gold] for i in items()]
    beams = generate_responses(model, tokenizer, prompts, batch_size=3, max_new_tokens=8, num_beams=2)
    assert beams == batched


def test_acc_norm_divides_by_the_choice_length():
    scores, texts = [-2.0, -10.0], ["a", "a much longer choice text"]
    assert best(scores) == 0 and best_per_char(scores, texts) == 1
    assert best([-1.0, -1.0]) == 0  # ties go to the first choice, as numpy's argmax


@settings(deadline=None)  # the first example imports lm_eval; a busy CPU is not a failure
@given(correct=st.integers(0, 400), extra=st.integers(0, 400))
def test_standard_errors_are_the_binomial_formula_and_lm_evals(correct, extra):
    from lm_eval.api.metrics import mean_stderr

    n = correct + extra
    if n < 2:
        assert accuracy_stderr(correct, n) == 0.0
        return
    p = correct / n
    assert accuracy_stderr(correct, n) == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)), abs=1e-12)
    assert accuracy_stderr(correct, n) == pytest.approx(mean_stderr([1] * correct + [0] * extra), abs=1e-12)


def test_every_accuracy_and_average_reports_its_standard_error():
    model, tokenizer = byte_gpt2(seed=3), byte_tokenizer()
    scored = score_commonsense(model, tokenizer, items(), ["loglik"])["loglik"]
    assert scored["acc_stderr"] == accuracy_stderr(scored["correct"], scored["n"])
    assert scored["acc_norm_stderr"] == accuracy_stderr(scored["correct_norm"], scored["n"])
    a, b = {"n": 100, "acc": 0.5, "acc_stderr": 0.05}, {"n": 100, "acc": 0.7, "acc_stderr": 0.04}
    mean = average({"a": a, "b": b})
    assert mean["acc"] == pytest.approx(0.6) and mean["acc_stderr"] == pytest.approx(math.sqrt(0.05**2 + 0.04**2) / 2)
    console = Console(record=True, width=200)
    print_results({"loglik": {"tasks": {"a": a}, "average": mean}}, console=console)
    text = console.export_text()
    assert "50.0 ± 5.0" in text and "60.0 ± 3.2" in text


def test_acc_norm_of_the_runner_uses_the_choice_texts():
    model, tokenizer = byte_gpt2(seed=3), byte_tokenizer()
    records = items()
    scores = continuation_logliks(model, tokenizer, [LoglikRequest(i.prompt, i.choices) for i in records])
    scored = score_commonsense(model, tokenizer, records, ["loglik"])["loglik"]
    assert scored["correct"] == sum(best(s) == i.gold for i, s in zip(records, scores, strict=True))
    assert scored["correct_norm"] == sum(
        best_per_char(s, i.choices) == i.gold for i, s in zip(records, scores, strict=True)
    )


def test_an_unmerged_adapter_scores_as_its_merged_model():
    tokenizer = byte_tokenizer()
    adapted = nora.get_peft_model(byte_llama(), nora.NoraConfig(r=8, inner_r=2))
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)  # a non-trivial update
    requests = [LoglikRequest(i.prompt, i.choices) for i in items()]
    unmerged = continuation_logliks(adapted, tokenizer, requests, batch_size=4)
    with adapted.disable_adapter():
        base = continuation_logliks(adapted, tokenizer, requests, batch_size=4)
    merged = continuation_logliks(adapted.merge_and_unload(), tokenizer, requests, batch_size=4)
    assert [s for r in unmerged for s in r] == pytest.approx([s for r in merged for s in r], abs=1e-3)
    assert [s for r in unmerged for s in r] != pytest.approx([s for r in base for s in r], abs=1e-3)


def test_bad_requests_are_refused_with_the_reason():
    model, tokenizer = byte_llama(), byte_tokenizer()
    with pytest.raises(AdapterError, match="protocols"):
        evaluate_tasks(model, tokenizer, [], ["accuracy"])
    with pytest.raises(AdapterError, match="batch_size=0"):
        continuation_logliks(model, tokenizer, REQUESTS, batch_size=0)
    with pytest.raises(AdapterError, match="encodes to no tokens"):
        continuation_logliks(model, tokenizer, [LoglikRequest("context", ("",))])
    with pytest.raises(AdapterError, match="no room for the prompt"):
        generate_responses(model, tokenizer, ["hi"], max_new_tokens=2000)
