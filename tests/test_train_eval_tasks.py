"""`nora train ... --eval-tasks`: evaluation at the end of training, on the real 260K TinyStories Llama.

A hand-made commonsense task in the LLM-Adapters format is written to tmp_path; the model is fine-tuned on each
question's prompt followed by its gold choice text, so that the log-likelihood protocol (the one training
evaluates) moves from the base model's score. The run's summary must hold the same per-task results as
`evaluate_tasks` called afterwards on the saved adapter.

The training rows are plain `text` (prompt + answer tokenised together, as the log-likelihood protocol tokenises
them): tokenised on its own, as instruction rows are, a response gains a leading `▁` from this model's
sentencepiece tokenizer that the joint text lacks (`▁a` vs `\na`), so the first answer token trained would not be
the one the protocol scores.
"""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

import nora
from nora.cli import app
from nora.evaluation import evaluate_tasks
from nora.prompts import format_prompt

NAMES = ("Lily", "Tom", "Sue", "Ben", "Max", "Mia", "Sam", "Anna", "Tim", "Lucy", "Bob", "Jane")
# what each question asks → its answer; every question lists all four answers, in an order that rotates
FORMAT = "answer1/answer2/answer3/answer4"
QUESTIONS = (
    ("{name} was hungry. What did {name} eat?", "a big cake"),
    ("{name} was cold. What did {name} put on?", "a warm hat"),
    ("{name} was tired. Where did {name} go?", "to bed"),
    ("{name} was sad. Who gave {name} a hug?", "mom"),
)


def task_records() -> list[dict[str, str]]:
    """Twelve four-choice questions in the LLM-Adapters format (ARC/OpenBookQA style), the question itself in
    `input` (close to the response, where the tiny model can use it)."""
    answers = [answer for _, answer in QUESTIONS]
    records = []
    for i, name in enumerate(NAMES):
        question, gold_text = QUESTIONS[i % len(QUESTIONS)]
        order = answers[i % 3 :] + answers[: i % 3]
        choices = " ".join(f"Answer{k + 1}: {text}" for k, text in enumerate(order))
        instruction = f"Please choose the correct answer to the question. {choices}\n\nAnswer format: {FORMAT}"
        gold = order.index(gold_text) + 1
        records.append({
            "instruction": instruction, "input": question.format(name=name),
            "output": f"the correct answer is answer{gold}", "answer": f"answer{gold}", "gold_text": gold_text,
        })  # fmt: skip
    return records


def without_timings(results: dict) -> dict:
    return {
        protocol: {
            "tasks": {task: {k: v for k, v in m.items() if k != "seconds"} for task, m in section["tasks"].items()},
            "average": section["average"],
        }
        for protocol, section in results.items()
    }


def test_train_eval_tasks_match_evaluating_the_saved_adapter(stories260k_dir: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records = task_records()
    task_file = tmp_path / "park" / "test.json"
    task_file.parent.mkdir()
    task_file.write_text(json.dumps([{k: v for k, v in r.items() if k != "gold_text"} for r in records]))
    train_file = tmp_path / "train.json"  # each question's prompt, then its gold choice text
    rows = [{"text": format_prompt(r["instruction"], r["input"]) + r["gold_text"]} for r in records]
    train_file.write_text(json.dumps(rows))
    out = tmp_path / "run"
    args = [
        "train", "--model", str(stories260k_dir), "--data", str(train_file), "--output-dir", str(out),
        "--method", "lora", "--rank", "8", "--lr", "5e-3", "--batch-size", "6",
        "--max-steps", "60", "--max-length", "320", "--logging-steps", "20", "--no-plot", "--no-progress",
        "--eval-tasks", str(task_file), "--eval-limit", "8",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    summary = json.loads((out / "summary.json").read_text())
    reported = summary["eval_tasks"]
    assert list(reported) == ["loglik"] and list(reported["loglik"]["tasks"]) == ["park"]
    park = reported["loglik"]["tasks"]["park"]
    assert park["n"] == 8 and reported["loglik"]["average"]["n"] == 8 and summary["truncated"] == 0

    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    base = AutoModelForCausalLM.from_pretrained(stories260k_dir)
    before = evaluate_tasks(base, tokenizer, [task_file], limit=8, batch_size=6)
    adapted = nora.AdaptedModel.from_pretrained(AutoModelForCausalLM.from_pretrained(stories260k_dir), out / "adapter")
    after = evaluate_tasks(adapted.eval(), tokenizer, [task_file], limit=8, batch_size=6)

    assert without_timings(reported) == without_timings(after)
    # the results are the trained adapter's, not the base model's: training taught the gold choice texts
    assert park["acc"] == 1.0 and before["loglik"]["tasks"]["park"]["acc"] <= 0.5, (before, park)
