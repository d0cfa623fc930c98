"""Optional accelerations: fused kernels (Liger), torch.compile, and an adapter-aware checkpointing policy.

Each is an opt-in that falls back cleanly: where Liger, triton or a GPU is missing, the model runs unchanged and
the report says why.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from .layers import AdapterLayer

log = logging.getLogger(__name__)

_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}


def enable_fused_kernels(model: nn.Module, liger: bool = True) -> dict[str, str]:
    """Patch the wrapped transformers model with Liger's fused RMSNorm, SwiGLU, RoPE and fused linear
    cross-entropy where available. Returns {feature: "on" | reason it is off}."""
    report: dict[str, str] = {}
    if not liger:
        return {"liger": "off (not requested)"}
    target = getattr(model, "model", model)
    if not torch.cuda.is_available():
        return {"liger": "off (no CUDA device: Liger's kernels are triton GPU kernels)"}
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as e:
        return {"liger": f"off (liger-kernel is not installed: {e}; pip install liger-kernel)"}
    try:
        _apply_liger_kernel_to_instance(model=target)
        report["liger"] = "on"
    except Exception as e:  # an unsupported architecture must not stop training
        log.warning("Liger kernels not applied: %s", e)
        report["liger"] = f"off ({type(e).__name__}: {e})"
    return report


def compile_model(model: nn.Module, **kwargs) -> tuple[nn.Module, str]:
    """torch.compile the model, or return it unchanged with the reason compile is unavailable."""
    try:
        import triton  # noqa: F401
    except ImportError:
        if torch.cuda.is_available():
            return model, "off (triton is not installed)"
    try:
        return torch.compile(model, **kwargs), "on"
    except Exception as e:
        return model, f"off ({type(e).__name__}: {e})"


def max_adapter_rank(model: nn.Module) -> int:
    ranks = [core.r for m in model.modules() if isinstance(m, AdapterLayer) for core in m.adapters.values()]
    return max(ranks, default=0)


def adapter_checkpoint_policy(max_width: int):
    """Selective-checkpoint policy: keep the outputs of matmuls at most `max_width` wide (the adapters' r- and
    r'-dimensional projections, small) and recompute everything else (the base model's activations)."""

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if op in _MATMULS:
            width = args[-1].shape[-1] if op is not torch.ops.aten.addmm.default else args[2].shape[-1]
            if width <= max_width:
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def enable_adapter_checkpointing(model: nn.Module) -> None:
    """Gradient checkpointing of the transformers model's blocks with the adapter-keeping policy."""
    policy = adapter_checkpoint_policy(max_adapter_rank(model))
    target = getattr(model, "model", model)
    kwargs = {"use_reentrant": False, "context_fn": functools.partial(create_selective_checkpoint_contexts, policy)}
    if hasattr(target, "activation_checkpointing_enable"):  # transformers ≥ 5.2x; the older name goes in v6
        target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(target, "enable_input_require_grads"):
        target.enable_input_require_grads()
