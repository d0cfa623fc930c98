"""GLUE on the real all-MiniLM-L6-v2 encoder: every method side by side with its defaults, several seeds, GLUE's
metric per task; a learning-rate sweep; NoRA ablations. Every run goes through `nora.training.train`, as
`nora train --task seq-cls` (or regression) runs it.

    python benchmarks/glue.py table    --out benchmarks/results/glue   # methods × SST-2/MRPC/CoLA × 3 seeds
    python benchmarks/glue.py sweep    --out benchmarks/results/glue   # methods × 5-6 learning rates, SST-2 and MRPC
    python benchmarks/glue.py ablation --out benchmarks/results/glue   # NoRA variants × learning rates
    python benchmarks/glue.py report   --out benchmarks/results/glue   # tables (markdown + JSON) and the lr plot
    python benchmarks/glue.py table --quick --out /tmp/glue-quick      # seconds: what the test suite runs

Options: --tasks SST-2,MRPC,CoLA (or any subset), --task-dir PATH (any other folder in GLUE's format: train.tsv and
dev.tsv (or dev_matched.tsv) with GLUE's own columns; STS-B-style float labels train as regression), --methods,
--seeds, --threads. Each finished run is one JSON file in <out>/runs/, written when it ends: an interrupted
benchmark resumes where it stopped, and the report reads whatever has finished.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "glue"


@dataclass(frozen=True)
class Method:
    """A row of the table: a nora method with its defaults, or one of the two baselines without an adapter."""

    name: str
    method: str
    adapter: dict[str, Any]
    lr: float | None = None  # None: the method's own default (nora.training.config.default_lr)
    sweep: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)

    @property
    def default_lr(self) -> float:
        from nora.training.config import default_lr

        return self.lr if self.lr is not None else default_lr(self.method)


def _authors() -> dict[str, Any]:
    from nora import NoraConfig

    preset, plain = NoraConfig.authors().to_dict(), NoraConfig().to_dict()
    return {k: v for k, v in preset.items() if v != plain[k] and k != "method"}


# NoRA's defaults until 2026-12-03, the base of the ablation below
OLD_DEFAULT, OLD = "NoRA (old default: r' = 8 on sqrt)", {"inner_r": 8, "placement": "sqrt"}
HIGH = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)  # methods with few trainable values take larger steps
WIDE = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)  # NoRA: LoRA's whole range and above it
METHODS = {
    m.name: m
    for m in (
        Method("head-only", "head-only", {}, sweep=HIGH),
        Method("full FT", "head-only", {"modules_to_save": ["bert", "classifier"]}, lr=5e-5,
               sweep=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3)),
        Method("LoRA", "lora", {}),
        Method("PiSSA", "pissa", {}),
        Method("DoRA", "dora", {}),
        Method("LoRA-XS", "lora-xs", {}, sweep=HIGH),
        Method("NoRA", "nora", {}, sweep=WIDE),  # its defaults: r' = 32 on placement "none"
        Method("NoRA (authors)", "nora", {"authors": True}, lr=1e-2, sweep=WIDE),  # their CLIP protocol's lr
        Method(OLD_DEFAULT, "nora", OLD, sweep=WIDE),
        # r' = 32 alone: at 2e-3 it collapsed on CoLA (seed 0), a wider inner core takes larger steps
        Method("NoRA (r' = 32 on sqrt)", "nora", {"inner_r": 32, "placement": "sqrt"}, lr=1e-3, sweep=WIDE),
        Method("SVFit", "svfit", {}, sweep=HIGH),
        # the paper's rank rule: per matrix the smallest r keeping 99 % of Σσ² (10,550 values on MiniLM, 63× fewer
        # than LoRA's default) instead of r = 32 (1,152)
        Method("SVFit (energy 0.99)", "svfit", {"r": None}, sweep=HIGH),
    )
}  # fmt: skip
assert not any("," in name for name in METHODS), "--methods is comma-separated"

# NoRA's variants for the ablation, on the old defaults (r' = 8 on "sqrt"): what makes its learning-rate optimum
# wide (and high). The old defaults' row is its sweep series; every variant names the fields it sets.
ABLATION = {  # most promising first: a stopped run has measured these
    "placement none (B_o = U, A_o = Vᵀ)": {**OLD, "placement": "none"},
    "scale 1/√r (the authors' alpha=1 with alpha/√r), on sqrt": {**OLD, "use_rslora": True, "alpha": 1.0},
    "outer r = min(d, k) (full rank), on sqrt": {**OLD, "r": 1.0},
    "inner r' = 32, on sqrt": {**OLD, "inner_r": 32},
    "dropout 0.25 (the authors'), on sqrt": {**OLD, "dropout": 0.25},
    "placement out (B_o = U Σ)": {**OLD, "placement": "out"},
    "inner init randn, on sqrt": {**OLD, "inner_init": "randn"},
    "AwSVD (activation-aware outer basis), on none": {**OLD, "placement": "none", "awsvd": True},
    "authors' core (diag, orthogonal), on none": {
        **OLD,
        "placement": "none",
        "inner_core": "diag",
        "inner_init": "orthogonal",
    },
}
ABLATION_LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


@dataclass(frozen=True)
class Task:
    """A GLUE task's files and its training budget (the same for every method)."""

    name: str
    folder: Path
    metrics: tuple[str, ...]  # GLUE's metric(s), the first is the headline
    regression: bool = False
    max_examples: int | None = None  # the first N training rows (None: all)
    epochs: float = 2.0
    batch_size: int = 16
    max_length: int = 128

    @property
    def train(self) -> Path:
        return self.folder / "train.tsv"

    @property
    def dev(self) -> Path:
        return next(p for p in (self.folder / "dev.tsv", self.folder / "dev_matched.tsv") if p.is_file())


