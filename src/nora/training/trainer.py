"""The training run: Accelerate for devices, mixed precision and DDP/FSDP; a deterministic data order so that a
resumed run (and a run on more processes with the same global batch) takes exactly the same steps.

Every step's loss is the sum over the whole global batch (all micro-batches, all processes) divided by its number
of targets, so gradients do not depend on how the batch is split across processes or accumulation steps. What the
loss is, and how data becomes batches, is the run's task kind's (nora.tasks).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import resource
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import zip_longest
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import nn

from ..accel import compile_model
from ..atomic import atomic_write_json
from ..config import AdapterConfig
from ..datafiles import content_fingerprint
from ..io import read_adapter, write_adapter
from ..methods import get_method
from ..model import AdaptedModel
from ..pretrained import check_threads
from ..state import adapter_payload, apply_tensors
from ..tasks.data import Encoded, split_eval
from .build import accelerate, build_adapted, load_base_model, loading
from .checkpoint import (
    check_resumable,
    checkpoints,
    load_optimizer,
    optimizer_state,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import TrainConfig
from .engine import Engine
from .progress import ProgressBar
from .rundir import RunDir, TrainingError, note

log = logging.getLogger(__name__)


@dataclass
class _LogWindow:
    """The steps since the last log line: the tokens seen and the time at its start, and their summed loss."""

    tokens: int
    start: float
    loss: float = 0.0
    steps: int = 0


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    summary: dict[str, Any]
    model: AdaptedModel


def read_data(config: TrainConfig, source: str, train: bool = True) -> list[dict[str, Any]]:
    return config.kind.read_rows(config, source, train)


def check_inputs(config: TrainConfig, model_given: bool) -> None:
    """Everything that can be checked before the run directory is claimed, data is read or a model loads."""
    if config.data is None:
        raise TrainingError("no training data given: pass --data (a .json/.jsonl/.csv/.tsv/.txt file or hub name).")
    if config.model is None and not model_given:
        raise TrainingError("no model given: pass --model (a hub id or a local directory), or run `nora demo`.")
    if not model_given:
        config.kind.check_model(config)
    if config.eval_tasks:
        from ..evaluation import resolve_tasks

        resolve_tasks(config.eval_tasks, config.eval_data_dir)
    check_threads(config.threads)
    resume = config.resume
    if isinstance(resume, str) and resume not in ("true", "latest", "auto") and not Path(resume).is_dir():
        raise TrainingError(f"--resume {resume}: no such checkpoint directory; pass 'latest' or a checkpoint path.")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _resume_point(config: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint --resume continues from: the one given, or the newest in `run_dir` (None: start afresh)."""
    resume = config.resume
    if not resume:
        return None
    if isinstance(resume, str) and resume not in ("true", "latest", "auto"):
        return Path(resume)
    found = checkpoints(run_dir)
    if not found:
        if _rank() == 0:
            print(f"no checkpoint in {run_dir}/checkpoints: starting from the beginning.")
        return None
    return found[-1]


def _resume_changes(
    config: TrainConfig, checkpoint: Path | None, data: dict[str, dict[str, Any]]
) -> dict[str, tuple[Any, Any]]:
    """The settings that differ from those of the run `checkpoint` belongs to (its train_config.json), and the data
    files whose contents differ from those the checkpoint trained on (`data`: their fingerprints now): refused,
    naming each, unless --resume-changes accepts them."""
    if checkpoint is None:
        return {}
    recorded_file = checkpoint.parent.parent / "train_config.json"
    changes = _setting_changes(config, recorded_file) if checkpoint.parent.name == "checkpoints" else {}
    if "data" not in changes:  # the same files: are they the same data?
        changes.update(_data_changes(checkpoint, data))
    if changes and not config.resume_changes:
        recorded = recorded_file if recorded_file.is_file() else checkpoint
        raise TrainingError(
            f"--resume continues the run recorded in {recorded}, but these settings differ from it: "
            f"{_listed(changes)}. A resumed run repeats its data order, model and adapter: resume with the recorded "
            f"settings (nora train --config {recorded_file} --resume latest), or pass --resume-changes to continue "
            "with these on purpose (log.jsonl records them)."
        )
    return changes


