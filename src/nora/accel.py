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
from torch.utils.flop_counter import FlopCounterMode

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
    r'-dimensional projections, small) and recompute everything else (the base model's activations). A kept output
    is not recomputed in backward (torch's selective checkpointing returns it from the first forward), so the
    recompute costs the base layers plus each adapter's widening matmul (r → d), never its input projection."""

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if op in _MATMULS:
            a, b = args[-2:]
            # narrow either way: x·Vᵀ is tokens × r, a core applied to the transposed projection r' × tokens
            if min(a.shape[0], b.shape[-1]) <= max_width:
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def enable_adapter_checkpointing(model: nn.Module, keep_adapter_projections: bool = True) -> None:
    """Gradient checkpointing of the transformers model's blocks with the adapter-keeping policy
    (`keep_adapter_projections=False`: plain checkpointing, everything recomputed, for comparison)."""
    policy = adapter_checkpoint_policy(max_adapter_rank(model) if keep_adapter_projections else 0)
    target = getattr(model, "model", model)
    kwargs = {"use_reentrant": False, "context_fn": functools.partial(create_selective_checkpoint_contexts, policy)}
    if hasattr(target, "activation_checkpointing_enable"):  # transformers ≥ 5.2x; the older name goes in v6
        target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(target, "enable_input_require_grads"):
        target.enable_input_require_grads()


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: every FLOP is charged to "Global" alone. The tracker's
    backward hooks refuse an autograd.grad() run inside a custom Function's backward (lean activations do that)."""

    parents = ("Global",)

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *_: object) -> None:
        return None


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode (its registry, its decompositions), counting totals only, so that it also counts
    models whose backward runs autograd.grad (nora.lean)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    return counter


def _step_flops(model: nn.Module, inputs: dict[str, torch.Tensor], backward: bool = True) -> int:
    grads = {p: p.grad for p in model.parameters()}
    with flop_counter() as counter:
        loss = model(**inputs).loss
        if backward:
            loss.backward()
    for p, grad in grads.items():  # the count leaves the model's gradients as they were
        p.grad = grad
    return int(counter.get_total_flops())


def recompute_flops(
    model: nn.Module, inputs: dict[str, torch.Tensor], keep_adapter_projections: bool = True
) -> dict[str, int]:
    """What nora's adapter-aware checkpointing costs in FLOPs (torch's FlopCounterMode) for one training step of
    `model` (a transformers model with a loss, adapted or not, in train mode) on `inputs` (its keyword inputs,
    labels included): {"forward": a forward's FLOPs, "step": forward + backward without checkpointing,
    "step_checkpointed": the same with it, "recompute": their difference}. `keep_adapter_projections=False`
    measures plain checkpointing (everything recomputed) instead. Both steps run with the inputs requiring grad, as
    checkpointing makes them. The model's gradients are left as they were, and its checkpointing off, or on under
    nora's policy."""
    target = getattr(model, "model", model)
    newer = hasattr(type(target), "is_activation_checkpointing")  # transformers ≥ 5.2x; the older name goes in v6
    was_on = target.is_activation_checkpointing if newer else target.is_gradient_checkpointing
    disable = getattr(target, "activation_checkpointing_disable", None) or target.gradient_checkpointing_disable
    had_input_grads = hasattr(target, "_require_grads_hook")
    try:  # checkpointed first: it makes the inputs require grad, which the step without it must do too to compare
        enable_adapter_checkpointing(model, keep_adapter_projections)
        checkpointed = _step_flops(model, inputs)
        disable()
        forward = _step_flops(model, inputs, backward=False)
        step = _step_flops(model, inputs)
    finally:
        if was_on:
            enable_adapter_checkpointing(model)
        elif not had_input_grads and hasattr(target, "disable_input_require_grads"):
            target.disable_input_require_grads()
    return {"forward": forward, "step": step, "step_checkpointed": checkpointed, "recompute": checkpointed - step}
