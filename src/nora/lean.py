"""Lean activations: the gated MLP and the RMSNorms of the decoder families users train keep only what their
backward needs, and recompute the cheap elementwise parts in backward, with the same ops in the same order, so
every gradient is the stock model's.

- Gated MLP (`down(act(gate(x)) * up(x))`, SwiGLU/GeGLU): the product keeps gate and up, not act(gate) besides;
  backward recomputes act(gate). Stock autograd keeps all three.
- RMSNorm (any variant: Llama's, Gemma's 1 + w, Qwen3's per-head q/k norms): keeps its input in the input's dtype;
  backward recomputes the normalisation (the per-row rstd included) from it. Stock autograd keeps float32 copies
  of a half-precision input.
- Attention through SDPA where the model was set to eager and SDPA computes the same function (no logit soft-cap):
  eager keeps the [heads × tokens × tokens] weights. Not bit-identical (eager takes its softmax in float32), equal
  to float32 tolerance.

A frozen base layer keeps no input (autograd saves a matmul's input only for its weight's gradient), and nora's
frozen outer factors project the input first (chain.chain_apply), so an adapted layer already keeps only the
rank-r projection; nothing here needs to change for that.
"""

from __future__ import annotations

import logging
import types
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# transformers model_type values whose MLP and norms are the ones handled here (SmolLM is "llama")
FAMILIES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3"}
)
_STOCK = "_nora_stock"  # + "_<attribute>": the attribute as it was before nora patched it


def _autocast_state(t: torch.Tensor) -> tuple[str, bool, torch.dtype]:
    device = t.device.type
    return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


def _replayed(state: tuple[str, bool, torch.dtype]) -> torch.autocast:
    """The forward's autocast state, for the recompute in backward (as torch.utils.checkpoint does)."""
    device, enabled, dtype = state
    return torch.autocast(device, dtype=dtype, enabled=enabled)


class _GatedProduct(torch.autograd.Function):
    """act(gate) * up, keeping gate and up only."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]):
        ctx.act, ctx.autocast = act, _autocast_state(gate)
        ctx.save_for_backward(gate, up)
        return act(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        need_gate, need_up = ctx.needs_input_grad[:2]
        with torch.enable_grad(), _replayed(ctx.autocast):
            g = gate.detach().requires_grad_(need_gate)
            activated = ctx.act(g)
        grad_up = grad * activated.detach() if need_up else None
        grad_gate = torch.autograd.grad(activated, g, grad * up)[0] if need_gate else None
        return grad_gate, grad_up, None


def gated_product(gate: torch.Tensor, up: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """act(gate) * up, as stock autograd computes it and its gradients, keeping two tensors instead of three."""
    if not torch.is_grad_enabled() or not (gate.requires_grad or up.requires_grad):
        return act(gate) * up
    return _GatedProduct.apply(gate, up, act)


class _Recomputed(torch.autograd.Function):
    """A module's forward of one input that keeps only that input (and the module's weight), and reruns the forward
    in backward to differentiate it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, fn: Callable[[torch.Tensor], torch.Tensor]):
        ctx.fn, ctx.weight, ctx.autocast = fn, weight, _autocast_state(x)  # the weight: a parameter, not kept
        ctx.save_for_backward(x)
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        with torch.enable_grad(), _replayed(ctx.autocast):
            xd = x.detach().requires_grad_(need_x)
            out = ctx.fn(xd)
        weight = ctx.weight if need_w else None
        inputs = [t for t in (xd if need_x else None, weight) if t is not None]
        grads = iter(torch.autograd.grad(out, inputs, grad)) if inputs else iter(())
        return (next(grads) if need_x else None), (next(grads) if need_w else None), None


def _lean_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    stock = self.__dict__[f"{_STOCK}_forward"]
    weight = getattr(self, "weight", None)
    if not torch.is_grad_enabled() or not (x.requires_grad or (weight is not None and weight.requires_grad)):
        return stock(x)
    return _Recomputed.apply(x, weight, stock)


def _lean_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(gated_product(self.gate_proj(x), self.up_proj(x), self.act_fn))


def _lean_fused_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:  # Phi-3: one gate_up projection
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(gated_product(gate, up, self.activation_fn))


