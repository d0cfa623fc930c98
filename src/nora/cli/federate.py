"""`nora federate`: federated fine-tuning on this machine through Flower's simulation runtime — the training options
of `nora train` that apply to every client, and the federation's own (clients, split, rounds, rule, privacy)."""

from __future__ import annotations

import inspect
from typing import Any

import typer

from ..errors import AdapterError
from . import app
from .train import OPTIONS, CliOption, Opt, build_config

# `nora train` options a federated run counts otherwise (rounds × local steps, one output) or cannot use
_NOT_HERE = {"output_dir", "epochs", "max_steps", "eval_steps", "save_steps", "save_total_limit", "resume",
             "resume_changes", "overwrite", "plot", "progress", "eval_tasks", "eval_data_dir", "eval_limit", "fsdp",
             "quantize", "loftq", "logging_steps", "calibration_batches"}  # fmt: skip
TRAIN_OPTIONS = tuple(o for o in OPTIONS if o.name not in _NOT_HERE)
OWN: tuple[CliOption, ...] = (
    CliOption("clients", int, None, Opt(help="Number of clients --data is split between (default 10).")),
    CliOption(
        "split",
        str,
        None,
        Opt(help="iid (default), dirichlet or dirichlet-equal (label skew; -equal: same sizes) or files."),
    ),
    CliOption("dirichlet_alpha", float, None, Opt(help="Dirichlet concentration of --split dirichlet (0.1: skewed).")),
    CliOption("client_data", list[str], None, Opt(help="One data file per client (repeat; implies --split files).")),
    CliOption("rounds", int, None, Opt(help="Federated rounds (default 5).")),
    CliOption("clients_per_round", int, None, Opt(help="Clients sampled each round (default: all).")),
    CliOption("local_steps", int, None, Opt(help="Optimizer steps each client takes per round (default 10).")),
    CliOption(
        "rule",
        str,
        None,
        Opt(help="Aggregation rule: mean (LoRA-XS, SVFit), product / frozen-a (NoRA), fedavg / ffa / flora (LoRA)."),
    ),  # fmt: skip
    CliOption(
        "client_ranks", str, None, Opt(help="Each client's rank, comma-separated, ≤ --rank (LoRA-XS, SVFit): 4,4,8.")
    ),
    CliOption("dp_noise", float, None, Opt(help="Central DP: Gaussian noise multiplier (with --dp-clip).")),
    CliOption("dp_clip", float, None, Opt(help="Central DP: each client's update clipped to this L2 norm.")),
    CliOption("dp_delta", float, None, Opt(help="Central DP: the δ that ε is reported at (default 1e-5).")),
    CliOption("fed_output_dir", str, None, Opt("--output-dir", "-o", help="Run directory (default runs/federated).")),
    CliOption("resume", bool, None, Opt(help="Continue the run in --output-dir at the round after its last.")),
    CliOption("overwrite", bool, None, Opt(help="Replace the run in --output-dir once the new one has finished.")),
    CliOption("runtime", str, None, Opt(help="flower (default: Flower's simulation runtime) or inline (one process).")),
    CliOption("workers", int, None, Opt(min=1, help="Clients trained at once under flower (default: CPUs).")),
    CliOption(
        "flower_app", str, None, Opt(help="Write a Flower app directory here for `flwr run` instead of running.")
    ),
)
ALL = (*TRAIN_OPTIONS, *OWN)


def federated_config(options: dict[str, Any]):
    """The FederatedConfig of the command line's values (None: not given)."""
    from ..federated.config import FILES, FederatedConfig

    train_values = {o.name: options.get(o.name) for o in TRAIN_OPTIONS}
    if train_values.get("lr_scheduler") is None:
        train_values["lr_scheduler"] = "constant"  # each round's few local steps: no decay to zero inside one
    train = build_config(options.get("config"), train_values)
    own = {o.name: options.get(o.name) for o in OWN if options.get(o.name) is not None}
    if own.get("client_data") and "split" not in own:
        own["split"] = FILES
    if "client_ranks" in own:
        own["client_ranks"] = _ranks(own["client_ranks"])
    fields = {"output_dir": own.pop("fed_output_dir", None), "alpha": own.pop("dirichlet_alpha", None)}
    fields.update({k: v for k, v in own.items() if k not in ("runtime", "workers", "flower_app")})
    return FederatedConfig(train=train, **{k: v for k, v in fields.items() if v is not None})


def _ranks(text: str) -> list[int]:
    from ..federated.participant import FederatedError

    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise FederatedError(f"--client-ranks {text!r}: give whole numbers separated by commas, e.g. 4,4,8.") from None


def federate_command(**options: Any) -> None:
    """Federated fine-tuning: every client trains the adapter on its own data, the server aggregates it each round
    (exactly, where the method's frozen shared basis allows) and saves the global adapter after every round."""
    from ..federated.run import federate, write_flower_app

    try:
        fc = federated_config(options)
        if options.get("flower_app"):
            where = write_flower_app(fc, options["flower_app"])
            typer.echo(
                f"wrote the Flower app {where}: run it with `flwr run {where}` (Flower's local simulation), or "
                "deploy it on a SuperLink with one SuperNode per client (--node-config 'partition-id=I')."
            )
            return
        result = federate(fc, runtime=options.get("runtime") or "flower", workers=options.get("workers"))
    except (AdapterError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted; continue at the next round with --resume.") from None
    last = result.history[-1] if result.history else {}
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k.startswith("eval_") and isinstance(v, float))
    typer.echo(f"{len(result.history) - 1} round(s) done; global adapter: {result.adapter_dir}"
               f"{f' ({metrics})' if metrics else ''}; log: {result.run_dir / 'rounds.jsonl'}")  # fmt: skip


federate_command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=o.annotation) for o in ALL]
)
federate_command.__annotations__ = {o.name: o.annotation for o in ALL}
app.command("federate")(federate_command)
