"""`nora demo`: the offline end-to-end run — NoRA vs LoRA on a real encoder, accuracy before/after."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import AdapterError
from . import app


@app.command("demo")
def demo(
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where adapters, logs and plots go.")] = Path(
        "runs/demo"
    ),
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps per method (the same budget for each).")] = 30,
    methods: Annotated[str, typer.Option(help="Comma-separated methods to compare.")] = "nora,lora",
    threads: Annotated[
        int, typer.Option(min=1, help="CPU threads (1: the same figures every run, and no stalls on a busy machine).")
    ] = 1,
) -> None:
    """Fine-tune all-MiniLM-L6-v2 (offline, CPU) with NoRA and LoRA on a generated topic task; print accuracy."""
    import datasets
    import torch
    import transformers
    from rich.console import Console
    from rich.table import Table

    from ..atomic import atomic_write_json
    from ..demo import run_demo
    from ..methods import METHODS
    from ..pretrained import check_threads
    from .preflight import check_writable

    chosen = tuple(m.strip() for m in methods.split(","))
    try:  # before the first method trains: a bad later one used to end the demo only after that
        unknown = [m for m in chosen if m not in METHODS]
        if unknown:
            listed = ", ".join(sorted(METHODS))
            raise AdapterError(f"--methods {','.join(unknown)}: not a method; choose from {listed}.")
        if output_dir.exists() and not output_dir.is_dir():
            raise AdapterError(f"--output-dir {output_dir} is a file; give a directory.")
        check_writable(output_dir / "results.json", "--output-dir")
        check_threads(threads)
    except AdapterError as e:
        raise typer.BadParameter(str(e)) from e
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()  # the new head's "missing weights" report is expected here
    datasets.disable_progress_bars()
    console = Console()
    console.print(
        "[bold]nora demo[/]: all-MiniLM-L6-v2 → 4-way topic classification; the test split uses topic words never "
        f"seen in training. {steps} steps per method."
    )
    try:
        rows = run_demo(output_dir, chosen, steps=steps)
    except AdapterError as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:  # checked writable at the start: the disk filled up, or the folder changed since
        raise SystemExit(f"error: cannot write the demo's runs under {output_dir} ({e}); free space there or choose "
                         "another --output-dir.") from None  # fmt: skip
    table = Table(title="held-out accuracy (chance 25 %)")
    for column in (
        "method",
        "before",
        "after",
        "test loss",
        "trainable params",
        "adapter file",
        "train time",
        "run dir",
    ):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r.method, f"{100 * r.accuracy_before:.1f} %", f"{100 * r.accuracy_after:.1f} %",
            f"{r.loss_before:.3f} → {r.loss_after:.4f}",
            f"{r.trainable_params:,}", f"{r.adapter_bytes / 2**10:,.0f} KiB", f"{r.wall_time_s:.0f} s", str(r.run_dir),
        )  # fmt: skip
    console.print(table)
    atomic_write_json([{**vars(r), "run_dir": str(r.run_dir)} for r in rows], output_dir / "results.json")
    console.print(f"adapters: {output_dir}/<method>/adapter   curves: {output_dir}/<method>/curves.png")
