"""Results as terminal tables (rich), one per protocol, and as JSON."""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console
from rich.table import Table

from ..atomic import atomic_write_json

METRICS = {
    "loglik": ("acc", "acc_norm"),
    "loglik-label": ("acc",),
    "generate": ("acc", "unparsed"),
    "classification": ("acc", "f1", "macro_f1", "mcc"),
    "regression": ("pearson", "spearman"),
    "image-classification": ("acc", "top5_acc"),
}


def results_tables(results: dict[str, dict[str, Any]], title: str | None = None) -> list[Table]:
    """For each protocol, one row per task and the average: the example count and the rates in %."""
    tables = []
    for protocol, section in results.items():
        metrics = METRICS.get(protocol, ("acc",))
        table = Table(title=f"{title}: {protocol}" if title else protocol, title_justify="left")
        table.add_column("task")
        table.add_column("n", justify="right")
        for metric in metrics:
            table.add_column(metric, justify="right")
        rows = [*section["tasks"].items(), ("average", section["average"])]
        for index, (task, values) in enumerate(rows):
            cells = [_cell(values.get(metric), metric, values.get(f"{metric}_stderr")) for metric in metrics]
            table.add_row(task, str(values["n"]), *cells, end_section=index == len(rows) - 2)
        tables.append(table)
    return tables


def print_results(results: dict[str, dict[str, Any]], title: str | None = None, console: Console | None = None) -> None:
    console = console or Console()
    for table in results_tables(results, title):
        console.print(table)


def write_results(payload: dict[str, Any], path: str | os.PathLike) -> None:
    atomic_write_json(payload, path)


def _cell(value: Any, metric: str, stderr: float | None = None) -> str:
    if value is None:
        return "–"
    if metric == "unparsed":
        return str(value)
    return f"{100 * value:.1f}" + (f" ± {100 * stderr:.1f}" if stderr is not None else "")
