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

from ..datafiles import GLUE_LAYOUTS, GlueLayout, read_table
from ..errors import AdapterError
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
    label: int


def resolve_tasks(names: Sequence[str | os.PathLike | TaskSpec], data_dir: str | os.PathLike | None) -> list[TaskSpec]:
    """Task names (`boolq`, `arc-e`, `sst2`, the suites `commonsense` and `glue`) or file paths → task files.
    A suite takes the tasks present under `data_dir`; a task named on its own must be present."""
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
        elif Path(entry).suffix in (".json", ".tsv") and Path(entry).is_file():
            specs.append(_from_file(Path(entry)))
        else:
            task = _ALIASES.get(str(entry).lower())
            if task is None:
                known = ", ".join((*SUITES, *COMMONSENSE_TASKS, *GLUE_TASKS))
                raise AdapterError(f"unknown task {str(entry)!r}: use one of {known}, or a .json / .tsv file path.")
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


def load_commonsense(spec: TaskSpec, limit: int | None = None, seed: int = 0) -> list[CommonsenseItem]:
    try:
        records = json.loads(spec.path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{spec.path}: cannot read the task file ({e}).") from e
    if not isinstance(records, list) or not records:
        raise AdapterError(f"{spec.path}: expected a non-empty JSON list of records (LLM-Adapters format).")
    return [parse_item(records[i], f"{spec.path}#{i}") for i in subsample(len(records), limit, seed)]


def load_classification(spec: TaskSpec, limit: int | None = None, seed: int = 0) -> list[ClassificationExample]:
    """A GLUE TSV read as GLUE reads it (nora.datafiles.read_table: tabs, no quoting, every row checked)."""
    layout = spec.layout
    assert layout is not None
    rows = read_table(spec.path, "\t", layout.columns)
    if rows:
        missing = [c for c in (layout.label, *layout.texts) if c not in rows[0]]
        if missing:
            raise AdapterError(
                f"{spec.path}: the header {sorted(rows[0])} lacks column(s) {missing} of the {spec.name} layout."
            )
    examples = []
    for row in rows:
        value = row[layout.label].strip()
        if not value.lstrip("-").isdigit() or not 0 <= int(value) < layout.num_labels:
            raise AdapterError(
                f"{row.where}: label {value!r} in column {layout.label!r} is not a class id 0..{layout.num_labels - 1}"
                f" of {spec.name}; fix or remove the row."
            )
        examples.append(ClassificationExample(tuple(row[c] for c in layout.texts), int(value)))
    return [examples[i] for i in subsample(len(examples), limit, seed)]


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


def _from_file(path: Path) -> TaskSpec:
    name = path.parent.name if path.stem in ("test", "dev", "train", "validation") else path.stem
    if path.suffix == ".json":
        return TaskSpec(name, path, "commonsense")
    task = _ALIASES.get(name.lower())
    if task not in GLUE_TASKS:
        raise AdapterError(
            f"{path}: nora reads the GLUE TSV layouts {sorted(GLUE_TASKS)}; put the file in a folder named after "
            "its task (e.g. SST-2/dev.tsv)."
        )
    return TaskSpec(task, path, "classification", GLUE_TASKS[task])
