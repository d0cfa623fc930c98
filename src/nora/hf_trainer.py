"""nora models in transformers' `Trainer` and TRL's `SFTTrainer`.

A nora model trains in the plain classes: its `forward` has the base model's signature (nora.hf_compat), so the
dataset columns, label names and loss handling are the base model's. But Trainer knows PEFT's classes by name and
saves any other model as its whole state dict: each checkpoint (and `save_model`) holds the frozen base weights
too, in `model.safetensors`, and `resume_from_checkpoint` loads them back (exactly). nora says so once, at the
first training step (nora.hf_compat.note_trainer). `NoraTrainerMixin` makes saving and loading nora's:

- `_save` (every checkpoint, `save_model`) writes a nora adapter directory: `adapter_config.json` and
  `adapter_model.safetensors` with the trainable tensors only, beside the tokenizer;
- `resume_from_checkpoint` and `load_best_model_at_end` put the checkpoint's adapter tensors back into the
  adapter being trained (the optimizer, scheduler and RNG states are the Trainer's own, so resume is exact);
- `train` holds the lock `nora train` holds on its output directory (nora.training.rundir), so a second writer
  into the same `output_dir` (another Trainer, another `nora train`) is refused at once rather than mixing
  checkpoints. Only the main process locks; the lock goes when `train` returns or its process dies;
- the model's recognised layers keep lean activations (nora.lean: exact, less memory), as `nora train` does by
  default; `lean_activations=False` leaves them stock. `trainer.lean_activations` lists what was changed.

    from nora.hf_trainer import NoraTrainer            # or NoraSFTTrainer, with TRL installed
    trainer = NoraTrainer(model=nora.get_peft_model(base, nora.NoraConfig()), args=TrainingArguments(...), ...)

`AdaptedModel.activation_checkpointing_enable` (what `activation_checkpointing=True` calls) checkpoints the base
model's blocks while keeping the adapters' narrow activations (nora.accel).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import Trainer

from . import lean
from .io import read_adapter
from .model import AdaptedModel
from .state import apply_tensors
from .training.rundir import DirLock


class NoraTrainerMixin:
    """Put before a `Trainer` subclass in the bases: `class MyTrainer(NoraTrainerMixin, Trainer)`."""

    saves_nora_adapters = True  # nora.hf_compat.note_trainer: no word about whole state dicts

    def __init__(self, *args: Any, lean_activations: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model = self._adapted()  # a nora model, or the error now rather than at the first checkpoint
        self.lean_activations: list[str] = lean.lean_activations(model) if lean_activations else []

    def _adapted(self) -> AdaptedModel:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)  # type: ignore[attr-defined]
        if not isinstance(model, AdaptedModel):
            raise TypeError(
                f"{type(self).__name__} trains a nora AdaptedModel (nora.get_peft_model(base, config)); it was "
                f"given a {type(model).__name__}."
            )
        return model

    def train(self, *args: Any, **kwargs: Any) -> Any:
        lock = None
        if self.args.should_save:  # type: ignore[attr-defined]
            lock = DirLock.beside(self.args.output_dir)  # type: ignore[attr-defined]
            Path(lock.path).parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        try:
            return super().train(*args, **kwargs)  # type: ignore[misc]
        finally:
            if lock is not None:
                lock.release()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir  # type: ignore[attr-defined]
        if not self.args.should_save:  # type: ignore[attr-defined]
            return
        os.makedirs(output_dir, exist_ok=True)
        self._adapted().save_pretrained(output_dir)
        processor = self.processing_class  # type: ignore[attr-defined]
        if processor is not None:
            processor.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        self._load_adapter_tensors(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_adapter_tensors(self.state.best_model_checkpoint)  # type: ignore[attr-defined]

    def _load_adapter_tensors(self, directory: str) -> None:
        """The adapter tensors saved in `directory` (a checkpoint of this run) into the adapter being trained."""
        adapted = self._adapted()
        _, tensors, _ = read_adapter(directory)
        apply_tensors(adapted, adapted.active_adapter, tensors, directory)


class NoraTrainer(NoraTrainerMixin, Trainer):
    """transformers' `Trainer` for nora models: adapter-only checkpoints, exact resume, best-adapter reload."""


def __getattr__(name: str) -> Any:
    if name == "NoraSFTTrainer":  # TRL is an extra: imported only when asked for
        from trl import SFTTrainer

        cls = type("NoraSFTTrainer", (NoraTrainerMixin, SFTTrainer), {"__doc__": "TRL's SFTTrainer for nora models."})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
