"""An adapter file checked against a model before anything is built or computed: each of its layers exists here,
takes an adapter and has the file's shape, and its weights are those the adapter was trained on (fingerprints),
across quantization where that can be told exactly."""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import torch
from torch import nn

from . import quant
from .basis import basis_fingerprint
from .config import AdapterConfig
from .errors import AdapterError
from .layers import AdapterLayer, is_adaptable, oriented_weight
from .methods import get_method
from .svd import fingerprint, weight_digest


def check_layers(
    model: nn.Module, config: AdapterConfig, meta: dict[str, Any], tensors: dict[str, torch.Tensor], where
) -> tuple[list[str], dict[str, int], dict[str, str], dict[str, torch.Tensor]]:
    """Match the file's layers to the model's, refusing another base before any SVD is computed. Returns the
    layer names, each one's rank and basis fingerprint (checked here, so not computed again), and the weights a
    basis is to be built from where they are not the layer's own. An adapter trained on a quantized base loads onto
    its full-precision weights with its basis rebuilt exactly, and one trained at full precision onto a quantized
    base with its shapes checked, each saying what the crossing implies (nora.quant)."""
    method = get_method(config.method)
    names, ranks, keys = [], {}, {}
    sources: dict[str, torch.Tensor] = {}  # the W0 of a basis, where not the layer's own
    gaps: list[float] = []
    crossed: Counter[tuple[str, str]] = Counter()  # (trained on, loaded onto) → layers
    for lname, info in meta["layers"].items():
        r, shape = info.get("r"), info.get("shape")
        whole = [r, *shape] if isinstance(shape, list) and len(shape) == 2 else [None]
        if any(type(n) is not int for n in whole) or r < 1 or not isinstance(info.get("fingerprint"), str):
            raise AdapterError(
                f"adapter {where}: the metadata of layer {lname!r} ({repr(info)[:80]}) does not give its rank r, shape "
                "and fingerprint; its adapter_config.json was edited or damaged: save the adapter again."
            )
        module = layer_module(model, lname, shape, config.base_model_name_or_path, where)
        weight = oriented_weight(module)
        digest = module.weight_digest if isinstance(module, AdapterLayer) else weight_digest(weight)
        scales = tensors.get(f"{lname}.awsvd_scale")

        def expected_for(digest: str, r=r, weight=weight, scales=scales) -> str:
            if method.uses_basis:
                return basis_fingerprint(method.name, r, method.placement(config), config.svd_settings,
                                         tuple(weight.shape), digest, scales)  # fmt: skip
            return fingerprint(method=method.name, r=r, shape=list(weight.shape), digest=digest)

        expected = expected_for(digest)
        here, saved = (module.quant if isinstance(module, AdapterLayer) else quant.scheme_of(module)), info.get("quant")
        shapes_only = False  # the float weights an adapter trained on cannot be rebuilt from quantized ones
        if expected != info["fingerprint"] and here != saved:
            if here is None:  # trained on deq(Q(W0)); these are the W0 it came from if they quantize to it
                trained = quant.roundtrip(weight, saved).to(weight.dtype)
                if expected_for(weight_digest(trained)) == info["fingerprint"]:
                    expected, sources[lname] = info["fingerprint"], trained
                    gap = (weight.float() - trained.float()).norm() / weight.float().norm().clamp(min=1e-30)
                    gaps.append(float(gap))
                    crossed[(quant.describe(saved), "full-precision")] += 1
            else:
                shapes_only = True
                crossed[(quant.describe(saved), quant.describe(here))] += 1
        if not shapes_only and expected != info["fingerprint"] and info.get("weight") == digest:
            raise AdapterError(
                f"adapter {where}: the settings recorded for {lname!r} (r={r}, placement, SVD options) are not those "
                "it was saved with, though the base weights match: its adapter_config.json was edited or damaged "
                "after saving. Restore the file (or save the adapter again)."
            )
        if not shapes_only and expected != info["fingerprint"]:
            edited = "" if "weight" in info else " (or its adapter_config.json was edited after saving)"
            message = (
                f"adapter {where} was made for a different base model{edited}: the weights of {lname!r} differ "
                f"from those it was trained on (base recorded: {config.base_model_name_or_path}). Load it onto "
                "that base model."
            )
            if method.uses_basis:
                raise AdapterError(message + " Its outer SVD basis would not match, so it is refused.")
            warnings.warn(message + " Loading anyway: a plain LoRA update does not depend on W0.", stacklevel=3)
        names.append(lname)
        ranks[lname], keys[lname] = r, expected
    for (trained_on, here_is), count in crossed.items():
        warnings.warn(_crossing_message(where, trained_on, here_is, count, gaps, method.uses_basis), stacklevel=3)
    return names, ranks, keys, sources


def layer_module(model: nn.Module, lname: str, shape: list[int], base: str | None, where) -> nn.Module:
    """The module of `model` that an adapter's layer `lname` (a `shape` = [out, in] weight) goes on, refusing a model
    without it, a module that takes no adapter, or one of another size: another architecture or base. Works on a
    model built on the meta device (shapes only), so it can run before any weight is loaded."""
    try:
        module = model.get_submodule(lname)
    except AttributeError:
        module = None
    if module is None:
        raise AdapterError(
            f"adapter {where} targets module {lname!r}, which this model does not have: it was made for another "
            f"architecture (base: {base})."
        )
    if not (isinstance(module, AdapterLayer) or is_adaptable(module)) or lname.endswith("base_layer"):
        raise AdapterError(
            f"adapter {where} targets module {lname!r}, a {type(module).__name__} of this model that takes no "
            "adapter (only nn.Linear / Conv1D layers do): its adapter_config.json was edited, or it was made for "
            "another architecture."
        )
    weight = oriented_weight(module)
    if list(weight.shape) != list(shape):
        raise AdapterError(
            f"adapter {where}: module {lname!r} is {list(weight.shape)} here but {list(shape)} in the adapter; it was "
            f"made for another base model ({base})."
        )
    return module


def _crossing_message(where, trained_on: str, here_is: str, count: int, gaps: list[float], basis: bool) -> str:
    """What loading an adapter across quantization implies, said once per kind of crossing."""
    head = f"adapter {where} was trained on a {trained_on} base and is loaded onto a {here_is} one ({count} layers). "
    if here_is == "full-precision":
        rebuilt = (
            "Its outer basis is rebuilt from the dequantized weights it trained on (these weights quantize to them: "
            "checked), so its update is exactly the trained one. "
            if basis
            else "Its update does not depend on W0. "
        )
        return (
            head
            + rebuilt
            + (
                f"The base weights differ from those it trained with by {sum(gaps) / len(gaps):.2%} on average "
                f"(‖W0 − deq(Q(W0))‖ / ‖W0‖, at most {max(gaps):.2%}), so outputs differ from the quantized model's by "
                "what that rounding changes."
            )
        )
    return head + (
        "The weights it trained with cannot be rebuilt from quantized ones, so only their shapes are checked; "
        + ("its outer basis is recomputed from these dequantized weights, so its update differs from the trained "
           "one as much as the quantization moved the top singular vectors" if basis else
           "its update does not depend on W0 and is exactly the trained one")
        + ", and the base differs from the one it trained with by the quantization's rounding."
    )  # fmt: skip
