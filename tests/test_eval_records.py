"""Commonsense records: labels, choice texts and answer extraction for every task format, and the real files."""

from __future__ import annotations

import json

import pytest
from conftest import shared_path
from test_eval_support import RECORDS, write_task

from nora import AdapterError
from nora.evaluation import extract_answer, load_classification, load_commonsense, parse_item, resolve_tasks
from nora.evaluation.tasks import subsample
from nora.prompts import format_prompt

EXPECTED = {
    "boolq": (("true", "false"), ("true", "false"), 0),
    "piqa": (("solution1", "solution2"), ("use a towel", "use a bucket of water"), 0),
    "social_i_qa": (("answer1", "answer2", "answer3"), ("grateful", "angry", "bored"), 0),
    "hellaswag": (
        ("ending1", "ending2", "ending3", "ending4"),
        ("fries them.", "paints the wall.", "swims away.", "sings to the moon."),
        0,
    ),
    "winogrande": (("option1", "option2"), ("the table", "the cup"), 0),
    "ARC-Easy": (
        ("answer1", "answer2", "answer3", "answer4", "answer5"),
        ("sunlight", "rocks", "sand", "noise", "wind"),
        0,
    ),
}


@pytest.mark.parametrize("task", sorted(RECORDS))
def test_labels_choices_and_gold_of_every_format(task):
    item = parse_item(RECORDS[task], task)
    labels, choices, gold = EXPECTED[task]
    assert (item.labels, item.choices, item.gold) == (labels, choices, gold)
    assert item.label_targets[gold] == RECORDS[task]["output"]
    assert item.prompt == format_prompt(RECORDS[task]["instruction"])
    assert item.prompt.endswith("### Response:\n")


@pytest.mark.parametrize(
    ("response", "labels", "expected"),
    [
        ("the correct answer is true", ("true", "false"), "true"),
        ("false. It is true that...", ("true", "false"), "false"),  # the first label named wins
        ("the correct answer is solution2", ("solution1", "solution2"), "solution2"),
        ("the correct answer is answer3", ("answer1", "answer2", "answer3"), "answer3"),
        ("answer5 for sure", ("answer1", "answer2", "answer3", "answer4", "answer5"), "answer5"),
        ("the correct answer is option1", ("option1", "option2"), "option1"),
        ("the correct answer is ending4", ("ending1", "ending2", "ending3", "ending4"), "ending4"),
        ("The correct answer is Answer2", ("answer1", "answer2"), None),  # case-sensitive, as LLM-Adapters
        ("", ("answer1", "answer2"), None),
        ("\x00\ufffd garbled ### Response: ???", ("true", "false"), None),
        ("solution1", ("answer1", "answer2"), None),  # another family's label is no answer
        ("the answer is 3", ("option1", "option2"), None),
    ],
)
def test_answer_extraction_never_crashes(response, labels, expected):
    assert extract_answer(response, labels) == expected


def test_labels_without_answer_format_line_come_from_the_markers():
    record = {"instruction": "Pick one.\n\nOption1: red Option2: blue", "answer": "option2", "output": ""}
    item = parse_item(record, "x")
    assert (item.labels, item.choices, item.gold) == (("option1", "option2"), ("red", "blue"), 1)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"instruction": "Q?\n\nAnswer format: answer1/answer2", "answer": "answer3"}, "not one of the record's"),
        ({"instruction": "", "answer": "true"}, "no `instruction`"),
        ({"instruction": "Q?", "answer": 1}, "must be strings"),
        ({"instruction": "Q?", "answer": "maybe"}, "not a label nora knows"),
        ({"instruction": "Q?\n\nAnswer format: yes/no", "answer": "yes"}, "neither true/false"),
        (["not", "a", "record"], "JSON object"),
    ],
)
def test_malformed_records_are_refused_with_the_reason(record, message):
    with pytest.raises(AdapterError, match=message):
        parse_item(record, "file.json#7")


