"""Few-shot prompts, the chat template, --log-samples, task directories, suites with missing tasks, and arguments
checked before any model loads (`nora eval`, `nora.evaluation.fewshot`)."""

from __future__ import annotations

import json
import math
import re

import pytest
from conftest import shared_path
from test_eval_support import byte_llama, byte_tokenizer, write_task
from typer.testing import CliRunner

import nora.evaluation.loading as loading
from nora.cli import app
from nora.errors import AdapterError
from nora.evaluation import evaluate_tasks
from nora.evaluation.fewshot import PromptStyle, question
from nora.evaluation.runner import best, best_per_char, prepare_tasks

CHAT = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _record(i: int) -> dict:
    return {
        "instruction": f"Please choose the correct answer to the question: what is {i} plus one?\n\n"
        f"Answer1: {i + 1} Answer2: {i + 2} Answer3: {i}\n\nAnswer format: answer1/answer2/answer3",
        "input": "",
        "output": "the correct answer is answer1",
        "answer": ["answer1", "answer2", "answer3"][i % 3],
    }


@pytest.fixture
def data_dir(tmp_path):
    write_task(tmp_path / "data", "ARC-Easy", [_record(i) for i in range(12)])
    boolq = write_task(tmp_path / "data", "boolq", [
        {"instruction": f"question: is {i} even?\n\nAnswer format: true/false", "input": "", "output": "",
         "answer": "true" if i % 2 == 0 else "false"} for i in range(6)])  # fmt: skip
    (boolq.parent / "train.json").write_text(json.dumps([
        {"instruction": f"question: is {i} odd?\n\nAnswer format: true/false", "input": "", "output": "",
         "answer": "true" if i % 2 else "false"} for i in range(20)]))  # fmt: skip
    return tmp_path / "data"


def test_few_shot_prompts_hold_k_seeded_examples_never_the_item(data_dir):
    k = 3
    style = PromptStyle(num_fewshot=k)
    arc, boolq = prepare_tasks(["arc-e", "boolq"], ["loglik", "generate"], data_dir=data_dir, style=style)
    assert arc.fewshot_file == data_dir / "commonsense/ARC-Easy/test.json"  # no train split: the test set
    assert boolq.fewshot_file == data_dir / "commonsense/boolq/train.json"
    for task in (arc, boolq):
        for item, shots in zip(task.examples, task.shots, strict=True):
            assert len(shots) == k and len({question(s) for s in shots}) == k
            assert all(question(s) != question(item) for s in shots)
    again = prepare_tasks(["arc-e"], ["loglik"], data_dir=data_dir, style=style)[0]
    other = prepare_tasks(["arc-e"], ["loglik"], data_dir=data_dir, style=style, seed=1)[0]
    subset = prepare_tasks(["arc-e"], ["loglik"], data_dir=data_dir, style=style, limit=4)[0]
    assert again.shots == arc.shots and other.shots != arc.shots
    for item, shots in zip(subset.examples, subset.shots, strict=True):  # an item sees the same examples in a subset
        assert shots == arc.shots[arc.examples.index(item)]

    results = evaluate_tasks(byte_llama(), byte_tokenizer(), ["arc-e"], ["loglik", "loglik-label", "generate"],
                             data_dir=data_dir, num_fewshot=k, log_samples=True, max_new_tokens=2)  # fmt: skip
    for protocol in ("loglik", "loglik-label"):
        metrics = results[protocol]["tasks"]["ARC-Easy"]
        assert metrics["num_fewshot"] == k
        for sample, item, shots in zip(metrics["samples"], arc.examples, arc.shots, strict=True):
            prompt = sample["prompt"]
            assert prompt.count("### Instruction:") == k + 1 and prompt.endswith(item.prompt)
            assert prompt.count(question(item)) == 1
            for shot in shots:
                assert shot.prompt + (shot.choices[shot.gold] if protocol == "loglik" else shot.label_targets[
                    shot.gold]) + "\n\n" in prompt  # fmt: skip
    assert results["generate"]["tasks"]["ARC-Easy"]["samples"][0]["prompt"].count("### Instruction:") == k + 1
    with pytest.raises(AdapterError, match="pool holds 5 other records; lower --num-fewshot"):
        prepare_tasks(["boolq"], ["loglik"], data_dir=data_dir, style=PromptStyle(6, "test"))
    with pytest.raises(AdapterError, match="no train split beside it"):
        prepare_tasks(["arc-e"], ["loglik"], data_dir=data_dir, style=PromptStyle(2, "train"))


def test_real_commonsense_few_shot_examples_come_from_the_train_split():
    folder = shared_path("data", "commonsense")
    task = prepare_tasks([folder / "ARC-Easy"], ["loglik"], limit=20, style=PromptStyle(5))[0]
    assert task.spec.name == "ARC-Easy" and task.fewshot_file == folder / "ARC-Easy" / "train.json"
    test_questions = {question(i) for i in task.examples}
    assert all(len(s) == 5 and not test_questions & {question(x) for x in s} for s in task.shots)