def _setting_changes(config: TrainConfig, recorded_file: Path) -> dict[str, tuple[Any, Any]]:
    if not recorded_file.is_file():
        return {}  # a checkpoint outside a run directory records no settings to compare
    try:
        recorded = json.loads(recorded_file.read_text())
        if not isinstance(recorded, dict):
            raise ValueError(f"it holds {type(recorded).__name__}, not the run's settings")
    except (OSError, ValueError, RecursionError) as e:
        if config.resume_changes:
            return {}
        raise TrainingError(
            f"--resume: cannot read {recorded_file} to compare this run's settings with the recorded ones ({e}); "
            "restore it, or pass --resume-changes to resume without the comparison."
        ) from e
    return config.changes_since(recorded)


def _data_changes(checkpoint: Path, now: dict[str, dict[str, Any]]) -> dict[str, tuple[Any, Any]]:
    """The data files whose contents differ from those recorded in `checkpoint` (its progress.data; a checkpoint
    of an older nora records none and is not compared). Unreadable state.json is left to read_checkpoint."""
    try:
        before = json.loads((checkpoint / "state.json").read_text())["progress"]["data"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        return {}
    if not isinstance(before, dict):
        return {}
    was, now_ = list(before.items()), list(now.items())  # in --data order: a path spelt otherwise is the same part

    def said(fingerprint: Any) -> str:
        if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("bytes"), int):
            return "absent"
        return f"{fingerprint['bytes']:,} bytes, sha256 {str(fingerprint.get('sha256'))[:12]}…"

    changes = {}
    for (old_name, old), (new_name, new) in zip_longest(was, now_, fillvalue=(None, None)):
        if old != new:
            changes[f"contents of data {new_name or old_name!r}"] = (said(old), said(new))
    return changes


