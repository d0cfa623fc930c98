"""Plots of a training run: its learning curves, and the singular-value spectrum of adapted layers.

A run directory (written by `nora train`) holds `log.jsonl` — training lines {"step", "epoch", "loss", "lr",
"tokens_per_s"} and evaluation lines {"step", "eval_loss", "eval_<metric>", ...} in any mix, the last one possibly
cut short by a crash — and the final adapter in `adapter/`. Figures are drawn with matplotlib's Agg canvas (no
display, no pyplot state) and written atomically.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import _atomic
from .errors import AdapterError

LOG_NAME = "log.jsonl"
ADAPTER_DIR = "adapter"
CURVES_NAME = "curves.png"
SPECTRUM_NAME = "spectrum.png"
_DPI = 110


# ---- the log -----------------------------------------------------------------------------------------------------
@dataclass
class RunLog:
    """Training and evaluation series by step (the last line logged for a step wins, as after a resume)."""

    train: dict[int, dict[str, float]] = field(default_factory=dict)
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    skipped: int = 0  # unreadable lines (a truncated last line is expected and not counted)

    def series(self, which: str, key: str) -> tuple[list[int], list[float]]:
        records = self.train if which == "train" else self.evals
        steps = [s for s in sorted(records) if key in records[s]]
        return steps, [records[s][key] for s in steps]

    @property
    def eval_metrics(self) -> list[str]:
        names = {k for rec in self.evals.values() for k in rec}
        return sorted(names, key=lambda k: (k != "eval_loss", k))


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def read_log(path: str | os.PathLike) -> RunLog:
    """Parse a run's log.jsonl, tolerating a truncated last line; unknown keys are ignored."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path} does not exist: not a training run directory (nora train writes {LOG_NAME} there).")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    log = RunLog()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i < len(lines) - 1:  # the last line may be cut short by a crash mid-write; others should not be
                log.skipped += 1
            continue
        step = _number(record.get("step")) if isinstance(record, dict) else None
        if step is None:
            log.skipped += 1
            continue
        if _number(record.get("loss")) is not None:
            keys = ("loss", "lr", "epoch", "tokens_per_s")
            log.train[int(step)] = {k: _number(record[k]) for k in keys if _number(record.get(k)) is not None}
        metrics = {k: _number(v) for k, v in record.items() if k.startswith("eval_") and _number(v) is not None}
        if metrics:
            log.evals.setdefault(int(step), {}).update(metrics)
    if log.skipped:
        warnings.warn(f"{path}: skipped {log.skipped} unreadable line(s).", stacklevel=2)
    if not log.train and not log.evals:
        raise AdapterError(
            f"{path} holds no training or evaluation records (lines with a step and a loss or eval_* metric): "
            "nothing to plot. Has the run logged its first step yet?"
        )
    return log


