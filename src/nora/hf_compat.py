"""What transformers and the trainers built on it (Trainer, TRL) read off a model, made right for a nora model.

- `forwarding_class`: an AdaptedModel's `forward` takes `*args, **kwargs`; Trainer keeps only the dataset columns
  a model's forward names and reads the label names off its class's forward, so the class is given the base
  model's forward signature (plus `adapter_names`).
- `drop_tied_copies` / `fill_tied_copies`: a parameter tied to another (input and output embeddings) appears once
  in the state dict, as `save_pretrained` writes it, so that safetensors can write it (Trainer writes a nora model's
  state dict with it); loading fills the other name.
- `note_trainer`: a Trainer that saves a nora model as a whole state dict is told so once, at its first step.
- `clear_gguf_quantization`: a model loaded from a GGUF file and dequantised to float is an ordinary float model.
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
import weakref
from typing import Any

import torch
from torch import nn


@functools.cache
def forwarding_class(cls: type, base: type) -> type:
    """`cls` whose `forward` has the signature of `base.forward` plus `adapter_names` (the same class name)."""
    if "_declared_class" in cls.__dict__:  # a forwarding class itself (type(model)(other_base)): start from its own
        return forwarding_class(cls.__dict__["_declared_class"], base)
    try:
        signature = inspect.signature(base.forward)
    except (TypeError, ValueError):  # a forward with no readable signature: keep *args, **kwargs
        return cls
    params = list(signature.parameters.values())
    if "adapter_names" not in signature.parameters:
        at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
        extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
        params = [*params[:at], extra, *params[at:]]

    def forward(self, *args, **kwargs):
        return cls.forward(self, *args, **kwargs)

    forward.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    forward.__doc__ = cls.forward.__doc__
    names = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
    return type(cls.__name__, (cls,), {"forward": forward, "_declared_class": cls, **names})


def blank_instance(cls: type, base: type) -> Any:
    """An empty instance of `forwarding_class(cls, base)`, for unpickling (its state is set after)."""
    return nn.Module.__new__(forwarding_class(cls, base))


def _tied_copies(module: nn.Module) -> dict[str, str]:
    """Each later name of a parameter held under several names → its first name."""
    first: dict[int, str] = {}
    copies = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            copies[name] = first[id(param)]
        else:
            first[id(param)] = name
    return copies


def drop_tied_copies(module: nn.Module, state: dict, prefix: str, _: Any) -> None:
    """state_dict post-hook: a tensor tied to another is stored once, under its first name."""
    for name in _tied_copies(module):
        state.pop(prefix + name, None)


def fill_tied_copies(module: nn.Module, state: dict, prefix: str, *_: Any) -> None:
    """load_state_dict pre-hook: the names `drop_tied_copies` left out take their first name's tensor."""
    for name, source in _tied_copies(module).items():
        if prefix + name not in state and prefix + source in state:
            state[prefix + name] = state[prefix + source]


def note_trainer(module: nn.Module, _: Any) -> None:
    """Forward pre-hook (it runs whatever replaced `forward`, as TRL's fused LM head does): in training mode under
    a transformers Trainer that saves whole state dicts (one without nora.hf_trainer.NoraTrainerMixin, found
    among the callers' frames), say so once per trainer, with the remedy."""
    if not module.training or "transformers.trainer" not in sys.modules or torch.compiler.is_compiling():
        return
    from transformers import Trainer

    frame = sys._getframe(1)
    for _ in range(16):
        if frame is None:
            return
        trainer = frame.f_locals.get("self")
        if isinstance(trainer, Trainer):
            if not getattr(trainer, "saves_nora_adapters", False) and trainer not in _TOLD:
                _TOLD.add(trainer)
                warnings.warn(_whole_state_dict_note(type(trainer)), stacklevel=1)
            return
        frame = frame.f_back


_TOLD: weakref.WeakSet = weakref.WeakSet()


def _whole_state_dict_note(cls: type) -> str:
    name = cls.__name__
    if cls.__module__.startswith("transformers") and name == "Trainer":
        remedy = "`from nora.hf_trainer import NoraTrainer` and NoraTrainer in place of Trainer"
    elif cls.__module__.startswith("trl") and name == "SFTTrainer":
        remedy = "`from nora.hf_trainer import NoraSFTTrainer` and NoraSFTTrainer in place of SFTTrainer"
    else:
        remedy = f"`from nora.hf_trainer import NoraTrainerMixin` and `class My{name}(NoraTrainerMixin, {name})`"
    return (
        f"{name} saves a nora model as its whole state dict: each checkpoint and save_model() write "
        "model.safetensors with the frozen base model's weights, not an adapter directory (resume_from_checkpoint "
        f"restores it exactly). For adapter-only checkpoints, which AdaptedModel.from_pretrained loads, use {remedy}."
    )


_MODEL_MARKS = ("hf_quantizer", "is_quantized", "quantization_method")
_CONFIG_MARKS = ("quantization_config", "_is_quantized")


def clear_gguf_quantization(model: nn.Module) -> bool:
    """Remove the quantization marks of a GGUF-loaded `model` whose weights are all float; whether it did.

    transformers dequantises most GGUF architectures to float on load, yet leaves `hf_quantizer`, `is_quantized`
    and `quantization_method` on the model and `quantization_config`, `_is_quantized` on its configs: Trainer and
    TRL then refuse to train it ("You cannot perform fine-tuning on purely quantized models"), `save_pretrained`
    to save it and `.float()` / `.half()` to cast it. The architectures whose blocks transformers keeps packed
    (uint8 weights) stay marked: they are quantized."""
    if getattr(model, "quantization_method", None) != "gguf":
        return False
    if not all(p.is_floating_point() for p in model.parameters()):
        return False
    for module in model.modules():
        for name in _MODEL_MARKS:
            module.__dict__.pop(name, None)
        config = getattr(module, "config", None)
        for name in _CONFIG_MARKS if config is not None else ():
            config.__dict__.pop(name, None)
    return True