def test_a_record_whose_choices_cannot_be_read_says_so_only_when_they_are_needed():
    record = {
        "instruction": "Q?\n\nAnswer1: a Answer3: c\n\nAnswer format: answer1/answer2/answer3",
        "answer": "answer1",
    }
    item = parse_item(record, "file.json#7")  # generation needs only the labels
    assert item.labels == ("answer1", "answer2", "answer3")
    with pytest.raises(AdapterError, match=r"file.json#7: cannot read the 3 choices.*found numbers \[1, 3\]"):
        _ = item.choices
    empty = {"instruction": "Q?\n\nAnswer1:  Answer2: b\n\nAnswer format: answer1/answer2", "answer": "answer2"}
    with pytest.raises(AdapterError, match="empty"):
        _ = parse_item(empty, "y").choices


def test_task_names_aliases_paths_and_errors(tmp_path):
    for name, record in RECORDS.items():
        write_task(tmp_path, name, [record])
    specs = resolve_tasks(["commonsense"], tmp_path)
    assert [s.name for s in specs] == ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy"]
    assert [s.name for s in resolve_tasks(["SIQA", "arc-e"], tmp_path)] == ["social_i_qa", "ARC-Easy"]
    direct = resolve_tasks([tmp_path / "commonsense" / "piqa" / "test.json"], None)
    assert direct[0].name == "piqa" and direct[0].kind == "commonsense"
    with pytest.raises(AdapterError, match="unknown task 'nope'"):
        resolve_tasks(["nope"], tmp_path)
    with pytest.raises(AdapterError, match="task openbookqa: no file at"):
        resolve_tasks(["obqa"], tmp_path)
    with pytest.raises(AdapterError, match="listed twice"):
        resolve_tasks(["boolq", "BoolQ"], tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AdapterError, match="cannot read the task file"):
        load_commonsense(resolve_tasks([tmp_path / "bad.json"], None)[0])


def test_subsamples_are_reproducible_and_nested():
    small, large = subsample(1000, 50, seed=3), subsample(1000, 200, seed=3)
    assert small == subsample(1000, 50, seed=3) and set(small) <= set(large) and small == sorted(small)
    assert subsample(1000, 50, seed=4) != small
    assert subsample(10, 50, seed=0) == list(range(10))


# The real benchmark files, read as they are (counts from ../shared/data/README.md).
COUNTS = {"boolq": 3270, "piqa": 1838, "ARC-Easy": 2376, "ARC-Challenge": 1172, "openbookqa": 500}


def test_real_commonsense_test_sets_parse_completely():
    data = shared_path("data")
    specs = resolve_tasks(["commonsense"], data)
    assert {s.name for s in specs} >= set(COUNTS)
    for spec in specs:
        items = load_commonsense(spec)
        assert len(items) == COUNTS.get(spec.name, len(items))
        assert all(len(item.choices) == len(item.labels) >= 2 for item in items)
        raw = json.loads(spec.path.read_text())
        assert [i.answer for i in items] == [r["answer"] for r in raw]
    arc = load_commonsense(resolve_tasks(["arc-e"], data)[0], limit=5, seed=1)
    assert len(arc) == 5 and all(c for item in arc for c in item.choices)


def test_real_glue_dev_sets_read_as_they_are():
    data = shared_path("data")
    expected = {"SST-2": (872, 1), "CoLA": (1043, 1), "MRPC": (408, 2)}
    for spec in resolve_tasks(["glue"], data):
        examples = load_classification(spec)
        count, width = expected[spec.name]
        assert len(examples) == count and all(len(e.texts) == width and e.texts[0] for e in examples)
        assert {e.label for e in examples} == {0, 1}
    mrpc = load_classification(resolve_tasks(["mrpc"], data)[0])
    assert mrpc[0].texts[0].startswith("He said the foodservice pie business")
