"""A task kind is a plug-in: one TaskKind subclass and one registry line, defined here, and `nora train`, `nora eval`
and `nora export` all work with it — its option read from the YAML file, its head recorded in the adapter and the
model rebuilt from that record by asking the kind."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import RECORDS, char_tokenizer
from typer.testing import CliRunner

from nora.cli import app
from nora.errors import AdapterError
from nora.tasks import TASKS, Loss, OptionRow, TaskKind, TaskOptions, register
from nora.tasks.data import Encoded, pad_inputs
from nora.training import TrainConfig


@dataclass
class CountOptions(TaskOptions):
    count_chars: bool = False  # the target counts characters (default: words)


class TextLength(TaskKind):
    """Regression on a text's own length: the target is computed from the text (no label column), a one-output
    classifier head predicts it, mean squared error, and the error's root as the metric."""

    name = "text-length"
    Options = CountOptions
    option_rows = (OptionRow("count_chars", bool, "text-length: count characters, not words."),)
    model_class = "AutoModelForSequenceClassification"
    model_kind = "seq-cls"
    predicts_number = True
    adapter_defaults = {"modules_to_save": ["classifier"]}

    def encode(self, config, processor, rows: list[dict[str, Any]], source: str, labels) -> Encoded:
        texts = [row["text"] for row in rows]
        ids = processor(texts, truncation=True, max_length=config.max_length)["input_ids"]
        chars = config.options.count_chars
        return Encoded([{"input_ids": i, "label": float(len(t) if chars else len(t.split()))}
                        for i, t in zip(ids, texts, strict=True)])  # fmt: skip

    def collate(self, examples, pad_id: int):
        return {**pad_inputs(examples, pad_id), "labels": torch.tensor([e["label"] for e in examples])}

    def count_targets(self, batch) -> int:
        return batch["labels"].numel()

    def loss(self, model, batch, num_items: int) -> Loss:
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return Loss(F.mse_loss(output.logits[:, 0].float(), batch["labels"], reduction="sum") / num_items, output)

    def head_width(self, labels) -> int:
        return 1

    def pretrained_kwargs(self, num_labels):
        return {"num_labels": num_labels}

    def label_model(self, model, labels) -> None:
        model.config.problem_type = "regression"

    def head_record(self, labels, config):
        return {"task": self.name}

    def record_fits(self, head) -> bool:
        return not head.labels

    def eval_records(self, batch, output):
        return list(zip(batch["labels"].tolist(), output.logits[:, 0].tolist(), strict=True))

    def metrics(self, records):
        return {"rmse": (sum((g - p) ** 2 for g, p in records) / len(records)) ** 0.5}


@pytest.fixture
def text_length():
    kind = register(TextLength())  # the one registry line
    yield kind
    del TASKS[kind.name]


def _texts(n: int, start: int = 0) -> list[dict[str, Any]]:
    rows = RECORDS[start : start + n]
    return [{"text": f"{r['instruction']} {r['input']}".strip(), "label": None} for r in rows]


def _bert(directory: Path) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = char_tokenizer(directory)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                     num_labels=1)  # fmt: skip
    BertForSequenceClassification(cfg).save_pretrained(directory)
    return directory


def _invoke(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_a_task_kind_defined_here_trains_evaluates_and_exports(tmp_path, text_length):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    import nora

    base = _bert(tmp_path / "bert")
    (tmp_path / "train.json").write_text(json.dumps(_texts(40)))
    dev = [{**row, "label": len(row["text"])} for row in _texts(12, 36)]  # nora eval reads the target as a label
    (tmp_path / "dev.json").write_text(json.dumps(dev))
    (tmp_path / "run.yaml").write_text("task: text-length\ncount-chars: true\n")  # the kind's own option, as a YAML key
    run = tmp_path / "run"
    _invoke("train", "--config", tmp_path / "run.yaml", "--model", base, "--data", tmp_path / "train.json",
            "--eval-data", tmp_path / "dev.json", "--method", "lora", "--rank", 4, "--max-steps", 6,
            "--batch-size", 8, "--lr", 1e-2, "--output-dir", run, "--no-progress", "--no-plot")  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "text-length" and "eval_rmse" in summary
    assert summary["eval_loss"] < summary["initial_eval_loss"]  # it learns the lengths, counted in characters
    assert json.loads((run / "train_config.json").read_text())["count_chars"] is True
    record = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert record["nora"]["head"] == {"task": "text-length"}

    out = tmp_path / "eval.json"
    _invoke("eval", run / "adapter", "--tasks", tmp_path / "dev.json", "-o", out, "--no-progress")
    (scores,) = json.loads(out.read_text())["results"]["regression"]["tasks"].values()
    assert scores["n"] == len(dev)  # the rebuilt model (the kind's one-output head) scores the dev set
    assert abs(scores["mse"] ** 0.5 - summary["eval_rmse"]) < 1e-3 * max(1.0, summary["eval_rmse"])

    _invoke("export", run / "adapter", "-o", tmp_path / "peft")
    ids = torch.tensor([[2, 7, 4, 9, 3]])
    adapted = nora.AdaptedModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(base, num_labels=1), run / "adapter"
    ).eval()
    fresh = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    peft_model = PeftModel.from_pretrained(fresh, tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-5)


def test_a_kinds_options_belong_to_it(text_length):
    assert TrainConfig(task="text-length", count_chars=True).count_chars is True
    with pytest.raises(AdapterError, match="count_chars is an option of --task text-length, not of --task seq-cls"):
        TrainConfig(task="seq-cls", count_chars=True)
    with pytest.raises(AdapterError, match="option count_chars='yes' must be bool"):
        TrainConfig(task="text-length", count_chars="yes")