def smooth(values: Sequence[float], weight: float | None = None) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing); NaNs are skipped. The weight grows with
    the number of points, so a long run gets a smoother line."""
    n = len(values)
    if weight is None:
        weight = min(0.95, 1.0 - 2.0 / (max(2, n // 15) + 1))
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        if math.isfinite(v):
            avg = weight * avg + (1 - weight) * v
            norm = weight * norm + (1 - weight)
        out.append(avg / norm if norm > 0 else math.nan)
    return out


# ---- figures -----------------------------------------------------------------------------------------------------
def _figure(n_panels: int, width: float = 5.2, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(3, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def _save(fig, out: Path) -> Path:
    _atomic(out, lambda tmp: fig.savefig(tmp, format="png", dpi=_DPI))
    return out


def _label(metric: str) -> str:
    return metric.removeprefix("eval_").replace("_", " ")


def plot_curves(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Training loss (raw and smoothed, evaluation loss overlaid), learning rate, and one panel per evaluation
    metric, against the optimizer step. Writes RUN_DIR/curves.png (or `out`) and returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AdapterError(f"run directory {run_dir} does not exist.")
    log = read_log(run_dir / LOG_NAME)
    steps, loss = log.series("train", "loss")
    lr_steps, lr = log.series("train", "lr")
    metrics = log.eval_metrics
    panels = (["loss"] if steps else []) + (["lr"] if lr_steps else []) + metrics
    fig, axes = _figure(len(panels))
    fig.suptitle(f"{run_dir.resolve().name}: training curves", fontsize=12)
    ax_of = dict(zip(panels, axes, strict=True))
    if steps:
        ax = ax_of["loss"]
        ax.plot(steps, loss, color="tab:blue", alpha=0.3, lw=1, label="train loss")
        ax.plot(steps, smooth(loss), color="tab:blue", lw=2, label="train loss (smoothed)")
        if "eval_loss" in metrics:
            ax.plot(*log.series("eval", "eval_loss"), "o-", color="tab:orange", ms=4, label="eval loss")
        ax.set(title="loss", xlabel="step", ylabel="loss")
        last = log.train[steps[-1]]
        if "epoch" in last:
            ax.set_title(f"loss (step {steps[-1]}, epoch {last['epoch']:.2f})")
        ax.legend(fontsize=8)
    if lr_steps:
        ax = ax_of["lr"]
        ax.plot(lr_steps, lr, color="tab:green", lw=1.5, label="learning rate")
        ax.set(title="learning rate", xlabel="step", ylabel="lr")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.legend(fontsize=8)
    for metric in metrics:
        ax = ax_of[metric]
        ax.plot(*log.series("eval", metric), "o-", color="tab:orange", ms=4, label=metric)
        ax.set(title=f"eval: {_label(metric)}", xlabel="step", ylabel=_label(metric))
        ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    return _save(fig, Path(out) if out is not None else run_dir / CURVES_NAME)


# ---- the spectrum ------------------------------------------------------------------------------------------------
@dataclass
class LayerSpectrum:
    name: str
    method: str
    r: int  # the adapter's rank: for basis methods, the outer basis spans the top-r singular directions
    shaded: bool  # whether the method's outer basis is the top-r SVD subspace of W (basis methods)
    sigma: torch.Tensor  # singular values of W
    sigma_adapted: torch.Tensor  # singular values of W + ΔW (W merged with the adapter)
    activation_aware: bool = False


def load_base_model(base: str, num_labels: int | None = None):
    """The base model in the class its config names (the class the adapter's layer names refer to); a
    sequence classifier with `num_labels` classes when the adapter was trained as one (`nora train --task seq-cls`)."""
    import transformers

    try:
        if num_labels is not None:
            cls = transformers.AutoModelForSequenceClassification
            return cls.from_pretrained(base, num_labels=num_labels, dtype=torch.float32).eval()
        config = transformers.AutoConfig.from_pretrained(base)
        arch = next(iter(getattr(config, "architectures", None) or []), None)
        cls = getattr(transformers, arch, None) if arch else None
        cls = cls or transformers.AutoModelForCausalLM
        return cls.from_pretrained(base, dtype=torch.float32).eval()
    except (OSError, ValueError) as e:
        raise AdapterError(f"cannot load the base model {base!r} ({e}); pass the right one with --base.") from e


def _select(available: list[str], wanted: list[str] | None) -> list[str]:
    if not wanted:
        return available if len(available) <= 2 else [available[0], available[-1]]
    chosen = []
    for name in wanted:
        if name in available:
            chosen.append(name)
            continue
        matches = [a for a in available if a.endswith("." + name)]
        if len(matches) != 1:
            why = "matches several adapted layers" if matches else "is not an adapted layer"
            shown = ", ".join((matches or available)[:6]) + ("…" if len(matches or available) > 6 else "")
            raise AdapterError(f"--layer {name!r} {why}; adapted layers include: {shown}.")
        chosen.append(matches[0])
    return chosen


@torch.no_grad()
def layer_spectra(adapted, layers: list[str] | None = None, adapter_name: str = "default") -> list[LayerSpectrum]:
    """σ(W) and σ(W + ΔW) of adapted layers, with ΔW from the method's own merge (DoRA's rescaling included)."""
    all_layers = adapted.layers()
    available = [n for n, layer in all_layers.items() if adapter_name in layer.adapters]
    if not available:
        raise AdapterError(f"adapter {adapter_name!r} adapts no layer of this model.")
    spectra = []
    for name in _select(available, layers):
        layer = all_layers[name]
        core = layer.adapters[adapter_name]
        basis = layer.basis_of(core)
        W = layer.base_weight().detach()
        merged, _ = layer.merged_weight(core)
        spectra.append(
            LayerSpectrum(
                name=name,
                method=core.method.name,
                r=core.r,
                shaded=core.method.uses_basis,
                sigma=torch.linalg.svdvals(W.double()),
                sigma_adapted=torch.linalg.svdvals(merged.double()),
                activation_aware=basis is not None and basis.scales is not None,
            )
        )
    return spectra


def draw_spectra(spectra: list[LayerSpectrum], out: Path, title: str) -> Path:
    """Per layer, σ_i on a log scale (top) and the relative change of σ_i (bottom; the change is often far below
    the spectrum's scale). Both spectra are sorted, so a changed top value may move past σ_r and show there."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(3, len(spectra))
    nrows = math.ceil(len(spectra) / ncols)
    fig = Figure(figsize=(5.6 * ncols, 5.4 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2 * nrows, ncols, height_ratios=[3, 1.3] * nrows)
    fig.suptitle(title, fontsize=12)
    for k, sp in enumerate(spectra):
        row, col = divmod(k, ncols)
        ax = fig.add_subplot(grid[2 * row, col])
        change = fig.add_subplot(grid[2 * row + 1, col], sharex=ax)
        idx = torch.arange(len(sp.sigma)).numpy()
        sigma, adapted = sp.sigma.numpy(), sp.sigma_adapted.numpy()
        floor = max(float(sigma.max()) * 1e-12, 1e-30)
        if sp.shaded:
            what = "AwSVD" if sp.activation_aware else "SVD"
            for a in (ax, change):
                a.axvspan(-0.5, sp.r - 0.5, color="tab:purple", alpha=0.12, label=f"outer basis: top-{sp.r} {what}")
        ax.semilogy(idx, sigma.clip(floor), "o-", color="tab:blue", ms=2.5, lw=1.2, label="σ(W)")
        ax.semilogy(idx, adapted.clip(floor), "s--", color="tab:red", ms=2, lw=1, label="σ(W + ΔW)")
        ax.set(title=f"{sp.name}\n{sp.method}, r = {sp.r}", ylabel="singular value σ_i")
        ax.tick_params(labelbottom=False)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        change.plot(idx, (adapted - sigma) / sigma.clip(floor), color="tab:red", lw=1.2)
        change.axhline(0, color="grey", lw=0.6)
        change.set(xlabel="index i (sorted)", ylabel="σ_i(W+ΔW)/σ_i(W) − 1")
        change.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        change.yaxis.label.set_fontsize(8)
        change.grid(alpha=0.3)
    return _save(fig, out)


def _trained_labels(run_dir: Path) -> int | None:
    """The class count of a `nora train --task seq-cls` run (its summary records the label set), else None."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    labels = summary.get("labels") if isinstance(summary, dict) else None
    return len(labels) if labels else None


def plot_spectrum(
    adapter_dir: str | os.PathLike,
    layers: list[str] | None = None,
    base_model: str | None = None,
    out: str | os.PathLike | None = None,
) -> Path:
    """Singular values of the base weights of some adapted layers (default: the first and the last), with the
    adapted subspace shaded (indices [0, r) for methods on an outer SVD basis: NoRA, SVFit, PiSSA, LoRA-XS) and
    the spectrum of W + ΔW. Writes `out` (default: spectrum.png beside the adapter directory) and returns it."""
    from .io import CONFIG_NAME, read_adapter
    from .model import AdaptedModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / CONFIG_NAME).is_file():
        raise AdapterError(
            f"{adapter_dir} has no {CONFIG_NAME}: no adapter to plot (a run writes its adapter to RUN_DIR/"
            f"{ADAPTER_DIR} when training ends)."
        )
    config, _, _ = read_adapter(adapter_dir)
    base = base_model or config.base_model_name_or_path
    if not base:
        raise AdapterError(f"{adapter_dir} records no base model; pass it with --base.")
    adapted = AdaptedModel.from_pretrained(load_base_model(base, _trained_labels(adapter_dir.parent)), adapter_dir)
    spectra = layer_spectra(adapted, layers)
    out = Path(out) if out is not None else adapter_dir.parent / SPECTRUM_NAME
    return draw_spectra(spectra, out, f"{config.method} adapter {adapter_dir}: singular values of W and W + ΔW")
