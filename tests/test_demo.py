"""`nora demo`'s generated task. The demo itself runs in tests/test_readme.py, as the README's first block, which
checks the figures the README quotes from it."""

from __future__ import annotations

import json

from nora.demo import TOPICS, TRAIN_WORDS, make_task


def test_generated_task_holds_out_unseen_words(tmp_path):
    train_file, test_file = make_task(tmp_path)
    train = [json.loads(line) for line in train_file.read_text().splitlines()]
    test = [json.loads(line) for line in test_file.read_text().splitlines()]
    assert {r["label"] for r in train} == {r["label"] for r in test} == set(TOPICS)
    train_words = {w for w in sum(TOPICS.values(), []) if any(w in r["text"] for r in train)}
    assert len(train_words) == TRAIN_WORDS * len(TOPICS)
    assert not any(any(f" {w}." in r["text"] for w in train_words) for r in test)
