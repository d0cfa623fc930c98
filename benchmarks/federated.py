"""Federated fine-tuning of the real all-MiniLM-L6-v2 encoder on GLUE SST-2 and MRPC split over 10 clients (IID, and
label-skewed by Dirichlet α = 1.0 and 0.1), every aggregation rule side by side, several seeds: accuracy per round,
bytes per round and the aggregation error ‖Σ p_i ΔW_i − ΔW_global‖ of every rule; centralised training on the pooled
data with the same number of optimizer steps is the ceiling.

    python benchmarks/federated.py run    --out benchmarks/results/federated              # rows×tasks×splits×seeds
    python benchmarks/federated.py run    --out benchmarks/results/federated --shard 1/2  # half of the runs
    python benchmarks/federated.py report --out benchmarks/results/federated              # tables, JSON, the plot
    python benchmarks/federated.py run --quick --out /tmp/fed-quick                       # seconds: a smoke run

Every run is `nora.federated.federate(..., runtime="inline")`: the ClientApp's and ServerApp's own code (the same
Participant, train_client and Coordinator) called in one process, one client after another, without Flower's
transport, which would add process start-up but not change a number (tests/test_federated_run.py checks that a
Flower simulation and an inline run give the same history). Each finished run is one JSON file in <out>/runs/,
written when it ends: an interrupted benchmark resumes where it stopped, and the report reads what has finished.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "glue"


@dataclass(frozen=True)
class Row:
    name: str
    method: str
    rule: str
    central: bool = False  # one client holding all the data, the same number of optimizer steps


ROWS = [
    Row("centralised LoRA", "lora", "fedavg", central=True),
    Row("centralised NoRA", "nora", "product", central=True),
    Row("LoRA FedAvg", "lora", "fedavg"),
    Row("LoRA FFA", "lora", "ffa"),
    Row("LoRA FLoRA", "lora", "flora"),
    Row("LoRA-XS", "lora-xs", "mean"),
    Row("SVFit", "svfit", "mean"),
    Row("NoRA product", "nora", "product"),
    Row("NoRA frozen-A", "nora", "frozen-a"),
]
SPLITS = {"iid": ("iid", None), "dir1.0": ("dirichlet-equal", 1.0), "dir0.1": ("dirichlet-equal", 0.1)}


@dataclass(frozen=True)
class Privacy:
    """Central DP for the `--dp` grid: every row's clip is the median client update norm of its own first round
    without DP (clipping at the median, Andrew et al.'s target), so the noise multiplier means the same for every
    row: noise of std noise × clip / clients on each value sent."""

    noise: float = 0.01
    task: str = "SST-2"
    split: str = "iid"


DP = Privacy()
DP_ROWS = [r for r in ROWS if not r.central and r.rule != "flora"]  # FLoRA's fresh factors take no DP


@dataclass(frozen=True)
class Budget:
    max_examples: int | None
    max_length: int
    metric: str
    clients: int = 10
    rounds: int = 5
    local_steps: int = 5
    batch_size: int = 16
    also: tuple[str, ...] = ()  # further metrics reported, each its own table and gaps
    plotted: str | None = None  # the metric of the per-round plot (default: metric)

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.metric, *self.also)


BUDGETS = {
    "SST-2": Budget(4000, 64, "eval_acc"),  # the GLUE table's SST-2 budget: 250 steps of 16
    # all 3,668 pairs: 250 steps of 16 (1.1 epochs); F1 is GLUE's, but "paraphrase" for every pair scores 81.2, so
    # Matthews correlation (0 for any constant answer) and accuracy say whether a row learned anything
    "MRPC": Budget(None, 128, "eval_f1", also=("eval_mcc", "eval_acc"), plotted="eval_mcc"),
}
QUICK = Budget(64, 32, "eval_acc", clients=3, rounds=2, local_steps=1, batch_size=8)


def key(task: str, row: Row, split: str, seed: int, dp: float | None = None) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in row.name)
    return f"{task}__{slug}__{'central' if row.central else split}__s{seed}" + (f"__dp{dp:g}" if dp else "")


def run_one(task: str, row: Row, split: str, seed: int, budget: Budget, out: Path, quick: bool,
            dp: tuple[float, float] | None = None) -> dict[str, Any]:  # fmt: skip
    """One run (dp: its noise multiplier and clip), read back if its JSON is in <out>/runs/."""
    from nora.atomic import atomic_write_json
    from nora.demo import minilm_dir
    from nora.federated.config import FederatedConfig
    from nora.federated.run import federate
    from nora.training.config import TrainConfig

    path = out / "runs" / f"{key(task, row, split, seed, dp and dp[0])}.json"
    if path.is_file():
        return json.loads(path.read_text())
    folder = DATA / task
    scheme, alpha = SPLITS[split]
    clients = 1 if row.central else budget.clients
    local_steps = budget.local_steps * (budget.clients if row.central else 1)
    train = TrainConfig(
        model=str(minilm_dir()), task="seq-cls", data=str(folder / "train.tsv"), eval_data=str(folder / "dev.tsv"),
        method=row.method, max_examples=budget.max_examples, max_length=budget.max_length,
        batch_size=budget.batch_size, lr_scheduler="constant", seed=seed, threads=1, progress=False,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="nora-fed-") as tmp:
        fc = FederatedConfig(
            train=train, clients=clients, split="iid" if row.central else scheme, alpha=None if row.central else alpha,
            rounds=budget.rounds, local_steps=local_steps, rule=row.rule, output_dir=f"{tmp}/run",
            dp_noise=dp and dp[0], dp_clip=dp and dp[1],
        )  # fmt: skip
        started = time.perf_counter()
        result = federate(fc, runtime="inline")
        wall = time.perf_counter() - started
        trainable = _trainable(result.adapter_dir)
    record = {
        "task": task, "row": row.name, "method": row.method, "rule": row.rule, "central": row.central,
        "split": "central" if row.central else split, "seed": seed, "lr": train.lr, "metric": budget.metric,
        "budget": budget.__dict__, "history": result.history, "wall_s": wall, **trainable, "quick": quick,
        "dp": None if dp is None else {"noise": dp[0], "clip": dp[1]},
    }  # fmt: skip
    atomic_write_json(record, path)
    return record


def dp_clip(row: Row, budget: Budget, out: Path) -> float:
    """The row's clip: the median client update norm of one round without DP (seed 0), kept in <out>/dp-clip/."""
    from nora.atomic import atomic_write_json

    path = out / "dp-clip" / f"{key(DP.task, row, DP.split, 0)}.json"
    if not path.is_file():
        with tempfile.TemporaryDirectory(prefix="nora-fed-probe-") as tmp:
            record = run_one(DP.task, row, DP.split, 0, replace(budget, rounds=1), Path(tmp), quick=False)
        atomic_write_json({"row": row.name, "update_norm": record["history"][1]["update_norm"]}, path)
    return json.loads(path.read_text())["update_norm"]


def _trainable(adapter_dir: Path) -> dict[str, int]:
    from nora.io import SAVE_PREFIX, read_adapter

    _, tensors, _ = read_adapter(adapter_dir)
    adapter = sum(t.numel() for k, t in tensors.items() if not k.startswith(SAVE_PREFIX))
    head = sum(t.numel() for k, t in tensors.items() if k.startswith(SAVE_PREFIX))
    return {"adapter_values": adapter, "head_values": head}


def jobs(tasks: list[str], seeds: list[int], splits: list[str], rows: list[Row]) -> list[tuple[str, Row, str, int]]:
    """Seed-major, so a stopped benchmark has whole seeds."""
    out = []
    for seed in seeds:
        for task in tasks:
            for row in rows:
                for split in [splits[0]] if row.central else splits:
                    out.append((task, row, split, seed))
    return out


# ---- report ---------------------------------------------------------------------------------------------------------
def _final(record: dict[str, Any], metric: str | None = None) -> float:
    return 100 * record["history"][-1][metric or record["metric"]]


def _mean_std(values: list[float]) -> str:
    if not values:
        return ""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {std:.1f} ({len(values)})"


def report(out: Path) -> dict[str, Any]:
    """The tables, JSON and plot of the finished runs in <out>/runs: per task, only the seeds whose whole grid
    (every row and split) has finished, so every cell averages the same seeds."""
    records = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    records = [r for r in records if not r.get("quick")]
    private = [r for r in records if r.get("dp")]
    records, lines = _whole_seeds([r for r in records if not r.get("dp")])
    summary: dict[str, Any] = {"tables": {}, "fedavg_gap": {}}
    for task, metric in [(t, m) for t in BUDGETS for m in BUDGETS[t].metrics]:
        mine = [r for r in records if r["task"] == task]
        if not mine:
            continue
        name = task if metric == BUDGETS[task].metric else f"{task} {metric.removeprefix('eval_')}"
        head = " | ".join(SPLITS)
        lines += [f"#### {task} — final {metric.removeprefix('eval_')} (× 100) after {BUDGETS[task].rounds} rounds, "
                  "mean ± std (seeds)", "",
                  f"| row | rule | exact | {head} | values up per client per round | values down per client, last "
                  "round | aggregation error (mean) |",
                  "|---|---|---|" + "---|" * len(SPLITS) + "---|---|---|"]  # fmt: skip
        for row in ROWS:
            runs = [r for r in mine if r["row"] == row.name]
            if not runs:
                continue
            cells = []
            for split in SPLITS:
                chosen = [r for r in runs if r["split"] == ("central" if row.central else split)]
                cells.append(_mean_std([_final(r, metric) for r in chosen]))
            fed = runs[0]["history"][1:]
            per_client = fed[0]["bytes_up"] // max(1, len(fed[0]["clients"])) // 4
            down = fed[-1]["bytes_down"] // max(1, len(fed[-1]["clients"])) // 4
            errors = [h["aggregation_error"] for r in runs for h in r["history"][1:]]
            exact = "—" if row.central else ("yes" if all(h["exact"] for h in fed) else "no")
            error = "—" if row.central else f"{statistics.mean(errors):.2e}"
            lines.append(f"| {row.name} | {row.rule} | {exact} | " + " | ".join(cells) +
                         f" | {per_client:,} | {down:,} | {error} |")  # fmt: skip
            summary["tables"].setdefault(name, {})[row.name] = {s: c for s, c in zip(SPLITS, cells, strict=True)}
        lines += ["", *_gaps(mine, name, metric, summary), ""]
    lines += _privacy(private, records, summary)
    text = "\n".join(lines)
    (out / "federated.md").write_text(text + "\n")
    (out / "federated.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(records, out)
    print(text)
    return summary


def _whole_seeds(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The runs of each task's finished seeds, and a line naming each seed left out."""
    kept, notes = [], []
    for task in BUDGETS:
        for seed in sorted({r["seed"] for r in records if r["task"] == task}):
            mine = [r for r in records if r["task"] == task and r["seed"] == seed]
            done = {key(task, next(x for x in ROWS if x.name == r["row"]), r["split"], seed) for r in mine}
            grid = {key(*job) for job in jobs([task], [seed], list(SPLITS), ROWS)}
            if grid <= done:
                kept += mine
            else:
                notes.append(f"- {task} seed {seed}: {len(grid & done)} of {len(grid)} runs finished, left out of the "
                             "tables until its grid is whole.")  # fmt: skip
    return kept, [*notes, ""] if notes else []


def _gaps(records: list[dict[str, Any]], name: str, metric: str, summary: dict[str, Any]) -> list[str]:
    """Each exact rule minus LoRA FedAvg on the same split and seed (paired), on the non-IID splits."""
    lines = []
    for split in ("dir1.0", "dir0.1"):
        base = {r["seed"]: _final(r, metric) for r in records if r["row"] == "LoRA FedAvg" and r["split"] == split}
        for row in ROWS:
            if row.central or row.name == "LoRA FedAvg":
                continue
            diffs = [_final(r, metric) - base[r["seed"]] for r in records
                     if r["row"] == row.name and r["split"] == split and r["seed"] in base]  # fmt: skip
            if diffs:
                text = _mean_std(diffs)
                summary["fedavg_gap"].setdefault(name, {}).setdefault(split, {})[row.name] = text
                lines.append(f"- {split}: {row.name} − LoRA FedAvg = {text} points (paired by seed)")
    return lines


def _privacy(private: list[dict[str, Any]], plain: list[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    """The DP grid: each row with and without noise (paired by seed), and the noise measured in ΔW."""
    if not private:
        return []
    lines = [
        f"#### Central DP — {DP.task} {DP.split}, noise multiplier {DP.noise}, clip at each row's median "
        "update norm (mean ± std over seeds)",
        "",
        "| row | rule | clip | values sent | noise std per value | acc without DP | acc with DP | change "
        "(paired) | ‖noise in ΔW‖ / ‖clean step in ΔW‖ | ε (δ = 1e-5) |",
        "|---" * 10 + "|",
    ]
    for row in DP_ROWS:
        runs = [r for r in private if r["row"] == row.name]
        if not runs:
            continue
        base = {r["seed"]: _final(r) for r in plain if r["row"] == row.name and r["task"] == DP.task and
                r["split"] == DP.split}  # fmt: skip
        clip, noise = runs[0]["dp"]["clip"], runs[0]["dp"]["noise"]
        fed = runs[0]["history"][1:]
        sent = fed[0]["bytes_up"] // max(1, len(fed[0]["clients"])) // 4
        ratio = [h["dp_noise_dw"] / h["update_dw"] for r in runs for h in r["history"][1:]]
        cells = [_mean_std([base[r["seed"]] for r in runs if r["seed"] in base]), _mean_std([_final(r) for r in runs]),
                 _mean_std([_final(r) - base[r["seed"]] for r in runs if r["seed"] in base]),
                 f"{statistics.mean(ratio):.2f} ± {statistics.stdev(ratio) if len(ratio) > 1 else 0:.2f}",
                 f"{runs[0]['history'][-1]['epsilon']:.3g}"]  # fmt: skip
        lines.append(f"| {row.name} | {row.rule} | {clip:.3f} | {sent:,} | {noise * clip / len(fed[0]['clients']):.2e} "
                     "| " + " | ".join(cells) + " |")  # fmt: skip
        summary.setdefault("dp", {})[row.name] = dict(zip(("plain", "dp", "change", "noise_ratio", "epsilon"), cells,
                                                          strict=True))  # fmt: skip
    return [*lines, ""]


def _plot(records: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in BUDGETS if any(r["task"] == t for r in records)]
    if not tasks:
        return
    fig, axes = plt.subplots(len(tasks), len(SPLITS), figsize=(4.2 * len(SPLITS), 3.4 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        metric = BUDGETS[task].plotted or BUDGETS[task].metric
        for j, split in enumerate(SPLITS):
            ax = axes[i][j]
            for row in ROWS:
                runs = [r for r in records if r["task"] == task and r["row"] == row.name and
                        r["split"] == ("central" if row.central else split)]  # fmt: skip
                if not runs:
                    continue
                n = min(len(r["history"]) for r in runs)
                ys = [statistics.mean(100 * r["history"][k][metric] for r in runs) for k in range(n)]
                ax.plot(range(n), ys, marker="o", ms=3, label=row.name, ls="--" if row.central else "-")
            ax.set_title(f"{task}, {split}")
            ax.set_xlabel("round")
            ax.set_ylabel(metric.removeprefix("eval_"))
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "rounds.png", dpi=110)


def _claim(out: Path, name: str) -> bool:
    """Whether this process takes run `name`: a claim file holding its pid, unless a live process holds it (so
    several benchmark processes share one job list; a killed one's claims are taken over)."""
    import os

    claims = out / "claims"
    claims.mkdir(parents=True, exist_ok=True)
    path = claims / name
    if (out / "runs" / f"{name}.json").is_file():
        return True  # finished: run_one reads it
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(path.read_text() or 0), 0)
            return False  # a live process runs it
        except (ProcessLookupError, ValueError):
            path.unlink(missing_ok=True)
            return _claim(out, name)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "report"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "federated")
    parser.add_argument("--tasks", default="SST-2,MRPC")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--splits", default=",".join(SPLITS))
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    parser.add_argument("--shard", default="0/1", help="I/N: run every N-th job starting at I")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dp", action="store_true", help=f"the DP grid: {DP.task} {DP.split}, noise {DP.noise}")
    args = parser.parse_args(argv)
    if args.command == "report":
        report(args.out)
        return
    if not DATA.is_dir():
        sys.exit(f"no GLUE data at {DATA}: the benchmark reads ../shared/data/glue beside the project.")
    rows = ROWS if args.rows is None else [r for r in ROWS if r.name in args.rows.split(",")]
    index, count = (int(x) for x in args.shard.split("/"))
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.dp:
        todo = jobs([DP.task], seeds, [DP.split], [r for r in rows if r in DP_ROWS])
    else:
        todo = jobs(args.tasks.split(","), seeds, args.splits.split(","), rows)
    noise = DP.noise if args.dp else None
    for n, (task, row, split, seed) in enumerate(todo):
        if n % count != index or not _claim(args.out, key(task, row, split, seed, noise)):
            continue
        budget = QUICK if args.quick else BUDGETS[task]
        started = time.perf_counter()
        dp = (DP.noise, dp_clip(row, budget, args.out)) if args.dp else None
        record = run_one(task, row, split, seed, budget, args.out, args.quick, dp)
        print(f"[{n + 1}/{len(todo)}] {key(task, row, split, seed, noise)}: {_final(record):.1f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
