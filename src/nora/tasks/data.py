"""Training data: records read from local files (nora.datafiles) or hub datasets (`datasets`), tokenised into
examples.

Causal LM records are instruction data (`instruction`, `input`, `output`: the Alpaca / LLM-Adapters format, loss on
the response only), prompt/completion pairs, or plain `text`. Classification records are `text` (+ an optional
second sentence) and `label`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..datafiles import (
    LABEL_COLUMNS,
    SUFFIXES,
    TARGET_COLUMNS,
    Row,
    finite_number,
    pick_columns,
    read_rows,
    require_columns,
    row_label,
    row_text,
    where_of,
)
from ..errors import AdapterError
from ..pretrained import looks_local
from ..prompts import format_prompt

log = logging.getLogger(__name__)

IGNORE = -100


def load_records(source: str, split: str = "train") -> list[Row]:
    """Rows of a local file (JSON list, JSONL, CSV, TSV read as GLUE does, text), of a directory's `<split>.*` file,
    or of a hub dataset; several sources separated by commas are concatenated (e.g. the commonsense train sets as
    one mixture). Every row knows where it came from (`Row.where`)."""
    if "," in source:
        return [row for part in source.split(",") if part.strip() for row in load_records(part.strip(), split)]
    path = Path(source).expanduser()
    if path.is_file():
        return read_rows(path)
    if path.is_dir():
        found = [path / f"{split}{suffix}" for suffix in SUFFIXES if (path / f"{split}{suffix}").is_file()]
        if len(found) > 1:
            raise AdapterError(f"data dir {path} holds {[p.name for p in found]}; name the file to use with --data.")
        if found:
            return read_rows(found[0])
        return _hub_records(str(path), split)
    if path.suffix in SUFFIXES or looks_local(source):
        raise AdapterError(f"data file {source} does not exist; check the path (or give a hub dataset name).")
    return _hub_records(source, split)


def _hub_records(source: str, split: str) -> list[Row]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(source, split=split)
    except Exception as e:  # datasets raises many kinds; all mean "this source cannot be read"
        raise AdapterError(
            f"could not read dataset {source!r} (split {split!r}): {type(e).__name__}: {str(e)[:300]}. A hub dataset "
            "needs the network (or the datasets cache); offline, download it elsewhere and pass the file with --data."
        ) from e
    rows = [Row(r, f"{source} row {i}") for i, r in enumerate(dataset.to_list())]
    if not rows:
        raise AdapterError(f"dataset {source} (split {split!r}) holds no examples.")
    return rows


@dataclass
class Encoded:
    """Tokenised examples and what was lost on the way."""

    examples: list[dict[str, list[int]]]
    truncated: int = 0
    dropped: int = 0
    labels: list[str] = field(default_factory=list)


def causal_kind(rows: list[dict[str, Any]], source: str, text_column: str | None = None) -> str:
    columns = set(rows[0])
    if text_column:
        require_columns(rows, (text_column,), source)
        return "text"
    if {"instruction", "output"} <= columns:
        return "instruction"
    if {"prompt", "completion"} <= columns:
        return "completion"
    if "text" in columns:
        return "text"
    raise AdapterError(
        f"data {source} has columns {sorted(columns)}; causal-LM training needs `instruction` + `output` "
        "(Alpaca format, optional `input`), `prompt` + `completion`, or `text`."
    )


def encode_causal(
    rows: list[dict[str, Any]],
    tokenizer,
    max_length: int,
    mask_prompt: bool = True,
    source: str = "data",
    text_column: str | None = None,
) -> Encoded:
    """input_ids/labels per row; prompt tokens get label -100 when `mask_prompt`.

    Prompt and response are tokenised as one text, the tokens the model reads at inference and that the
    log-likelihood protocols score (tokenised apart, a sentencepiece tokenizer would give the response's first
    token a dummy-prefix `▁` it never has after the prompt). The mask covers the prompt's own tokens: the
    common prefix of the prompt tokenised alone and of the whole, so a token spanning the boundary is learned."""
    kind = causal_kind(rows, source, text_column)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if kind == "text":
        column = text_column or "text"
        prompts = [""] * len(rows)
        responses = [row_text(r, column, source) for r in rows]
    elif kind == "completion":
        prompts = [row_text(r, "prompt", source) for r in rows]
        responses = [row_text(r, "completion", source) for r in rows]
    else:
        prompts = [format_prompt(row_text(r, "instruction", source), str(r.get("input") or "")) for r in rows]
        responses = [row_text(r, "output", source) for r in rows]
    masking = mask_prompt and kind != "text"
    whole_ids = tokenizer([p + r for p, r in zip(prompts, responses, strict=True)], add_special_tokens=False)
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if masking else [[]] * len(rows)
    out = Encoded([])
    for p, whole in zip(prompt_ids, whole_ids["input_ids"], strict=True):
        ids = bos + whole + eos
        masked = len(bos) + _common_prefix(p, whole) if masking else 0
        labels = [IGNORE] * masked + ids[masked:]
        if kind == "text" and bos:
            labels[0] = IGNORE  # nothing predicts BOS
        if len(ids) > max_length:
            out.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels[1:]):
            out.dropped += 1  # the prompt alone fills max_length: nothing left to learn from
            continue
        out.examples.append({"input_ids": ids, "labels": labels})
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):  # stops at the shorter
        if x != y:
            break
        n += 1
    return n


def encode_classification(
    rows: list[dict[str, Any]],
    tokenizer,
    max_length: int,
    labels: list[str] | None,
    source: str = "data",
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
) -> Encoded:
    """input_ids/label per row. `labels` fixes the label set (and ids, in order); None infers it from the rows.
    A row without a label is an error naming it, never a class of its own."""
    text_column, text_pair_column, label_column = pick_columns(
        rows, text_column, text_pair_column, label_column, LABEL_COLUMNS, source
    )
    raw = [row_label(r, label_column, source) for r in rows]
    label_set = list(labels) if labels is not None else sorted(set(raw), key=_label_order)
    if labels is None:
        _refuse_continuous(raw, rows, label_column, source)
    ids = {label: i for i, label in enumerate(label_set)}
    unknown = [(label, row) for label, row in zip(raw, rows, strict=True) if label not in ids]
    if unknown:
        label, row = unknown[0]
        raise AdapterError(
            f"{where_of(row, source)}: label {label!r} is outside the label set {label_set} ({len(unknown)} such "
            "row(s)); fix the data or pass the full set with --labels."
        )
    return _encode_texts(
        rows, tokenizer, max_length, text_column, text_pair_column, [ids[x] for x in raw], source, label_set
    )


def encode_regression(
    rows: list[dict[str, Any]],
    tokenizer,
    max_length: int,
    source: str = "data",
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
) -> Encoded:
    """input_ids/label per row, the label a finite number (STS-B's similarity score). A label that does not parse
    is an error naming its row and column, never skipped."""
    text_column, text_pair_column, label_column = pick_columns(
        rows, text_column, text_pair_column, label_column, TARGET_COLUMNS, source
    )
    targets = []
    for row in rows:
        label = row_label(row, label_column, source)
        value = finite_number(label)
        if value is None:
            raise AdapterError(
                f"{where_of(row, source)}: label {label!r} in column {label_column!r} is not a finite number; "
                "--task regression learns numeric targets: fix the row, or choose the column with --label-column."
            )
        if abs(value) > MAX_TARGET:
            raise AdapterError(
                f"{where_of(row, source)}: label {label!r} in column {label_column!r} is too large for the float32 "
                f"mean squared error (beyond ±{MAX_TARGET:.0e} its square overflows to inf): scale the targets "
                "(e.g. to standard units) and train again."
            )
        targets.append(value)
    return _encode_texts(rows, tokenizer, max_length, text_column, text_pair_column, targets, source, [])


MAX_TARGET = 1e18  # a regression target's square (and its error's) must stay finite in float32 (max ≈ 3.4e38)


def _encode_texts(
    rows: list[dict[str, Any]],
    tokenizer,
    max_length: int,
    text_column: str,
    text_pair_column: str | None,
    targets: list[int] | list[float],
    source: str,
    labels: list[str],
) -> Encoded:
    """Tokenise each row's text (and pair) with its target, counting what truncation cut."""
    texts = [row_text(r, text_column, source) for r in rows]
    pairs = [row_text(r, text_pair_column, source) for r in rows] if text_pair_column else None
    full = tokenizer(texts, pairs, truncation=False)["input_ids"]
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    out = Encoded([], labels=labels)
    out.truncated = sum(len(f) > max_length for f in full)
    out.examples = [{"input_ids": e, "label": t} for e, t in zip(enc["input_ids"], targets, strict=True)]
    if pairs is not None and "token_type_ids" in enc:  # BERT tells a pair's two texts apart by segment ids
        for example, types in zip(out.examples, enc["token_type_ids"], strict=True):
            example["token_type_ids"] = types
    return out


def _refuse_continuous(raw: list[str], rows: list[dict[str, Any]], column: str, source: str) -> None:
    """Numbers with a fraction (STS-B's 3.800) are regression targets, not class names: refuse rather than learn
    each distinct value as a class."""
    for label, row in zip(raw, rows, strict=True):
        try:
            value = float(label)
        except ValueError:
            continue
        if math.isfinite(value) and value != int(value):
            raise AdapterError(
                f"{where_of(row, source)}: label {label!r} in column {column!r} is a number with a fraction, a "
                "regression target (as in STS-B), not a class; --task seq-cls learns classes: train it with --task "
                "regression, give class labels, or pass the classes with --labels if these numbers are class names."
            )


def _label_order(label: str) -> tuple[int, float | str]:
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)


def pad_inputs(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, their attention_mask and, where the examples have them, token_type_ids."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if "token_type_ids" in examples[0]:
        batch["token_type_ids"] = torch.zeros_like(input_ids)
        for i, e in enumerate(examples):
            batch["token_type_ids"][i, : len(e["token_type_ids"])] = torch.tensor(e["token_type_ids"])
    return batch


def pad_token_labels(examples: list[dict[str, Any]], width: int) -> torch.Tensor:
    """Per-token labels right-padded to `width` with -100 (no loss on padding)."""
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
    return labels


def split_eval(examples: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out `fraction` of the examples (a seeded random choice) for evaluation."""
    if fraction <= 0:
        return examples, []
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    n_eval = max(1, int(len(examples) * fraction))
    if n_eval >= len(examples):
        raise AdapterError(f"eval_fraction={fraction} leaves no training examples out of {len(examples)}.")
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in order[:n_eval]]
