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
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..atomic import atomic_replace_dir, atomic_save_safetensors
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
        atomic_save_safetensors(opt_tensors, tmp / "optimizer.safetensors")
        for rank, (tensors, meta) in rank_rng.items():
            atomic_save_safetensors(tensors, tmp / f"rng-{rank}.safetensors")
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
    state = _read_json(path / "state.json")
    rng_file = path / f"rng-{rank}.safetensors"
    if not rng_file.is_file():
        raise AdapterError(
            f"{path} was written by a run with fewer processes (no RNG state for rank {rank}); resume it with the "
            "same number of processes."
        )
    ckpt = {
        "state": state,
        "optimizer": _read_tensors(path / "optimizer.safetensors"),
        "rng": (_read_tensors(rng_file), _read_json(path / f"rng-{rank}.json")),
        "adapter": path / "adapter",
    }
    _check_read(path, ckpt)
    return ckpt


def _damaged(path: Path, what: str) -> AdapterError:
    return AdapterError(
        f"checkpoint {path} is damaged: {what}. Resume from another checkpoint (or start the run again)."
    )


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # (nested too deep)
        raise _damaged(file.parent, f"{file.name} cannot be read as JSON ({e})") from e


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:  # missing, truncated, or not safetensors
        raise _damaged(file.parent, f"{file.name} cannot be read ({e})") from e


def _number(value: Any) -> bool:
    return type(value) in (int, float) and -1e308 < value < 1e308  # finite, whatever the int


def _count(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**63


def _check_read(path: Path, ckpt: dict[str, Any]) -> None:
    """Refuse a state.json or RNG state that nora could not have written, before anything is restored."""
    state = ckpt["state"]
    if not isinstance(state, dict) or not all(isinstance(state.get(k), dict) for k in STATE_KEYS):
        raise _damaged(path, f"state.json does not hold the records {list(STATE_KEYS)}")
    optim, progress = state["optimizer"], state["progress"]
    if not isinstance(optim.get("param_groups"), list) or not isinstance(optim.get("scalars"), dict):
        raise _damaged(path, "state.json has no optimizer param_groups / scalars")
    for key in ("step", "tokens_seen"):
        if not _count(progress.get(key)):
            raise _damaged(path, f"state.json gives progress.{key}={progress.get(key)!r}, not a count")
    initial = progress.get("initial_eval") or {}
    if (
        not _number(progress.get("wall_time_s", 0.0))
        or not (progress.get("first_loss") is None or _number(progress["first_loss"]))
        or not isinstance(initial, dict)
        or not all(_number(v) for v in initial.values())
    ):
        raise _damaged(path, "state.json's progress record (wall_time_s, first_loss, initial_eval) is not numbers")
    tensors, meta = ckpt["rng"]
    try:  # restored into scratch generators: the process's own are set only once everything checked out
        torch.Generator().set_state(tensors["torch"])
        version, inner, gauss = meta["python"]
        random.Random().setstate((version, tuple(inner), gauss))
        kind, keys, *rest = meta["numpy"]
        np.random.RandomState().set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    except (KeyError, IndexError, TypeError, ValueError, OverflowError, RuntimeError) as e:
        raise _damaged(path, f"its RNG state cannot be restored ({type(e).__name__}: {e})") from e
    if any(t.dtype != torch.uint8 or t.dim() != 1 for k, t in tensors.items() if k.startswith("cuda.")):
        raise _damaged(path, "its CUDA RNG states are not byte tensors")


STATE_KEYS = ("optimizer", "scheduler", "progress")


def check_resumable(path: Path, ckpt: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler, fsdp: bool) -> None:
    """Refuse optimizer or scheduler state that this run's AdamW and schedule would not hold: other flags, groups
    or parameters, tensors of other shapes, a schedule of another form."""
    saved = ckpt["state"]["optimizer"]
    if not fsdp:  # (under FSDP the state is keyed by parameter name and checked by torch's resharding)
        if not _like(saved["param_groups"], optimizer.state_dict()["param_groups"], flags=True):
            raise _damaged(path, "its optimizer settings (state.json optimizer.param_groups) do not fit this run")
        params = [(p, g.get("amsgrad", False)) for g in optimizer.param_groups for p in g["params"]]
        found: dict[int, dict[str, tuple]] = {}
        for key, value in list(ckpt["optimizer"].items()) + list(saved["scalars"].items()):
            idx, _, name = key.rpartition(".")
            if not idx.isdigit() or int(idx) >= len(params) or not (torch.is_tensor(value) or _number(value)):
                raise _damaged(path, f"its optimizer state holds {key!r}, which no parameter of this run has")
            shape = tuple(value.shape) if torch.is_tensor(value) and value.is_floating_point() else None
            found.setdefault(int(idx), {})[name] = shape if torch.is_tensor(value) else ()
        for idx, names in found.items():
            p, amsgrad = params[idx]
            want = {"step": (), "exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}
            if amsgrad:
                want["max_exp_avg_sq"] = tuple(p.shape)
            if names != want:
                raise _damaged(path, f"its optimizer state of parameter {idx} is {names}, not AdamW's {want}")
    if not _like(ckpt["state"]["scheduler"], scheduler.state_dict(), flags=False):
        raise _damaged(path, "its learning-rate schedule (state.json scheduler) is not of this run's form")


def _like(value: Any, template: Any, flags: bool) -> bool:
    """Whether JSON `value` has the form of state-dict `template`: same keys and lengths, numbers for numbers, and
    (`flags`) the same booleans and Nones; parameter indices and schedule functions equal."""
    if isinstance(template, dict):
        return (
            isinstance(value, dict)
            and value.keys() == template.keys()
            and all(
                value[k] == template[k] if k in ("params", "lr_lambdas") else _like(value[k], template[k], flags)
                for k in template
            )
        )
    if isinstance(template, list | tuple):
        return (
            isinstance(value, list)
            and len(value) == len(template)
            and all(_like(v, t, flags) for v, t in zip(value, template, strict=True))
        )
    if isinstance(template, bool) or template is None:
        return value == template and type(value) is type(template) if flags else type(value) is type(template)
    if isinstance(template, int):
        return _count(abs(value)) if type(value) is int else False
    if isinstance(template, float):
        return _number(value)
    if isinstance(template, str):
        return isinstance(value, str)
    return False


def _jsonable(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return None  # e.g. a scheduler's lambda functions: rebuilt from the config, not restored
