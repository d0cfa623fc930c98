"""Quantization-aware initialisation (LoftQ's and QPiSSA's idea): an adapter on a quantized base starts with its
update fitted to the quantization error, so that deq(Q(W0)) + ΔW ≈ W0 from the first step instead of ΔW = 0.

    base = AutoModelForCausalLM.from_pretrained(name, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    adapted = nora.get_peft_model(base, nora.NoraConfig())
    nora.loftq_init(adapted, AutoModelForCausalLM.from_pretrained(name))   # the full-precision weights, once

Each quantized layer's error E = W0 − deq(Q(W0)) is fitted by the method's own least-squares form (`Method.fit`:
LoRA and PiSSA by a truncated SVD, NoRA, LoRA-XS and SVFit inside their frozen outer basis). This is one LoftQ
alternation: the base keeps the standard Q(W0) a 4-bit load gives, so the adapter saves, loads and serves on it
like any other; only its starting values differ.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .errors import AdapterError
from .layers import oriented_weight
from .model import AdaptedModel


@torch.no_grad()
def loftq_init(
    model: AdaptedModel, full_precision: nn.Module | Mapping[str, torch.Tensor], adapter_name: str | None = None
) -> dict[str, float]:
    """Fit adapter `adapter_name` (default: the active one) on every quantized layer of `model` to that layer's
    quantization error, W0 read from `full_precision` (the same model unquantized, or its state dict). Returns
    {layer: ‖E − ΔW‖ / ‖E‖}, the part of the quantization error the adapter leaves (1.0: none absorbed)."""
    name = adapter_name or model.active_adapters[0]
    left: dict[str, float] = {}
    for lname, layer in model.layers().items():
        if layer.quant is None or name not in layer.adapters:
            continue
        W0 = _full_weight(full_precision, lname).to(layer.base_weight().device, torch.float64)
        if tuple(W0.shape) != layer.shape:
            raise AdapterError(
                f"loftq_init: {lname} is {list(W0.shape)} in the full-precision model but {list(layer.shape)} here: "
                "pass the same model unquantized."
            )
        error = W0 - layer.base_weight().double()
        core = layer.adapters[name]
        for key, value in core.method.fit(core, layer.basis_of(core), error).items():
            core.params[key].copy_(value)
        left[lname] = float((error - layer.delta_weight(name).double()).norm() / error.norm().clamp(min=1e-30))
    if not left:
        raise AdapterError(f"loftq_init: adapter {name!r} is on no quantized layer; load the base quantized first.")
    return left


def _full_weight(source: nn.Module | Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if isinstance(source, nn.Module):
        try:
            return oriented_weight(source.get_submodule(name)).detach()
        except AttributeError:
            raise AdapterError(f"loftq_init: the full-precision model has no module {name!r}.") from None
    if f"{name}.weight" not in source:
        raise AdapterError(f"loftq_init: the full-precision state dict has no {name}.weight.")
    return source[f"{name}.weight"]
