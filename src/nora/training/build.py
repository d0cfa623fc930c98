"""The model a training run and a federated party both train: the base model (given, or loaded as the task kind
builds it) with the config's adapter on this process's device, its trainable tensors in fp32, and the run's
accelerations applied."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, TypeVar

import torch
from torch import nn

from ..accel import enable_adapter_checkpointing, enable_fused_kernels
from ..config import AdapterConfig
from ..lean import lean_activations
from ..loss import set_loss_chunking
from ..model import AdaptedModel, get_peft_model
from ..pretrained import base_reference, load_model, load_tokenizer
from .config import TrainConfig
from .rundir import TrainingError

T = TypeVar("T")


def loading(name: str | None, load: Callable[[], T]) -> T:
    """`load()`, with transformers' "cannot find" / "not a valid model" errors said as nora's, naming the model."""
    try:
        return load()
    except (OSError, ValueError) as e:
        raise TrainingError(f"cannot load model {name!r}: {str(e)[:500]}") from e


def load_model_and_tokenizer(config: TrainConfig, num_labels: int | None = None) -> tuple[nn.Module, Any]:
    """The base model (hub id or local directory, optionally a GGUF file in it) and its tokenizer."""
    if config.model is None:
        raise TrainingError("no model given: pass --model (a hub id or a local directory), or run `nora demo`.")
    tokenizer = loading(config.model, lambda: load_tokenizer(config.model, config.gguf_file))
    return load_base_model(config, num_labels), tokenizer


def load_base_model(config: TrainConfig, num_labels: int | None = None) -> nn.Module:
    """The base model alone, in the run's precision where CUDA is there."""
    dtype = None
    if config.precision != "fp32" and torch.cuda.is_available():
        dtype = torch.bfloat16 if config.precision == "bf16" else torch.float16
    kind = config.kind
    return loading(
        config.model,
        lambda: load_model(config.model, kind.model_class, dtype=dtype, gguf_file=config.gguf_file,
                           quantize=config.quantize, **kind.pretrained_kwargs(num_labels)),
    )  # fmt: skip


def adapter_config(config: TrainConfig) -> AdapterConfig:
    """The run's adapter config, naming the base model it is made for."""
    adapter = config.adapter_config()
    if adapter.base_model_name_or_path is None and config.model is not None:
        adapter.base_model_name_or_path = base_reference(config.model, config.gguf_file)
    return adapter


def build_adapted(
    config: TrainConfig,
    tokenizer: Any,
    labels: list[str] | None,
    model: nn.Module | None,
    device: torch.device,
    calibration: list[dict[str, torch.Tensor]] | None = None,
    frozen: Collection[str] = (),
) -> AdaptedModel:
    """`model` (or the task kind's base model of `config`) fitted to `labels` and `tokenizer`, with `config`'s
    adapter "default" on `device`; trainable tensors in fp32 under mixed precision (as PEFT does), and the adapter
    tensors named in `frozen` (e.g. LoRA's A under federated FFA) never trained."""
    task = config.kind
    if model is None:
        model = loading(config.model, lambda: task.build_model(config, labels))
    if model is None:
        model = load_base_model(config, num_labels=task.head_width(labels))
    task.label_model(model, labels)
    task.fit_processor(tokenizer, model)
    if getattr(model, "hf_quantizer", None) is None:  # a bitsandbytes model sits where it was loaded
        model = model.to(device)
    adapted = get_peft_model(model, adapter_config(config), calibration_data=calibration)
    for name, p in adapted.named_parameters():
        if p.requires_grad and name.rsplit(".", 1)[-1] in frozen:
            p.requires_grad_(False)
        elif p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return adapted


def accelerate(adapted: AdaptedModel, config: TrainConfig) -> dict[str, str]:
    """The accelerations `config` asks for, applied before any wrapping: each "on" or the reason it is off."""
    report: dict[str, str] = {}
    if config.liger:
        report |= enable_fused_kernels(adapted)
    if config.gradient_checkpointing:
        enable_adapter_checkpointing(adapted)
        report["gradient_checkpointing"] = "on (base recomputed, adapter activations kept)"
    if config.lean_activations:
        changed = lean_activations(adapted)
        report["lean_activations"] = "on: " + "; ".join(changed) if changed else "stock (family not recognised)"
    # the causal-LM head in chunks (nora.loss), unless Liger's fused linear cross-entropy computes it
    set_loss_chunking(adapted, 0 if report.get("liger") == "on" else config.loss_chunk_tokens)
    return report