def _lean_apply_gate(self: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:  # fused MoE experts
    gate, up = gate_up.chunk(2, dim=-1)
    return gated_product(gate, up, self.act_fn)


_NORM = "keeps its input only, recomputes the normalisation in backward"
_GATED = "gated product keeps gate and up, recomputes the activation in backward"


def _lean_patch_of(module: nn.Module) -> tuple[str, Callable[..., torch.Tensor], str] | None:
    """(attribute to replace, its lean version, what that changes) for a module nora knows, else None."""
    cls = type(module)
    if not cls.__module__.startswith("transformers."):  # e.g. Liger's fused modules stay as they are
        return None
    name = cls.__name__
    if name.endswith("RMSNorm"):
        return "forward", _lean_norm_forward, _NORM
    if name.endswith("MLP"):
        if all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return "forward", _lean_mlp_forward, _GATED
        if all(hasattr(module, a) for a in ("gate_up_proj", "down_proj", "activation_fn")):
            return "forward", _lean_fused_mlp_forward, _GATED
    # fused expert stacks under transformers' grouped/batched-matmul implementations ask _apply_gate for the
    # product; the default one is act(gate) * up of the halves (a family's own, e.g. gpt-oss's clamp, stays)
    if getattr(cls, "_apply_gate", None) is not None and cls._apply_gate.__name__ == "_default_apply_gate":
        return "_apply_gate", _lean_apply_gate, _GATED + " (grouped/batched-matmul experts)"
    return None


def wrapped_levels(model: nn.Module):
    """`model` and the models it wraps, outermost first: DDP keeps its model as .module, nora's AdaptedModel as
    .model, PEFT's PeftModel as .base_model (each one level down)."""
    for _ in range(6):
        yield model
        inner = model.__dict__.get("_modules", {})
        model = inner.get("module") or inner.get("model") or inner.get("base_model")
        if model is None:
            return


def _hf_model(model: nn.Module) -> nn.Module | None:
    """The transformers model inside nora's AdaptedModel, PEFT's PeftModel, DDP: the first level with a model_type."""
    return next((lv for lv in wrapped_levels(model) if hasattr(getattr(lv, "config", None), "model_type")), None)


def model_type(model: nn.Module) -> str | None:
    config = getattr(_hf_model(model), "config", None)
    return getattr(config, "model_type", None)


def _use_sdpa(model: nn.Module) -> str | None:
    """Switch eager attention to SDPA where SDPA computes the same thing; what was done, or None."""
    hf = _hf_model(model)
    config = getattr(hf, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "eager":
        return None
    if getattr(config, "attn_logit_softcapping", None) is not None:  # SDPA has no soft-cap: eager stays
        return None
    setter = getattr(hf, "set_attn_implementation", None)
    if setter is None:
        return None
    setter("sdpa")
    return "attention: eager → sdpa"


def lean_activations(model: nn.Module, enable: bool = True) -> list[str]:
    """Patch the recognised modules of `model` (a transformers model, bare or inside nora's or PEFT's wrapper) in
    place so they keep only what their backward needs; `enable=False` restores the stock forwards. Returns what
    changed, one line per module class ("LlamaMLP ×2: gated product keeps gate and up"). A family it does not
    recognise is left stock, with one warning line saying so."""
    if not enable:
        restored: Counter[str] = Counter()
        for module in model.modules():
            for key in [k for k in module.__dict__ if k.startswith(_STOCK)]:
                attr, stock = key[len(_STOCK) + 1 :], module.__dict__.pop(key)
                del module.__dict__[attr]
                if getattr(stock, "__func__", None) is not getattr(type(module), attr):  # patched before (Liger)
                    module.__dict__[attr] = stock
                restored[type(module).__name__] += 1
        return [f"{name} ×{n}: stock forward restored" for name, n in restored.items()]
    family = model_type(model)
    if family not in FAMILIES:
        log.warning(
            "lean activations: model family %r is not one nora knows (%s); its layers run stock.",
            family,
            ", ".join(sorted(FAMILIES)),
        )
        return []
    patched: Counter[tuple[str, str]] = Counter()
    for module in model.modules():
        patch = _lean_patch_of(module)
        if patch is None or f"{_STOCK}_{patch[0]}" in module.__dict__:
            continue
        attr, lean, what = patch
        module.__dict__[f"{_STOCK}_{attr}"] = getattr(module, attr)
        module.__dict__[attr] = types.MethodType(lean, module)
        patched[(type(module).__name__, what)] += 1
    changes = [f"{name} ×{n}: {what}" for (name, what), n in patched.items()]
    sdpa = _use_sdpa(model)
    return changes + ([sdpa] if sdpa else [])
