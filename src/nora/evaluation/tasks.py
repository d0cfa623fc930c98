"""Evaluation tasks: names resolved to files, read as they are, and subsampled reproducibly.

Commonsense tasks are LLM-Adapters JSON test sets, found at `<data_dir>/commonsense/<task>/test.json` or
`<data_dir>/<task>/test.json` (the LLM-Adapters `dataset/` layout). Classification tasks are GLUE TSVs, found at
`<data_dir>/glue/<task>/dev.tsv` or `<data_dir>/<task>/dev.tsv`. A task may also be given as a file path.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..datafiles import (
    GLUE_LAYOUTS,
    LABEL_COLUMNS,
    TARGET_COLUMNS,
    GlueLayout,
    finite_number,
    pick_columns,
    read_rows,
    read_table,
    require_columns,
    row_label,
    row_text,
    where_of,
)
from ..errors import AdapterError
from ..tasks.records import Head
from .records import CommonsenseItem, parse_item

COMMONSENSE_TASKS = (
    "boolq",
    "piqa",
    "social_i_qa",
    "hellaswag",
    "winogrande",
    "ARC-Easy",
    "ARC-Challenge",
    "openbookqa",
)


GLUE_TASKS = GLUE_LAYOUTS  # the GLUE TSVs nora knows by name
_FILE_SUFFIXES = (".json", ".jsonl", ".tsv", ".csv")
SUITES = {"commonsense": COMMONSENSE_TASKS, "glue": tuple(GLUE_TASKS)}
_ALIASES = {
    **{name.lower(): name for name in (*COMMONSENSE_TASKS, *GLUE_TASKS)},
    "siqa": "social_i_qa",
    "arc-e": "ARC-Easy",
    "arc_easy": "ARC-Easy",
    "arc-c": "ARC-Challenge",
    "arc_challenge": "ARC-Challenge",
    "obqa": "openbookqa",
    "sst2": "SST-2",
}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    path: Path
    kind: Literal["commonsense", "classification"]
    layout: GlueLayout | None = None


@dataclass(frozen=True)
class ClassificationExample:
    texts: tuple[str, ...]
    label: int | float  # a class id, or a regression target


@dataclass(frozen=True)
class Columns:
    """The columns of a labelled file, where not the usual names (text/sentence/..., label/score/...)."""

    text: str | None = None
    pair: str | None = None
    label: str | None = None


def resolve_tasks(
    names: Sequence[str | os.PathLike | TaskSpec], data_dir: str | os.PathLike | None, labelled: bool = False
) -> list[TaskSpec]:
    """Task names (`boolq`, `arc-e`, `sst2`, the suites `commonsense` and `glue`), file paths or directories →
    task files. A suite takes the tasks present under `data_dir` (`missing_suite_tasks` names the others); a task
    named on its own must be present. A file is a commonsense test set (.json) or a labelled text file (.tsv, .csv,
    .jsonl; and .json too when `labelled`: the model is a trained classifier or regressor). A directory is every
    task in it: a task folder's test file (test.json, dev.tsv, ...), each subfolder's, and its other data files
    (train splits excepted)."""
    specs: list[TaskSpec] = []
    for entry in names:
        if isinstance(entry, TaskSpec):
            specs.append(entry)
        elif str(entry).lower() in SUITES:
            suite = SUITES[str(entry).lower()]
            present = [spec for spec in (_find(task, data_dir) for task in suite) if spec is not None]
            if not present:
                raise AdapterError(
                    f"no {entry} task files under {data_dir}: expected e.g. {_candidates(suite[0], data_dir)[0]}. "
                    "Pass --data-dir (or NORA_DATA_DIR) pointing at the data folder."
                )
            specs.extend(present)
        elif Path(entry).suffix in _FILE_SUFFIXES and Path(entry).is_file():
            specs.append(_from_file(Path(entry), labelled))
        elif str(entry).lower() not in _ALIASES and Path(entry).is_dir():
            specs.extend(_from_dir(Path(entry), labelled))
        else:
            task = _ALIASES.get(str(entry).lower())
            if task is None:
                known = ", ".join((*SUITES, *COMMONSENSE_TASKS, *GLUE_TASKS))
                raise AdapterError(
                    f"unknown task {str(entry)!r}: use one of {known}, or a file path ({' '.join(_FILE_SUFFIXES)})."
                )
            spec = _find(task, data_dir)
            if spec is None:
                tried = ", ".join(str(p) for p in _candidates(task, data_dir))
                raise AdapterError(f"task {task}: no file at {tried}. Pass --data-dir, or the file path itself.")
            specs.append(spec)
    names_seen = [spec.name for spec in specs]
    duplicates = sorted({n for n in names_seen if names_seen.count(n) > 1})
    if duplicates:
        raise AdapterError(f"tasks {duplicates} are listed twice; name each task once.")
    return specs


def missing_suite_tasks(
    names: Sequence[str | os.PathLike | TaskSpec], data_dir: str | os.PathLike | None
) -> dict[str, list[str]]:
    """For each suite among `names`, its tasks with no file under `data_dir` (suites with none missing omitted)."""
    missing = {}
    for entry in names:
        suite = SUITES.get(str(entry).lower()) if not isinstance(entry, TaskSpec) else None
        absent = [task for task in suite or () if _find(task, data_dir) is None]
        if absent:
            missing[str(entry).lower()] = absent
    return missing


def load_commonsense(spec: TaskSpec, limit: int | None = None, seed: int = 0) -> list[CommonsenseItem]:
    records = _records(spec.path)
    return [parse_item(records[i], f"{spec.path}#{i}") for i in subsample(len(records), limit, seed)]


def load_commonsense_file(path: Path) -> list[CommonsenseItem]:
    """Every record of an LLM-Adapters JSON file (a train split, or a test set as a few-shot pool)."""
    return [parse_item(record, f"{path}#{i}") for i, record in enumerate(_records(path))]


def _records(path: Path) -> list:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: cannot read the task file ({e}).") from e
    if not isinstance(records, list) or not records:
        raise AdapterError(f"{path}: expected a non-empty JSON list of records (LLM-Adapters format).")
    return records


def load_classification(
    spec: TaskSpec, limit: int | None = None, seed: int = 0, head: Head | None = None, columns: Columns | None = None
) -> list[ClassificationExample]:
    """A labelled text file: a GLUE TSV read as GLUE reads it (nora.datafiles.read_table: tabs, no quoting), or any
    data file with its columns found as training finds them. Labels are class ids of the GLUE layout, or, with a
    trained `head`, names of its label set (or numbers, for regression). A row whose label does not fit is an
    error naming the row, the column and the fix."""
    where, columns = str(spec.path), columns or Columns()
    if spec.layout is not None:
        layout = spec.layout
        rows = read_table(spec.path, "\t", layout.columns)
        text, pair, label = (columns.text or layout.texts[0]), columns.pair, (columns.label or layout.label)
        if pair is None and columns.text is None and len(layout.texts) > 1:
            pair = layout.texts[1]
        if rows:
            require_columns(rows, (text, label) + ((pair,) if pair else ()), where)
    else:
        if head is None:
            raise AdapterError(no_head_message(spec))
        rows = read_rows(spec.path)
        defaults = TARGET_COLUMNS if head.kind.predicts_number else LABEL_COLUMNS
        text, pair, label = pick_columns(rows, columns.text, columns.pair, columns.label, defaults, where)
    examples = []
    for row in rows:
        value = row_label(row, label, where)
        texts = tuple(row_text(row, c, where) for c in (text, pair) if c)
        examples.append(ClassificationExample(texts, _target(value, row, label, spec, head)))
    return [examples[i] for i in subsample(len(examples), limit, seed)]


def no_head_message(spec: TaskSpec) -> str:
    return (
        f"{spec.path}: not a GLUE task nora knows by name ({', '.join(GLUE_TASKS)}), so its labels are read with "
        "the label set a trained head records: evaluate an adapter trained by `nora train --task seq-cls` (or "
        "regression), whose adapter_config.json records it, or put a GLUE file in a folder named after its task."
    )


def _target(value: str, row, column: str, spec: TaskSpec, head: Head | None) -> int | float:
    where = where_of(row, str(spec.path))
    if head is not None and head.kind.predicts_number:
        number = finite_number(value)
        if number is None:
            raise AdapterError(
                f"{where}: label {value!r} in column {column!r} is not a finite number, and this adapter's head is a "
                "regressor; fix the row, or choose the column with --label-column."
            )
        return number
    if head is not None:
        if value not in head.labels:
            raise AdapterError(
                f"{where}: label {value!r} in column {column!r} is not in the label set the adapter's head was "
                f"trained on {list(head.labels)}; fix the row, choose the column with --label-column, or evaluate "
                "an adapter trained on these labels."
            )
        return head.labels.index(value)
    count = spec.layout.num_labels if spec.layout else 0
    if not value.lstrip("-").isdigit() or not 0 <= int(value) < count:
        raise AdapterError(
            f"{where}: label {value!r} in column {column!r} is not a class id 0..{count - 1} of {spec.name}; fix or "
            "remove the row."
        )
    return int(value)


def subsample(count: int, limit: int | None, seed: int) -> list[int]:
    """`limit` indices of `count`, drawn with `seed`, in file order; a smaller limit takes a subset of a larger
    one with the same seed (the draws are prefixes of one permutation)."""
    if limit is None or limit >= count:
        return list(range(count))
    if limit < 1:
        raise AdapterError(f"limit={limit} must be a positive number of examples.")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return sorted(order[:limit])


def _candidates(task: str, data_dir: str | os.PathLike | None) -> list[Path]:
    root = Path(data_dir if data_dir is not None else "data")
    if task in GLUE_TASKS:
        return [root / "glue" / task / "dev.tsv", root / task / "dev.tsv"]
    return [root / "commonsense" / task / "test.json", root / task / "test.json"]


def _find(task: str, data_dir: str | os.PathLike | None) -> TaskSpec | None:
    path = next((p for p in _candidates(task, data_dir) if p.is_file()), None)
    if path is None:
        return None
    if task in GLUE_TASKS:
        return TaskSpec(task, path, "classification", GLUE_TASKS[task])
    return TaskSpec(task, path, "commonsense")


_TEST_FILES = ("test.json", "dev.tsv", "dev_matched.tsv", "test.jsonl", "dev.jsonl", "test.csv", "dev.csv")


def _from_dir(folder: Path, labelled: bool) -> list[TaskSpec]:
    own = next((folder / name for name in _TEST_FILES if (folder / name).is_file()), None)
    if own is not None:  # a task folder: its test file, not its train split
        return [_from_file(own, labelled)]
    specs = []
    for path in sorted(folder.iterdir()):
        test = next((path / name for name in _TEST_FILES if (path / name).is_file()), None) if path.is_dir() else None
        if test is not None:
            specs.append(_from_file(test, labelled))
        elif path.is_file() and path.suffix in _FILE_SUFFIXES and path.stem != "train":
            specs.append(_from_file(path, labelled))
    if not specs:
        raise AdapterError(
            f"--tasks {folder}: no task files in it; expected <task>/test.json (commonsense), <task>/dev.tsv (GLUE) "
            f"or data files ({' '.join(_FILE_SUFFIXES)})."
        )
    return specs


def _from_file(path: Path, labelled: bool) -> TaskSpec:
    name = path.parent.name if path.stem in ("test", "dev", "dev_matched", "train", "validation") else path.stem
    if path.suffix == ".json" and not labelled:
        return TaskSpec(name, path, "commonsense")
    task = _ALIASES.get(name.lower())
    if path.suffix == ".tsv" and task in GLUE_TASKS:
        return TaskSpec(task, path, "classification", GLUE_TASKS[task])
    return TaskSpec(name, path, "classification")  # columns found by name, labels from the trained head
