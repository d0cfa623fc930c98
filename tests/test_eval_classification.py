"""Classification evaluation: metrics on known values, a tiny classifier with known answers, padding."""

from __future__ import annotations

import math

import pytest
import torch
from test_eval_support import BYTE_VOCAB, byte_tokenizer
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from nora.evaluation import classification_metrics, evaluate_tasks, predict_labels
from nora.evaluation.tasks import ClassificationExample

SENTENCES = [
    ("a good film", 1),
    ("a bad film", 0),
    ("good acting and good music", 1),
    ("bad acting", 0),
    ("so good", 1),
    ("so bad , so long", 0),
    ("good", 1),
    ("bad bad bad", 0),
]


def test_metrics_on_known_values():
    m = classification_metrics([0, 0, 1, 1], [0, 1, 1, 1])
    assert (m["n"], m["correct"], m["acc"]) == (4, 3, 0.75)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["mcc"] == pytest.approx(2 / math.sqrt(12))  # (TP·TN − FP·FN) / √((TP+FP)(TP+FN)(TN+FP)(TN+FN))
    assert classification_metrics([0, 1, 1], [1, 0, 0])["mcc"] == pytest.approx(-1.0)
    assert classification_metrics([0, 1, 1, 0], [1, 1, 1, 1])["mcc"] == 0.0  # a constant guess carries nothing


def trained_classifier(tokenizer):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=BYTE_VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=128,
        pad_token_id=256,
    )
    model = BertForSequenceClassification(config)
    enc = tokenizer([s for s, _ in SENTENCES], padding=True, return_tensors="pt")
    labels = torch.tensor([y for _, y in SENTENCES])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        model(**enc, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_known_answers_in_every_glue_layout(tmp_path):
    tokenizer = byte_tokenizer()
    model = trained_classifier(tokenizer)
    layouts = {
        "SST-2": "sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in SENTENCES),
        "CoLA": "".join(f"src\t{y}\t\t{s}\n" for s, y in SENTENCES),
        "MRPC": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        + "".join(f"{y}\t1\t2\t{s}\t{s}\n" for s, y in SENTENCES),
    }
    for task, text in layouts.items():
        (tmp_path / "glue" / task).mkdir(parents=True)
        (tmp_path / "glue" / task / "dev.tsv").write_text(text)
    results = evaluate_tasks(model, tokenizer, ["sst2", "cola"], data_dir=tmp_path, batch_size=3)["classification"]
    for task in ("SST-2", "CoLA"):
        assert {k: results["tasks"][task][k] for k in ("n", "acc", "macro_f1", "mcc")} == {
            "n": 8,
            "acc": 1.0,
            "macro_f1": 1.0,
            "mcc": 1.0,
        }
    pairs = evaluate_tasks(model, tokenizer, ["mrpc"], data_dir=tmp_path)["classification"]["tasks"]["MRPC"]
    assert pairs["n"] == 8 and 0.0 <= pairs["acc"] <= 1.0  # two texts per example reach the model
    untrained = evaluate_tasks(
        BertForSequenceClassification(model.config).eval(), tokenizer, ["sst2"], data_dir=tmp_path
    )
    assert untrained["classification"]["average"]["acc"] < 1.0


def test_decoder_only_classifier_predicts_the_same_batched_and_alone():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=BYTE_VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=7,
    )
    model = LlamaForSequenceClassification(config).eval()  # no pad_token_id: nora sets it from the tokenizer
    tokenizer = byte_tokenizer(padding_side="left")
    examples = [ClassificationExample((s,), y) for s, y in SENTENCES]
    alone = [predict_labels(model, tokenizer, [e], batch_size=1)[0] for e in examples]
    assert predict_labels(model, tokenizer, examples, batch_size=8) == alone
    assert tokenizer.padding_side == "left"  # the caller's tokenizer is left as it was