_METRICS = {"MRPC": ("f1", "acc"), "QQP": ("f1", "acc"), "CoLA": ("mcc",), "STS-B": ("pearson", "spearman")}


# The sweep and the ablation train on subsets for one epoch (5-6 learning rates × 9 methods at the table's budget
# would take days on a 2-core CPU): MRPC's first 2,000 pairs, scored by accuracy (a diverged run predicting
# "paraphrase" everywhere still has F1 81); SST-2 uses the table's budget. (CoLA's first 4,000 sentences for one
# epoch left LoRA at MCC 0 for 3 of 4 rates: not learned at that budget, so the sweep does not use CoLA.)
TABLE_BUDGET: dict[str, dict[str, Any]] = {
    "SST-2": dict(max_examples=4000, epochs=1.0, batch_size=16, max_length=64),
    "CoLA": dict(epochs=2.0, batch_size=32, max_length=64),
    "MRPC": dict(epochs=2.0, batch_size=16, max_length=128),
}
SWEEP_BUDGET: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "CoLA": ("CoLA-4k", dict(max_examples=4000, epochs=1.0, batch_size=16, max_length=64), ("mcc",)),
    "MRPC": ("MRPC-2k", dict(max_examples=2000, epochs=1.0, batch_size=16, max_length=128), ("acc", "f1")),
}
QUICK_BUDGET = dict(max_examples=48, epochs=1.0, batch_size=16, max_length=64)


def glue_task(folder: Path, quick: bool = False, sweep: bool = False) -> Task:
    """The task in `folder` (named after it, as GLUE's folders are) with its budget: the table's, the sweep's, or
    the quick check's."""
    if not (folder / "train.tsv").is_file():
        sys.exit(f"--task-dir {folder}: no train.tsv; a GLUE folder holds train.tsv and dev.tsv (GLUE's columns).")
    if not any((folder / f).is_file() for f in ("dev.tsv", "dev_matched.tsv")):
        sys.exit(f"--task-dir {folder}: no dev.tsv (or dev_matched.tsv) to score on.")
    name = label = folder.name
    regression = name.upper() in ("STS-B", "STSB")
    metrics = _METRICS.get(name, ("pearson", "spearman") if regression else ("acc",))
    budget = TABLE_BUDGET.get(name, {})
    if sweep and name in SWEEP_BUDGET:
        label, budget, metrics = SWEEP_BUDGET[name]
    if quick:
        folder, budget = _head_of(folder), QUICK_BUDGET
    return Task(label, folder, metrics, regression, **budget)


def _head_of(folder: Path, rows: int = 48) -> Path:
    """A copy of the task's folder with the first `rows` records of each file (the header kept where it has one),
    under the same folder name, so the layout is still read from it."""
    from nora.datafiles import GLUE_LAYOUTS

    layout = GLUE_LAYOUTS.get(folder.name)
    header = 0 if layout is not None and layout.columns is not None else 1
    copy = Path(tempfile.mkdtemp(prefix="nora-glue-quick-")) / folder.name
    copy.mkdir()
    for file in folder.glob("*.tsv"):
        lines = file.read_text(encoding="utf-8").splitlines(keepends=True)
        (copy / file.name).write_text("".join(lines[: header + rows]), encoding="utf-8")
    return copy


