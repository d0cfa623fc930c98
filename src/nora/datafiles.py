"""Local data files read as rows, the one reader training and evaluation share.

JSON (a list of objects), JSONL (an object per line), CSV (RFC 4180 quoting), TSV and text. TSV is read as GLUE's
own tools read it: split on tabs with no quote processing, so a stray `"` inside a sentence stays a character (a
CSV reader would swallow the tab after it). A row with the wrong number of fields, malformed JSON, a record that
is not an object, a file that is empty or not UTF-8: each is an error naming the file, the line (or record) and
the fix, never a guess. Every row remembers where it came from (`Row.where`), so later checks can name it too.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AdapterError

SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt")
# the usual column names, GLUE's own included (MRPC's "#1 String", QQP's question1/is_duplicate, MNLI's gold_label)
TEXT_COLUMNS = ("text", "sentence", "sentence1", "question", "question1", "#1 String")
PAIR_COLUMNS = ("text_pair", "sentence2", "question2", "#2 String")
LABEL_COLUMNS = ("label", "Quality", "is_duplicate", "gold_label")
TARGET_COLUMNS = ("label", "score")  # STS-B's similarity score
_PAIRED = ("sentence1", "question", "question1", "#1 String")  # a text column whose pair follows


class Row(dict):
    """One record (column → value) and where it was read: `train.tsv:12`, `train.json record 3`."""

    __slots__ = ("where",)

    def __init__(self, values: dict[str, Any], where: str) -> None:
        super().__init__(values)
        self.where = where


@dataclass(frozen=True)
class GlueLayout:
    """A GLUE task's TSV: its label and text columns, and the column names of a file without a header row."""

    label: str
    texts: tuple[str, ...]
    columns: tuple[str, ...] | None = None  # None: the file's first row names the columns
    num_labels: int = 2


GLUE_LAYOUTS = {
    "SST-2": GlueLayout(label="label", texts=("sentence",)),
    "CoLA": GlueLayout(label="label", texts=("sentence",), columns=("source", "label", "original_label", "sentence")),
    "MRPC": GlueLayout(label="Quality", texts=("#1 String", "#2 String")),
}


def glue_layout(path: str | os.PathLike) -> GlueLayout | None:
    """The layout of a GLUE TSV, known from the folder it lies in (`.../CoLA/train.tsv`)."""
    folder = Path(path).parent.name.lower().replace("_", "-")
    return next((layout for name, layout in GLUE_LAYOUTS.items() if name.lower() in (folder, folder + "-2")), None)


def read_rows(path: str | os.PathLike) -> list[Row]:
    """The rows of one local file, by its suffix."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise AdapterError(f"data file {path}: unknown type {path.suffix!r}; use one of {' '.join(SUFFIXES)}.")
    text = _text(path)
    if not text.strip():
        raise AdapterError(f"data file {path} is empty; give a file with at least one record.")
    if path.suffix == ".json":
        rows = _json_list(text, path)
    elif path.suffix == ".jsonl":
        rows = _json_lines(text, path)
    elif path.suffix == ".txt":
        rows = [Row({"text": line}, f"{path}:{i}") for i, line in enumerate(_lines(text), 1) if line.strip()]
    else:
        layout = glue_layout(path) if path.suffix == ".tsv" else None
        rows = read_table(path, "\t" if path.suffix == ".tsv" else ",", layout.columns if layout else None, text)
    if not rows:
        raise AdapterError(f"data file {path} holds a header but no records; give a file with at least one record.")
    return rows


def read_table(
    path: str | os.PathLike, delimiter: str, columns: tuple[str, ...] | None = None, text: str | None = None
) -> list[Row]:
    """A TSV (tabs, no quoting) or CSV (quoting as RFC 4180) with a header row, or with `columns` as its names.
    Blank lines are skipped; any other row must have exactly as many fields as there are columns."""
    path = Path(path)
    text = _text(path) if text is None else text
    tsv = delimiter == "\t"
    quoting = {"quoting": csv.QUOTE_NONE} if tsv else {"strict": True}
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, **quoting)
    kind = "tab-separated" if tsv else "comma-separated"
    rows: list[Row] = []
    try:
        for fields in reader:
            line = reader.line_num
            if not fields or fields == [""]:
                continue
            if columns is None:
                if len(set(fields)) != len(fields) or any(not f.strip() for f in fields):
                    raise AdapterError(
                        f"{path}:{line}: the header row {fields} has empty or repeated column names; name each "
                        "column once."
                    )
                columns = tuple(fields)
                continue
            if len(fields) != len(columns):
                hint = "" if not tsv else " (TSV fields are split on every tab; quotes are not special)"
                raise AdapterError(
                    f"{path}:{line}: {len(fields)} {kind} fields where the header has {len(columns)} "
                    f"({list(columns)}){hint}. Fix or remove that row."
                )
            rows.append(Row(dict(zip(columns, fields, strict=True)), f"{path}:{line}"))
    except csv.Error as e:
        raise AdapterError(f"{path}:{reader.line_num}: not valid CSV ({e}); fix the quoting on that line.") from e
    return rows


def _lines(text: str) -> list[str]:
    """Lines split at newlines only (str.splitlines also splits at U+2028 and other characters JSON strings and
    sentences may hold)."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise AdapterError(f"{path} is a directory; give a data file.") from None
    except OSError as e:
        raise AdapterError(f"cannot read data file {path}: {e.strerror or e}.") from e
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise AdapterError(
            f"{path}:{line}: byte {e.start} is not UTF-8 ({e.reason}); save the file as UTF-8."
        ) from None