def test_log_samples_round_trip_to_the_reported_accuracies(data_dir, tmp_path):
    byte_llama().save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    out = tmp_path / "results.json"
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "model"), "--tasks", "arc-e,boolq", "--data-dir",
                                      str(data_dir), "-p", "loglik", "-p", "loglik-label", "--num-fewshot", "2",
                                      "--log-samples", "-o", str(out), "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert payload["settings"]["num_fewshot"] == 2 and payload["settings"]["fewshot_from"] == "auto"
    for name, metrics in payload["results"]["loglik"]["tasks"].items():
        samples = metrics["samples"]
        assert len(samples) == metrics["n"] and all(s["prompt"].count("### Instruction:") == 3 for s in samples)
        picks = [best(s["logliks"]) for s in samples]
        norm = [best_per_char(s["logliks"], s["choices"]) for s in samples]
        labels = [[f"answer{i}" for i in (1, 2, 3)] if name == "ARC-Easy" else ["true", "false"] for _ in samples]
        assert [s["pred"] for s in samples] == [ls[p] for ls, p in zip(labels, picks, strict=True)]
        assert [s["pred_norm"] for s in samples] == [ls[p] for ls, p in zip(labels, norm, strict=True)]
        assert math.isclose(metrics["acc"], sum(s["acc"] for s in samples) / len(samples))
        assert math.isclose(metrics["acc_norm"], sum(s["acc_norm"] for s in samples) / len(samples))
        assert metrics["acc"] == sum(s["pred"] == s["gold"] for s in samples) / len(samples)
    for metrics in payload["results"]["loglik-label"]["tasks"].values():
        samples = metrics["samples"]
        assert all(s["targets"][best(s["logliks"])] == "the correct answer is " + s["pred"] for s in samples)
        assert metrics["acc"] == sum(s["acc"] for s in samples) / len(samples)


def test_chat_template_prompts_are_multiturn_without_a_second_bos():
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT
    records = [_record(i) for i in range(4)]
    with pytest.raises(AdapterError, match="has no chat template"):
        evaluate_tasks(byte_llama(), byte_tokenizer(), [], ["loglik"], chat_template=True)
    from nora.evaluation.fewshot import draw_shots, gold_response, render
    from nora.evaluation.records import parse_item

    items = [parse_item(r, f"t#{i}") for i, r in enumerate(records)]
    shots = draw_shots(items[:1], items, 2, 0)[0]
    text = render(items[0], shots, gold_response, tokenizer)
    assert text.startswith("<bos>")  # this tokenizer adds no BOS when encoding: the template's is the one
    from tokenizers import processors

    adds_bos = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 258)])
    tokenizer.backend_tokenizer.post_processor = adds_bos
    text = render(items[0], shots, gold_response, tokenizer)
    assert not text.startswith("<bos>") and tokenizer(text)["input_ids"].count(258) == 1  # one BOS, not two
    assert text.count("<|user|>") == 3 and text.count("<|assistant|>") == 3 and text.endswith("<|assistant|>")
    assert "### Instruction" not in text and text.endswith(question(items[0]) + "<|end|><|assistant|>")


def test_a_task_directory_and_a_suite_with_missing_tasks(data_dir, tmp_path, monkeypatch):
    specs = prepare_tasks([data_dir / "commonsense"], ["loglik"])
    assert [t.spec.name for t in specs] == ["ARC-Easy", "boolq"]  # each folder's test file, never train.json
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterError, match="no task files in it"):
        prepare_tasks([empty], ["loglik"])
    with pytest.warns(UserWarning, match="suite commonsense: no file for piqa, social_i_qa, hellaswag, winogrande"):
        evaluate_tasks(byte_llama(), byte_tokenizer(), ["commonsense"], ["loglik"], data_dir=data_dir, limit=1)

    byte_llama().save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "model"), "--data-dir", str(data_dir), "--limit", "2",
                                      "-o", str(out), "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "suite commonsense: no file for piqa, social_i_qa, hellaswag, winogrande, ARC-Challenge" in result.output
    assert json.loads(out.read_text())["missing_tasks"]["commonsense"][0] == "piqa"


@pytest.mark.parametrize(
    "extra, error",
    [
        (["--tasks", "bad"], r"bad\.json#1: .*gold answer 'answer9' is not one of"),
        (["--tasks", "sst2", "--num-fewshot", "2"], "scored by a trained head, which reads no prompt"),
        (["--tasks", "arc-e", "--num-fewshot", "2", "--fewshot-from", "train"], "no train split beside it"),
        (["--tasks", "arc-e", "--fewshot-from", "dev"], "fewshot_from='dev': choose from auto, train, test"),
        (["--tasks", "arc-e", "--chat-template"], "has no chat template"),
    ],
)
def test_arguments_and_data_are_checked_before_the_model_loads(extra, error, data_dir, tmp_path, monkeypatch):
    byte_llama().save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    bad = [_record(0), {**_record(1), "answer": "answer9"}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    (data_dir / "glue" / "SST-2").mkdir(parents=True)
    (data_dir / "glue" / "SST-2" / "dev.tsv").write_text("sentence\tlabel\ngood\t1\n")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_for_eval", no_model)
    extra = [str(tmp_path / "bad.json") if e == "bad" else e for e in extra]
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "model"), "--data-dir", str(data_dir), *extra,
                                      "--no-progress"], env={"COLUMNS": "300"})  # fmt: skip
    assert result.exit_code != 0
    assert re.search(error, " ".join(result.output.split())), result.output
