"""`federate`: a whole federated run on this machine, from settings to the saved global adapter of every round."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..pretrained import require_package
from ..training.rundir import RunDir
from .config import FederatedConfig
from .coordinator import train_client
from .participant import FederatedError

RUNTIMES = ("flower", "inline")


@dataclass
class FederatedResult:
    """The run directory, the global adapter's directory (the last round's) and one log line per round (round 0:
    the evaluation before training)."""

    run_dir: Path
    adapter_dir: Path
    history: list[dict[str, Any]]


def federate(fc: FederatedConfig, runtime: str = "flower", workers: int | None = None) -> FederatedResult:
    """Run `fc` to its last round. runtime "flower": Flower's simulation runtime (a ClientApp per client, `workers`
    of them at once, default min(clients per round, CPUs)); "inline": the same client and server code called in
    this process one client after another on one model (no transport: for benchmarks and tests)."""
    if runtime not in RUNTIMES:
        raise FederatedError(f"unknown runtime {runtime!r}: use one of {RUNTIMES}.")
    fc.check()
    require_package("flwr", "federated", "federated training (Flower)")
    if fc.dp_noise is not None:
        require_package("dp_accounting", "federated", "the privacy accounting of --dp-noise")
    output = RunDir(fc.output_dir)
    try:
        output.claim(fc.overwrite, fc.resume)
        work = output.prepare()
        history = _simulate(fc, work, workers) if runtime == "flower" else _inline(fc, work)
        output.finish()
    finally:
        output.close()
    return FederatedResult(output.final, output.final / "adapter", history)


def _inline(fc: FederatedConfig, work: Path) -> list[dict[str, Any]]:
    from .flower import build_coordinator

    coordinator = build_coordinator(fc, work)
    coordinator.evaluate_initial()
    for rnd in range(coordinator.start_round, fc.rounds + 1):
        replies = [train_client(coordinator.party_for(c), coordinator.data, c, coordinator.instructions(rnd, c),
                                coordinator.sent_to(c)) for c in coordinator.sample(rnd)]  # fmt: skip
        coordinator.absorb(rnd, replies)
    return coordinator.history


def _simulate(fc: FederatedConfig, work: Path, workers: int | None) -> list[dict[str, Any]]:
    from flwr.simulation import run_simulation

    from .flower import make_client_app, make_server_app

    out: dict[str, Any] = {}
    cpus = max(1, (os.cpu_count() or 1) // max(1, workers or min(fc.per_round, os.cpu_count() or 1)))
    backend = {"client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
               "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}}  # fmt: skip
    run_simulation(make_server_app(fc, work, out), make_client_app(fc), num_supernodes=fc.clients,
                   backend_config=backend)  # fmt: skip
    if "error" in out:
        raise out["error"]
    if "history" not in out:
        raise FederatedError("the Flower simulation ended before the server finished; its log above says why.")
    return out["history"]


FLOWER_APP = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "nora-federated-app"
version = "0.1.0"
description = "nora federated fine-tuning as a Flower app (written by nora federate --flower-app)"
license = "Apache-2.0"
dependencies = []  # nora with its federated extra, installed where the app runs

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "nora"

[tool.flwr.app.components]
serverapp = "nora.federated.flower:server_app"
clientapp = "nora.federated.flower:client_app"

[tool.flwr.app.config]
nora-config = "{config}"

[tool.flwr.federations]
default = "local-simulation"

[tool.flwr.federations.local-simulation]
options.num-supernodes = {clients}
"""


def write_flower_app(fc: FederatedConfig, directory: str | os.PathLike) -> Path:
    """A Flower app directory running `fc` with Flower's own commands (`flwr run DIR`, or a SuperLink and one
    SuperNode per client started with --node-config "partition-id=I"): pyproject.toml and federation.json."""
    import json

    from ..atomic import atomic_write_bytes, atomic_write_json

    fc.check()
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "federation.json"
    atomic_write_json(fc.to_dict(), config)
    text = FLOWER_APP.format(config=json.dumps(str(config))[1:-1], clients=fc.clients)
    atomic_write_bytes(text.encode(), directory / "pyproject.toml")
    return directory