def _json_list(text: str, path: Path) -> list[Row]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        lines = "" if text.lstrip().startswith("[") else " (one object per line is .jsonl: rename the file)"
        raise AdapterError(
            f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}){lines}. Fix the file at that line and column."
        ) from None
    if not isinstance(records, list):
        raise AdapterError(
            f"{path}: the file holds a JSON {type(records).__name__}; training data is a JSON list of records, "
            'e.g. [{"instruction": ..., "output": ...}, ...].'
        )
    if not records:
        raise AdapterError(f"data file {path} is an empty list; give at least one record.")
    rows = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise AdapterError(
                f"{path} record {i}: a {type(record).__name__}, not an object of column: value; fix that record."
            )
        rows.append(Row(record, f"{path} record {i}"))
    return rows


def _json_lines(text: str, path: Path) -> list[Row]:
    rows = []
    for number, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise AdapterError(
                f"{path}:{number}:{e.colno}: not valid JSON ({e.msg}); each line of a .jsonl file is one JSON "
                "object. Fix that line."
            ) from None
        if not isinstance(record, dict):
            raise AdapterError(f"{path}:{number}: a JSON {type(record).__name__}, not an object; fix that line.")
        rows.append(Row(record, f"{path}:{number}"))
    return rows


def require_columns(rows: list[dict[str, Any]], columns: tuple[str, ...], source: str) -> None:
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise AdapterError(
            f"data {source} lacks column(s) {missing}; it has {sorted(rows[0])}. Rename them, or choose the columns "
            "with --text-column / --label-column."
        )


def pick_columns(
    rows: list[dict[str, Any]],
    text_column: str | None,
    text_pair_column: str | None,
    label_column: str | None,
    label_columns: tuple[str, ...],
    source: str,
) -> tuple[str, str | None, str]:
    """The text, pair and label columns: as given, else the first of the usual names present; all must exist."""
    text_column = text_column or next((c for c in TEXT_COLUMNS if c in rows[0]), "text")
    label_column = label_column or next((c for c in label_columns if c in rows[0]), "label")
    if text_pair_column is None and text_column in _PAIRED:
        text_pair_column = next((c for c in PAIR_COLUMNS + ("sentence",) if c in rows[0]), None)
    require_columns(rows, (text_column, label_column) + ((text_pair_column,) if text_pair_column else ()), source)
    return text_column, text_pair_column, label_column


def row_label(row: dict[str, Any], column: str, source: str) -> str:
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise AdapterError(
            f"{where_of(row, source)}: no label in column {column!r} (the row is {str(dict(row))[:200]}). Every row "
            "needs one: fix or remove the row."
        )
    return value.strip() if isinstance(value, str) else str(value)


def where_of(row: dict[str, Any], source: str) -> str:
    return getattr(row, "where", None) or source


def row_text(row: dict[str, Any], column: str, source: str) -> str:
    value = row.get(column)
    if value is None:
        raise AdapterError(
            f"{where_of(row, source)}: no value in column {column!r} (the row is {str(dict(row))[:200]}); fix or "
            "remove the row."
        )
    return str(value)


def finite_number(text: str) -> float | None:
    """`text` as a finite float (a regression target), or None where it is not one."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def content_fingerprint(source: str | None) -> dict[str, dict[str, Any]]:
    """What the local files of a data source hold, to tell a changed file from the same one: {part: {"bytes",
    "sha256"}} for each comma-separated part that is a local file or folder (a folder: every file under it, hidden
    ones aside, by relative path and content, in one digest). Hub dataset names are left out. Reading the files
    once costs about what the run spends reading them anyway."""
    found: dict[str, dict[str, Any]] = {}
    for part in (source or "").split(","):
        path = Path(part.strip()).expanduser()
        if not part.strip() or not path.exists():
            continue
        files = [path] if path.is_file() else sorted(
            p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)
        )  # fmt: skip
        digest, size = hashlib.sha256(), 0
        for file in files:
            if file != path:
                digest.update(f"{file.relative_to(path).as_posix()}\0{file.stat().st_size}\0".encode())
            with open(file, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
        found[part.strip()] = {"bytes": size, "sha256": digest.hexdigest()}
    return found
