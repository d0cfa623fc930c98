"""Commonsense records in the LLM-Adapters JSON format (`instruction`, `input`, `output`, `answer`).

Every task of the suite names its answers with one label family: `true/false` (BoolQ), `solution1/2` (PIQA),
`answer1..5` (SIQA, ARC, OpenBookQA), `option1/2` (WinoGrande) and `ending1..4` (HellaSwag). The instruction
lists the choices as `Answer1: ... Answer2: ...` (or `Solution1:`, `Option1:`, `Ending1:`) and ends with
`Answer format: answer1/answer2/...`; the target is `the correct answer is <label>`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from ..errors import AdapterError
from ..prompts import format_prompt

BOOLEAN_LABELS = ("true", "false")
LABEL_FAMILIES = ("solution", "answer", "option", "ending")
ANSWER_PREFIX = "the correct answer is "

_NUMBERED_LABEL = re.compile(rf"^({'|'.join(LABEL_FAMILIES)})([1-9])$")
_ANSWER_FORMAT = re.compile(r"Answer format:\s*(\S+)")


@dataclass(frozen=True)
class CommonsenseItem:
    """One test record: the prompt, its answer labels in order, and the gold label."""

    instruction: str
    input: str
    answer: str
    labels: tuple[str, ...]
    source: str

    @property
    def gold(self) -> int:
        return self.labels.index(self.answer)

    @property
    def prompt(self) -> str:
        return format_prompt(self.instruction, self.input)

    @property
    def label_targets(self) -> tuple[str, ...]:
        """The trained response for each label: `the correct answer is answer3`."""
        return tuple(ANSWER_PREFIX + label for label in self.labels)

    @cached_property
    def choices(self) -> tuple[str, ...]:
        """The choice texts listed in the instruction (the labels themselves for true/false questions)."""
        if self.labels == BOOLEAN_LABELS:
            return BOOLEAN_LABELS
        return _choice_texts(self.instruction, _family(self.answer), len(self.labels), self.source)


def parse_item(record: Any, source: str) -> CommonsenseItem:
    """Validate one JSON record; `source` (file#index) names it in errors."""
    if not isinstance(record, Mapping):
        raise AdapterError(f"{source}: a record must be a JSON object with `instruction` and `answer`.")
    instruction, answer = record.get("instruction"), record.get("answer")
    input_text = record.get("input") or ""
    if not isinstance(instruction, str) or not instruction.strip():
        raise AdapterError(f"{source}: the record has no `instruction` text (LLM-Adapters format expected).")
    if not isinstance(answer, str) or not isinstance(input_text, str):
        raise AdapterError(f"{source}: `answer` (and `input`, when present) must be strings, e.g. 'answer2'.")
    answer = answer.strip()
    labels = _labels(instruction, answer, source)
    if answer not in labels:
        raise AdapterError(f"{source}: the gold answer {answer!r} is not one of the record's labels {list(labels)}.")
    return CommonsenseItem(instruction, input_text, answer, labels, source)


def extract_answer(generation: str, labels: tuple[str, ...]) -> str | None:
    """The first label of the record's family in a generated response, as LLM-Adapters scores it (case-sensitive,
    first match); None when the response names none, which counts as wrong."""
    pattern = "true|false" if labels == BOOLEAN_LABELS else rf"{_family(labels[0])}\d"
    found = re.search(pattern, generation)
    return found.group(0) if found else None


def _family(label: str) -> str:
    match = _NUMBERED_LABEL.match(label)
    return match.group(1) if match else "boolean"


def _labels(instruction: str, answer: str, source: str) -> tuple[str, ...]:
    declared = _ANSWER_FORMAT.search(instruction)
    if declared:
        labels = tuple(part.strip().lower() for part in declared.group(1).split("/"))
        numbered = [_NUMBERED_LABEL.match(label) for label in labels]
        expected = tuple(f"{numbered[0].group(1)}{i}" for i in range(1, len(labels) + 1)) if numbered[0] else None
        if labels != BOOLEAN_LABELS and labels != expected:
            raise AdapterError(
                f"{source}: `Answer format: {declared.group(1)}` is neither true/false nor a numbered list such as "
                "answer1/answer2/answer3; fix the record."
            )
        return labels
    if answer in BOOLEAN_LABELS:
        return BOOLEAN_LABELS
    family = _family(answer)
    if family == "boolean":
        raise AdapterError(
            f"{source}: answer {answer!r} is not a label nora knows (true/false, solutionN, answerN, optionN, "
            "endingN) and the instruction has no `Answer format:` line naming the labels."
        )
    count = len(_choice_markers(instruction, family))
    return tuple(f"{family}{i}" for i in range(1, count + 1))


def _choice_markers(instruction: str, family: str) -> list[re.Match[str]]:
    return list(re.finditer(rf"\b{family}(\d+):", instruction, flags=re.IGNORECASE))


def _choice_texts(instruction: str, family: str, count: int, source: str) -> tuple[str, ...]:
    markers = _choice_markers(instruction, family)
    numbers = [int(m.group(1)) for m in markers]
    if numbers != list(range(1, count + 1)):
        raise AdapterError(
            f"{source}: cannot read the {count} choices from the instruction: expected markers "
            f"{family.capitalize()}1: … {family.capitalize()}{count}: in order, found numbers {numbers}. The "
            "log-likelihood protocol needs the choice texts; fix the record or use --protocol generate."
        )
    ends = [m.start() for m in markers[1:]]
    tail = _ANSWER_FORMAT.search(instruction, markers[-1].end())
    ends.append(tail.start() if tail else len(instruction))
    texts = tuple(instruction[m.end() : end].strip() for m, end in zip(markers, ends, strict=True))
    empty = [i + 1 for i, text in enumerate(texts) if not text]
    if empty:
        raise AdapterError(f"{source}: choice {empty} is empty; a choice needs text to be scored.")
    return texts