def run_key(task: Task, method: str, lr: float, seed: int, variant: str = "") -> str:
    slug = "".join(c if c.isalnum() else "-" for c in f"{method}{'-' + variant if variant else ''}").strip("-")
    return f"{task.name}__{slug}__lr{lr:g}__s{seed}"


def run_one(task: Task, method: Method, seed: int, lr: float, overrides: dict, variant: str, out: Path,
            basis_cache: Path, quick: bool) -> dict[str, Any]:  # fmt: skip
    """Train one configuration (or read it, if it finished before) and return its record."""
    key = run_key(task, method.name, lr, seed, variant)
    from nora.atomic import atomic_write_json
    from nora.demo import minilm_dir
    from nora.training import TrainConfig, train

    path = out / "runs" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    adapter = {**method.adapter, **overrides}
    if adapter.pop("authors", False):
        adapter = {**_authors(), **adapter}
    adapter.setdefault("basis_cache_dir", str(basis_cache))  # each SVD once, not once per run
    work = Path(tempfile.mkdtemp(prefix="nora-glue-"))
    try:
        config = TrainConfig(
            model=str(minilm_dir()), task="regression" if task.regression else "seq-cls", data=str(task.train),
            eval_data=str(task.dev), method=method.method, adapter=adapter, learning_rate=lr, seed=seed,
            max_examples=task.max_examples, epochs=task.epochs, max_steps=3 if quick else None,
            batch_size=task.batch_size, max_length=task.max_length, group_by_length=True, warmup_ratio=0.06,
            output_dir=str(work / "run"), logging_steps=50, overwrite=True, plot=False, progress=False,
        )  # fmt: skip
        summary = train(config).summary
        resolved = json.loads((work / "run" / "train_config.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)  # a full fine-tuning "adapter" is the whole encoder
    record = {
        "key": key, "task": task.name, "method": method.name, "seed": seed, "lr": resolved["learning_rate"],
        "overrides": overrides, "variant": variant, "metrics": {m: summary.get(f"eval_{m}") for m in task.metrics},
        "metric_names": list(task.metrics),  # GLUE's metric first (the JSON file sorts the keys of "metrics")
        "initial": {m: summary.get(f"initial_eval_{m}") for m in task.metrics},
        "adapter_params": summary["trainable_params"] - summary["head_params"],
        "trainable_params": summary["trainable_params"], "head_params": summary["head_params"],
        "steps": summary["steps"], "examples": summary["examples"], "wall_time_s": summary["wall_time_s"],
        "first_loss": summary["first_loss"], "final_loss": summary["final_loss"],
        "eval_loss": summary.get("eval_loss"), "adapter_config": resolved["adapter"],
        "budget": {"epochs": task.epochs, "batch_size": task.batch_size, "max_length": task.max_length,
                   "max_examples": task.max_examples},
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, path)  # a run is recorded whole or not at all
    return record


def _print(record: dict[str, Any]) -> None:
    scores = "  ".join(f"{m} {_pct(record['metrics'][m])}" for m in _metric_names(record))
    name = f"{record['method']} [{record['variant']}]" if record["variant"] else record["method"]
    print(f"{record['task']:6s} {name:16s} seed {record['seed']} lr {record['lr']:<7g} {scores}  "
          f"loss {record['first_loss']:.3f}→{record['final_loss']:.3f}  adapter {record['adapter_params']:,}  "
          f"{record['wall_time_s']:.0f} s", flush=True)  # fmt: skip


def _metric_names(record: dict[str, Any]) -> list[str]:
    return record.get("metric_names") or list(record["metrics"])  # runs recorded before metric_names: in order


def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


# ---- report ----------------------------------------------------------------------------------------------------
def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table_rows(records: list[dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    """Per method and task: the headline metric's mean ± std over seeds (defaults only: no lr or field override)."""
    summary: dict[str, Any] = {}
    defaults = {m.name: m.default_lr for m in METHODS.values()}
    for r in records:
        if r["overrides"] or r["variant"] or not math.isclose(r["lr"], defaults.get(r["method"], math.nan)):
            continue  # the table is each method at its defaults; other runs belong to the sweep
        cell = summary.setdefault(r["method"], {}).setdefault(r["task"], {"runs": []})
        cell["runs"].append(r)
    for cells in summary.values():
        for cell in cells.values():
            runs = cell.pop("runs")
            metric_names = _metric_names(runs[0])
            cell["seeds"] = sorted(r["seed"] for r in runs)
            for m in metric_names:
                values = [r["metrics"][m] for r in runs if r["metrics"][m] is not None]
                if values:
                    cell[m] = dict(zip(("mean", "std"), _mean_std(values), strict=True))
            cell["headline"], cell["metrics"] = metric_names[0], metric_names
            cell["adapter_params"] = runs[0]["adapter_params"]
            cell["trainable_params"] = runs[0]["trainable_params"]
            cell["wall_time_s"] = statistics.fmean(r["wall_time_s"] for r in runs)
            cell["lr"] = runs[0]["lr"]
    return {m: summary[m] for m in METHODS if m in summary} | {m: v for m, v in summary.items() if m not in METHODS}


def markdown_table(summary: dict[str, Any], tasks: list[str]) -> str:
    head = ["method", "lr"]
    for t in tasks:
        head.append(f"{t} ({_metric_of(summary, t)})")
    head += ["adapter params", "with head", "wall time × LoRA"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lora_wall = {t: summary.get("LoRA", {}).get(t, {}).get("wall_time_s") for t in tasks}
    for method, cells in summary.items():
        row = [method, f"{next(iter(cells.values()))['lr']:g}"]
        for t in tasks:
            c = cells.get(t)
            if c is None or c["headline"] not in c:
                row.append("–")
                continue
            m = c[c["headline"]]
            cell = f"{100 * m['mean']:.1f} ± {100 * m['std']:.1f}"
            cell += "".join(f" / {100 * c[k]['mean']:.1f}" for k in c["metrics"][1:] if k in c)
            row.append(f"{cell} ({len(c['seeds'])})")
        first = next(iter(cells.values()))
        row += [f"{first['adapter_params']:,}", f"{first['trainable_params']:,}"]
        ratios = [cells[t]["wall_time_s"] / lora_wall[t] for t in tasks if t in cells and lora_wall.get(t)]
        row.append(f"{statistics.fmean(ratios):.2f}" if ratios else "–")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


_NAMES = {"acc": "accuracy", "f1": "F1", "mcc": "Matthews corr.", "pearson": "Pearson", "spearman": "Spearman"}


def _metric_of(summary: dict[str, Any], task: str) -> str:
    for cells in summary.values():
        if task in cells:
            return " / ".join(_NAMES.get(m, m) for m in cells[task]["metrics"])
    return " / ".join(_NAMES.get(m, m) for m in _METRICS.get(task, ("acc",)))


def sweep_rows(
    records: list[dict[str, Any]], kind: str, min_rates: int = 3
) -> dict[str, dict[str, dict[float, float]]]:
    """task → series name → {lr: headline metric} for the sweep (kind "sweep") or the ablation ("ablation"); a
    series of fewer than `min_rates` rates (a table run, a stray rate) is not a sweep."""
    out: dict[str, dict[str, dict[float, float]]] = {}
    for r in records:
        if r["seed"] != 0:
            continue
        defaults_row = kind == "ablation" and r["method"] == OLD_DEFAULT and r["lr"] in ABLATION_LRS
        if (kind == "ablation") != bool(r["variant"]) and not defaults_row:
            continue
        name = "NoRA (old defaults)" if defaults_row else r["variant"] or r["method"]
        headline = r["metrics"][_metric_names(r)[0]]
        out.setdefault(r["task"], {}).setdefault(name, {})[r["lr"]] = math.nan if headline is None else headline
    swept = {t: {n: p for n, p in series.items() if len(p) >= min_rates} for t, series in out.items()}
    if kind == "ablation":  # a task with no variant run has only the defaults' row: nothing was ablated there
        swept = {t: series for t, series in swept.items() if set(series) - {"NoRA (old defaults)"}}
    return {t: series for t, series in swept.items() if series}


def markdown_sweep(rows: dict[str, dict[str, dict[float, float]]]) -> str:
    parts = []
    for task, series in rows.items():
        lrs = sorted({lr for s in series.values() for lr in s})
        lines = [f"**{task}**", "", "| | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|" + "---|" * (len(lrs) + 1)]
        for name, points in series.items():
            best = max((v for v in points.values() if not math.isnan(v)), default=None)
            cells = []
            for lr in lrs:
                v = points.get(lr)
                text = "" if v is None else _pct(v)
                cells.append(f"**{text}**" if v is not None and v == best else text)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot_sweep(rows: dict[str, dict[str, dict[float, float]]], path: Path, title: str) -> Path | None:
    if not rows:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.4 * len(rows), 4.0))
    FigureCanvasAgg(fig)
    for i, (task, series) in enumerate(rows.items()):
        ax = fig.add_subplot(1, len(rows), i + 1)
        for name, points in series.items():
            lrs = sorted(points)
            ax.plot(lrs, [100 * points[lr] for lr in lrs], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("dev metric (%)")
        ax.set_title(f"{task}: {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def report(out: Path, tasks: list[str]) -> dict[str, Any]:
    records = _records(out)
    summary = table_rows(records, tasks)
    sweep, ablation = sweep_rows(records, "sweep"), sweep_rows(records, "ablation")
    payload = {"table": summary, "sweep": _json_keys(sweep), "ablation": _json_keys(ablation), "runs": len(records)}
    (out / "glue.json").write_text(json.dumps(payload, indent=1))
    md = ["## Defaults, mean ± std over seeds (count)", "", markdown_table(summary, tasks)]
    if sweep:
        md += ["", "## Learning-rate sweep (seed 0; bold: each method's best)", "", markdown_sweep(sweep)]
        plot_sweep(sweep, out / "lr_sweep.png", "methods")
    if ablation:
        md += ["", "## NoRA ablation (seed 0)", "", markdown_sweep(ablation)]
        plot_sweep(ablation, out / "nora_ablation.png", "NoRA variants")
    (out / "glue.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return payload


def _json_keys(rows: dict[str, dict[str, dict[float, float]]]) -> dict:
    return {t: {n: {f"{lr:g}": v for lr, v in p.items()} for n, p in s.items()} for t, s in rows.items()}


# ---- main ------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("table", "sweep", "ablation", "report"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "glue")
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--tasks", default=None, help="comma-separated (default: SST-2,MRPC,CoLA; sweep: SST-2,CoLA)")
    parser.add_argument("--task-dir", type=Path, action="append", default=[], help="another GLUE-format folder")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--basis-cache", type=Path, default=Path.home() / ".cache" / "nora" / "glue-bases")
    parser.add_argument("--quick", action="store_true", help="48 examples, 3 steps, seed 0: an end-to-end check")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    default_tasks = "SST-2,MRPC" if args.mode in ("sweep", "ablation") else "SST-2,MRPC,CoLA"
    names = [t for t in (args.tasks or default_tasks).split(",") if t]
    sweep = args.mode in ("sweep", "ablation")
    tasks = [glue_task(args.data_dir / n, args.quick, sweep) for n in names] + [
        glue_task(d, args.quick, sweep) for d in args.task_dir
    ]
    if args.mode == "report":
        return report(args.out, [t.name for t in tasks])
    method_names = args.methods.split(",")
    unknown = [m for m in method_names if m not in METHODS]
    if unknown:
        sys.exit(
            f"--methods: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(METHODS)} (comma-separated)."
        )
    methods = [METHODS[m] for m in method_names]
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()
    for task in tasks:
        for method in methods:
            if args.mode == "table":
                jobs = [(seed, method.default_lr, {}, "") for seed in seeds]
            elif args.mode == "sweep":
                lrs = method.sweep[:3] if args.quick else sorted({*method.sweep, method.default_lr})
                jobs = [(0, lr, {}, "") for lr in lrs]
            else:
                if method.method != "nora" or method.adapter:
                    continue
                variants = list(ABLATION.items())[:2] if args.quick else ABLATION.items()
                lrs = ABLATION_LRS[:1] if args.quick else ABLATION_LRS
                jobs = [(0, lr, fields, name) for name, fields in variants for lr in lrs]
            for seed, lr, fields, variant in jobs:
                _print(run_one(task, method, seed, lr, fields, variant, args.out, args.basis_cache, args.quick))
    print(f"finished in {time.perf_counter() - start:.0f} s", flush=True)
    return report(args.out, [t.name for t in tasks])


if __name__ == "__main__":
    main()