def _listed(changes: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{key} {old!r} → {new!r}" for key, (old, new) in changes.items())


def _warn_truncated(encoded: Encoded | None, name: str, max_length: int) -> None:
    if encoded is not None and (encoded.truncated or encoded.dropped):
        warnings.warn(
            f"{encoded.truncated} {name} example(s) were longer than max_length={max_length} tokens and were "
            f"truncated ({encoded.dropped} dropped: their prompt alone filled it); raise --max-length to keep them "
            "whole.",
            stacklevel=5,
        )


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Run(Engine):
    """One training run in progress, built in stages (data → model → optimiser) before `run()` loops over the steps;
    `train()` builds it and calls `run()`. What depends on the kind of training is asked of its task kind."""

    def __init__(self, config: TrainConfig, model: nn.Module | None = None, tokenizer=None) -> None:
        self.config = config
        self.task = config.kind
        check_inputs(config, model is not None)
        self.output = RunDir(config.output_dir)
        try:
            if _rank() == 0:  # the lock, and what a killed run left, before anything is read or loaded
                self.output.claim(config.overwrite, bool(config.resume))
            self._build(model, tokenizer)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the output directory: a staged --overwrite run that did not finish is dropped."""
        self.output.close()

    def _build(self, model: nn.Module | None, tokenizer) -> None:
        config = self.config
        self.checkpoint = _resume_point(config, self.output.final)
        self.data_fingerprint = content_fingerprint(config.data)  # recorded in each checkpoint, compared on resume
        self.changes = _resume_changes(config, self.checkpoint, self.data_fingerprint)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        train_rows = read_data(config, config.data)
        eval_rows = read_data(config, config.eval_data, train=False) if config.eval_data else None
        self._start_processes()
        if tokenizer is None:  # before the model: a classifier's head size comes from the data's label set
            tokenizer = loading(config.model, lambda: self.task.load_processor(config))
        self.tokenizer = tokenizer
        self._build_data(train_rows, eval_rows)
        self.run_dir = self._prepare_run_dir()
        self._build_model(model)
        self._build_optimizer(self.config.max_steps or math.ceil(self.config.epochs * self.steps_per_epoch))
        self._wrap_model()
        self._reset_progress()

    def _prepare_run_dir(self) -> Path:
        """The directory this run writes: the output dir, or under --overwrite of a run a staging one beside it."""
        run_dir = self.output.prepare() if self.acc.is_main_process else None
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            run_dir = broadcast_object_list([run_dir])[0]
        return run_dir

    # ---- stage 1: data ------------------------------------------------------------------------------------------
    def _build_data(self, train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]] | None) -> None:
        config = self.config
        self.train_set = self.task.encode(config, self.tokenizer, train_rows, config.data, config.labels)
        self.labels = self.train_set.labels or None
        self.eval_set = None
        if eval_rows:
            self.eval_set = self.task.encode(config, self.tokenizer, eval_rows, config.eval_data, self.labels)
        if self.labels:
            self.acc.print(f"labels: {len(self.labels)} classes, ids 0..{len(self.labels) - 1} = {self.labels}")
        _warn_truncated(self.train_set, "training", config.max_length)
        _warn_truncated(self.eval_set, "evaluation", config.max_length)
        self.train_examples, held = split_eval(self.train_set.examples, config.eval_fraction, config.seed)
        self.eval_examples = self.eval_set.examples if self.eval_set else held
        if not self.train_examples:
            raise TrainingError(f"no usable training examples in {config.data} (all were empty or over max_length).")
        self.global_batch = config.batch_size * config.grad_accum * self.world
        self.steps_per_epoch = len(self.train_examples) // self.global_batch
        if self.steps_per_epoch == 0:
            raise TrainingError(
                f"{len(self.train_examples)} training examples do not fill one global batch of {self.global_batch} "
                "(batch size × gradient accumulation × processes); lower --batch-size or --grad-accum."
            )

    # ---- stage 2: model -----------------------------------------------------------------------------------------
    def _build_model(self, model: nn.Module | None) -> None:
        self.adapted = build_adapted(self.config, self.tokenizer, self.labels, model, self.acc.device,
                                     self._calibration_data(self.config.adapter_config()))  # fmt: skip
        if self.config.loftq and not self.config.resume:
            self._loftq_init()
        self.accelerations = accelerate(self.adapted, self.config)
        self.adapted.train()
        self._load_checkpoint_adapter()  # before any wrapping or sharding
        if self.config.fsdp:
            _shard(self.adapted, self.world)

    def _loftq_init(self) -> None:
        """The adapter fitted to the quantization error, W0 read from the base loaded once more unquantized."""
        from ..loftq import loftq_init

        config = replace(self.config, quantize=None, loftq=False)
        full = load_base_model(config, num_labels=self.task.head_width(self.labels))
        left = loftq_init(self.adapted, full)
        del full
        self.loftq_left = sum(left.values()) / len(left)

    def _calibration_data(self, config: AdapterConfig) -> list[dict[str, torch.Tensor]] | None:
        """An activation-aware basis's calibration batches: the first training examples in file order, the same on
        every process and on resume, so the outer basis (and its fingerprint) is too."""
        if get_method(config.method).calibration(config) is None:
            return None
        return self._batches(self.train_examples[: self.config.calibration_batches * self.config.batch_size])

    def _load_checkpoint_adapter(self) -> None:
        """The adapter weights of the checkpoint resumed from; `resume_state` restores the rest of it later."""
        self.resumed: dict[str, Any] | None = None
        if self.checkpoint is not None:
            self.resumed = read_checkpoint(self.checkpoint, self.acc.process_index)
            _, tensors, _ = read_adapter(self.resumed["adapter"])
            apply_tensors(self.adapted, self.adapted.active_adapter, tensors, self.resumed["adapter"])

    # ---- stage 3: optimiser -------------------------------------------------------------------------------------
    def _wrap_model(self) -> None:
        """DDP (or, under FSDP, the sharded model as it is), then torch.compile where asked and possible."""
        if self.config.fsdp:
            self.model = self.adapted  # sharded in place; the optimizer works on the local shards
        else:
            self.model, self.optimizer = self.acc.prepare(self.adapted, self.optimizer)
        if self.config.compile:
            if self.acc.device.type == "cuda":
                self.model, self.accelerations["compile"] = compile_model(self.model)
            else:
                self.accelerations["compile"] = "off (no CUDA device: compiling for CPU training rarely pays)"
        for feature, status in self.accelerations.items():
            if status.startswith("off"):
                warnings.warn(f"{feature}: {status}; training goes on without it.", stacklevel=4)

    # ---- stage 4: the loop's state ------------------------------------------------------------------------------
    def _reset_progress(self) -> None:
        self.step = 0
        self._order_cache: tuple[int, list[int]] | None = None
        self.tokens_seen = 0
        self.first_loss: float | None = None
        self.initial_eval: dict[str, float] = {}
        self.part_start = time.perf_counter()
        self.earlier: dict[str, Any] = {"wall_time_s": 0.0, "first_loss": None, "initial_eval": {}}

    def _kept(self) -> str:
        """What a run that stops now leaves: the previous run it was to replace, or its last checkpoint."""
        if self.run_dir != self.output.final:
            return (
                f"the previous run in {self.output.final} is unchanged (--overwrite replaces it only once the new run "
                "has its adapter)"
            )
        saved = checkpoints(self.run_dir)
        return f"the last good checkpoint is {saved[-1]} (resume it with --resume latest)" if saved else "no checkpoint"

    @contextmanager
    def _writing(self):
        """A failed write (a full disk, a folder gone read-only) stops the run, naming the folder and what is kept;
        a checkpoint or adapter is written whole or not at all, so the last good one is intact."""
        try:
            yield
        except OSError as e:
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            cause = f"the disk is full: {e.strerror}" if full else (e.strerror or str(e))
            where = f", writing {e.filename}" if e.filename else ""
            fix = "free some space there" if full else "make it writable"
            raise TrainingError(
                f"cannot write to {self.output.final} ({cause}{where}); training stopped at step {self.step}: "
                f"{self._kept()}. {fix.capitalize()}, or choose another --output-dir."
            ) from e

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def _raw_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer

    def _optimizer_state(self) -> dict[str, Any]:
        """Full optimizer state (under FSDP: gathered, keyed by parameter name; a collective)."""
        if not self.config.fsdp:
            return self._raw_optimizer().state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.model, self._raw_optimizer(), options=options)

    def _adapter_payload(self):
        adapted = self.acc.unwrap_model(self.model)
        tensors, payload = adapter_payload(adapted, adapted.active_adapter)  # every process: a collective under FSDP
        head = self.task.head_record(self.labels, self.config)
        if head is not None:
            payload["nora"]["head"] = head  # the label set (or regression) `nora eval` scores files with
        return tensors, payload

    def _progress(self) -> dict[str, Any]:
        """Where the run stands, as a checkpoint records it: position, and what the summary needs of the past."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "wall_time_s": self.earlier["wall_time_s"] + time.perf_counter() - self.part_start,
            "first_loss": self.earlier["first_loss"] if self.earlier["first_loss"] is not None else self.first_loss,
            "initial_eval": self.earlier["initial_eval"] or self.initial_eval,
            "data": self.data_fingerprint,
        }

    def save(self) -> Path | None:
        gathered = gather_object([(self.acc.process_index, rng_state())])
        payload = self._adapter_payload()
        optim_state = self._optimizer_state()
        path = None
        if self.acc.is_main_process:
            with self._writing():
                path = save_checkpoint(
                    self.run_dir, self.step, lambda d: write_adapter(*payload, d), optim_state, self.scheduler,
                    self._progress(), self.config.save_total_limit, dict(gathered),
                )  # fmt: skip
        self.acc.wait_for_everyone()
        return path

    def resume_state(self) -> None:
        """Optimizer, scheduler, RNG and position from the checkpoint whose adapter `_load_checkpoint_adapter`
        applied."""
        ckpt = self.resumed
        if ckpt is None:
            return
        check_resumable(self.checkpoint, ckpt, self._raw_optimizer(), self.scheduler, self.config.fsdp)
        if self.config.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            state = optimizer_state(ckpt["optimizer"], ckpt["state"]["optimizer"])
            set_optimizer_state_dict(
                self.model, self._raw_optimizer(), state, options=StateDictOptions(full_state_dict=True)
            )
        else:
            load_optimizer(self._raw_optimizer(), ckpt["optimizer"], ckpt["state"]["optimizer"])
        self.scheduler.load_state_dict(ckpt["state"]["scheduler"])
        set_rng_state(*ckpt["rng"])
        progress = ckpt["state"]["progress"]
        self.step = progress["step"]
        self.tokens_seen = progress["tokens_seen"]
        self.earlier = {  # the run before this resumption, so the summary covers the whole run
            "wall_time_s": float(progress.get("wall_time_s", 0.0)),
            "first_loss": progress.get("first_loss"),
            "initial_eval": dict(progress.get("initial_eval") or {}),
        }
        if self.acc.is_main_process:
            _truncate_log(self.run_dir / "log.jsonl", self.step)

    def _log(self, record: dict[str, Any]) -> None:
        if self.acc.is_main_process:
            with self._writing(), open(self.run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # ---- the loop -----------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        with self._writing():
            self.resume_state()
            if self.acc.is_main_process:
                atomic_write_json(self.config.resolved(), self.run_dir / "train_config.json")
        if self.changes:
            if self.acc.is_main_process:
                note(f"resuming with settings other than the run's (--resume-changes): {_listed(self.changes)}.")
            self._log({"step": self.step, "resume_changes": {k: {"was": old, "now": new}
                                                              for k, (old, new) in self.changes.items()}})  # fmt: skip
        trainable, total = self.acc.unwrap_model(self.model).get_nb_trainable_parameters()
        start = self.part_start = time.perf_counter()
        self.initial_eval = self.evaluate() if self.step == 0 else {}
        if self.initial_eval:
            self._log({"step": 0, **self.initial_eval})
        last_loss = self._loop()
        wall = self.earlier["wall_time_s"] + time.perf_counter() - start
        eval_metrics = self.evaluate()
        if eval_metrics:
            self._log({"step": self.step, **eval_metrics})
        progress = self._progress()
        initial = {f"initial_{k}": v for k, v in progress["initial_eval"].items()}
        return self._finish(trainable, total, wall, progress["first_loss"], last_loss, {**initial, **eval_metrics})

    def _loop(self) -> float | None:
        """Steps until total_steps, logging, evaluating and checkpointing on the way; the last step's loss."""
        last_loss = None
        window = _LogWindow(self.tokens_seen, self.part_start)
        shown = self.config.progress and self.acc.is_main_process
        with ProgressBar(self.total_steps, self.step, enabled=shown, counts=self.task.counts) as bar:
            while self.step < self.total_steps:
                last_loss = self.train_step()
                self.first_loss = last_loss if self.first_loss is None else self.first_loss
                window.loss += last_loss
                window.steps += 1
                if self.step % self.config.logging_steps == 0 or self.step == self.total_steps:
                    window = self._log_window(window, bar)
                else:
                    bar.update(self.step)
                if self._due(self.config.eval_steps):
                    self._log({"step": self.step, **self.evaluate()})
                if self._due(self.config.save_steps):
                    self.save()
        return last_loss

    def _log_window(self, window: _LogWindow, bar: ProgressBar) -> _LogWindow:
        """Log the mean loss and token rate of the steps since the last log line; the window that starts now."""
        now = time.perf_counter()
        rate = (self.tokens_seen - window.tokens) / max(now - window.start, 1e-9)
        loss, lr = window.loss / window.steps, self.scheduler.get_last_lr()[0]
        self._log({
            "step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
            "loss": loss, "lr": lr, "tokens_per_s": rate,
        })  # fmt: skip
        bar.update(self.step, loss=loss, lr=lr, rate=rate)
        return _LogWindow(self.tokens_seen, now)

    def _due(self, every: int | None) -> bool:
        """Whether a periodic evaluation or checkpoint falls on this step (the end has its own)."""
        return bool(every) and self.step % every == 0 and self.step < self.total_steps

    def _finish(self, trainable, total, wall, first_loss, last_loss, eval_metrics) -> TrainResult:
        adapted = self.acc.unwrap_model(self.model)
        adapter_dir = self.run_dir / "adapter"
        summary: dict[str, Any] = {}
        payload = self._adapter_payload()
        if self.acc.is_main_process:
            with self._writing():
                write_adapter(*payload, adapter_dir)
                self.tokenizer.save_pretrained(adapter_dir)
            files = list(adapter_dir.glob("*.safetensors"))
            summary = {
                "method": self.config.method,
                "task": self.config.task,
                "steps": self.step,
                "examples": len(self.train_examples),
                "eval_examples": len(self.eval_examples),
                "global_batch": self.global_batch,
                "processes": self.world,
                "trainable_params": trainable,
                "head_params": _head_params(adapted),
                "total_params": total,
                "trainable_percent": 100 * trainable / max(total, 1),
                "wall_time_s": wall,
                "tokens_seen": self.tokens_seen,
                "tokens_per_s": self.tokens_seen / max(wall, 1e-9),
                "peak_memory_bytes": _peak_memory_bytes(self.acc.device),
                "adapter_bytes": sum(f.stat().st_size for f in files),
                "first_loss": first_loss,
                "final_loss": last_loss,
                "truncated": self.train_set.truncated + (self.eval_set.truncated if self.eval_set else 0),
                "dropped": self.train_set.dropped + (self.eval_set.dropped if self.eval_set else 0),
                "labels": self.train_set.labels or None,
                "accelerations": self.accelerations,
                "loftq_error_left": getattr(self, "loftq_left", None),
                **eval_metrics,
            }
            if self.config.eval_tasks:
                summary["eval_tasks"] = self._eval_tasks(adapted)
            with self._writing():
                atomic_write_json(summary, self.run_dir / "summary.json")
                if self.config.plot:
                    from ..plots import plot_curves

                    plot_curves(self.run_dir)
                self.output.finish()  # under --overwrite: the new run takes the previous one's place now
        self.acc.wait_for_everyone()
        self.run_dir = self.output.final
        return TrainResult(self.run_dir, self.run_dir / "adapter", summary, adapted)

    def _eval_tasks(self, adapted: AdaptedModel) -> dict[str, Any]:
        from ..evaluation import evaluate_tasks

        adapted.eval()
        try:
            return evaluate_tasks(
                adapted, self.tokenizer, self.config.eval_tasks, data_dir=self.config.eval_data_dir,
                limit=self.config.eval_limit, batch_size=self.config.batch_size, progress=self.config.progress,
            )  # fmt: skip
        finally:
            adapted.train()


def _head_params(model: AdaptedModel) -> int:
    """Trainable parameters of the modules trained whole (modules_to_save: a classifier head)."""
    return sum(p.numel() for tc in model.trainable_copies().values() for p in tc.parameters() if p.requires_grad)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past `step` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_bytes().decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by the interruption
        at = record.get("step", 0) if isinstance(record, dict) else None
        if type(at) in (int, float) and at <= step:  # anything else is no log record of nora's: dropped
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _shard(model: AdaptedModel, world: int) -> None:
    """FSDP2: shard each transformer block (the classes transformers keeps whole), then the rest, over the
    processes; frozen base weights are sharded too, so each process holds 1/world of the model."""
    if world < 2:
        raise TrainingError("fsdp needs several processes: launch with torchrun or accelerate launch.")
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model.model, "_no_split_modules", None) or [])
    for module in list(model.model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)


def train(config: TrainConfig, model: nn.Module | None = None, tokenizer=None) -> TrainResult:
    """Train an adapter as `config` says; `model`/`tokenizer` may be given already loaded."""
    run = Run(config, model, tokenizer)
    try:
        return run.run()
    except KeyboardInterrupt:
        if run.run_dir != run.output.final:
            raise TrainingError(f"interrupted; {run._kept()}.") from None
        raise
    finally:
        run.close()
