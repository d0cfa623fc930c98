"""Training checkpoints: adapter, optimizer, scheduler, RNG and data position, in safetensors + JSON only.

A checkpoint is built in a temporary sibling directory and renamed into place, so a run killed at any moment
leaves either the previous checkpoints or the complete new one; the newest `keep` are kept.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_replace_dir
from ..errors import AdapterError

_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints under `directory`/checkpoints, oldest first."""
    root = Path(directory) / "checkpoints"
    found = [p for p in root.glob("checkpoint-*") if _NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A torch optimizer state dict (keys: parameter indices, or names under FSDP) as tensors + JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.rsplit(".", 1)
        state.setdefault(int(idx) if idx.isdigit() else idx, {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The state dict written by `optimizer_tensors`, keyed by parameter name (the FSDP form)."""
    state: dict[str, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        fqn, name = key.rsplit(".", 1)
        state.setdefault(fqn, {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    return tensors, {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, inner, gauss = meta["python"]
    random.setstate((version, tuple(inner), gauss))
    kind, keys, *rest = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


def save_checkpoint(
    run_dir: Path,
    step: int,
    write_adapter,
    optim_state: dict[str, Any],
    scheduler,
    progress: dict[str, Any],
    keep: int,
    rank_rng: dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]],
) -> Path:
    """Write checkpoint-`step` atomically (main process), then drop all but the newest `keep`."""
    target = Path(run_dir) / "checkpoints" / f"checkpoint-{step:08d}"

    def build(tmp: Path) -> None:
        write_adapter(tmp / "adapter")
        opt_tensors, opt_meta = optimizer_tensors(optim_state)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        for rank, (tensors, meta) in rank_rng.items():
            save_file(tensors, str(tmp / f"rng-{rank}.safetensors"))
            (tmp / f"rng-{rank}.json").write_text(json.dumps(meta))
        state = {"optimizer": opt_meta, "scheduler": scheduler.state_dict(), "progress": progress}
        (tmp / "state.json").write_text(json.dumps(state, default=_jsonable))  # written last: marks completion

    atomic_replace_dir(build, target)
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def read_checkpoint(path: Path, rank: int) -> dict[str, Any]:
    path = Path(path)
    if not (path / "state.json").is_file():
        raise AdapterError(f"{path} is not a complete nora checkpoint (no state.json); pick another one.")
    state = json.loads((path / "state.json").read_text())
    rng_file = path / f"rng-{rank}.safetensors"
    if not rng_file.is_file():
        raise AdapterError(
            f"{path} was written by a run with fewer processes (no RNG state for rank {rank}); resume it with the "
            "same number of processes."
        )
    return {
        "state": state,
        "optimizer": load_file(str(path / "optimizer.safetensors")),
        "rng": (load_file(str(rng_file)), json.loads((path / f"rng-{rank}.json").read_text())),
        "adapter": path / "adapter",
    }


def _jsonable(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return None  # e.g. a scheduler's lambda functions: rebuilt from the config, not restored
