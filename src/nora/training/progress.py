"""The training progress bar: steps, loss, learning rate and throughput (rich), silent on other processes."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProgressBar:
    """`counts` names what the rate counts: "tokens" for text, "images" for image tasks (the task kind's `counts`)."""

    def __init__(self, total: int, done: int = 0, enabled: bool = True, counts: str = "tokens") -> None:
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(f"loss {{task.fields[loss]}}  lr {{task.fields[lr]}}  {{task.fields[rate]}} {counts}/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not enabled,
        )
        self._task = self._progress.add_task("train", total=total, completed=done, loss="-", lr="-", rate="-")

    def __enter__(self) -> ProgressBar:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def update(self, step: int, loss: float | None = None, lr: float | None = None, rate: float | None = None):
        fields = {}
        if loss is not None:
            fields = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "rate": f"{rate:,.0f}"}
        self._progress.update(self._task, completed=step, **fields)
