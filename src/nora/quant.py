"""Quantized base layers: bitsandbytes' `Linear4bit` (nf4, fp4: the QLoRA setting) and `Linear8bitLt` (int8), on
CUDA and, through bitsandbytes' CPU backend, on the CPU.

An adapter on such a layer sees its weight dequantized: the outer SVD basis, the weight digest and every ΔW come
from `dequantized(layer)`, while the forward runs the quantized kernel and adds the adapter's terms. A quantized
weight cannot hold W0 + ΔW exactly, so a reversible merge is refused; `fold` dequantizes, adds ΔW and requantizes
(returning the rounding it cost), or returns a plain float layer holding the exact merged weight. `roundtrip`
gives deq(Q(W)) of a float weight, for checking that full-precision weights are those an adapter's quantized base
came from. bitsandbytes runs only where a layer or scheme needs it: importing nora makes any later `import
bitsandbytes` lazy (peft imports it on import, and transformers' Trainer and schedulers import peft), so its code,
its start-up time and its CPU-kernel warning come with the first use of one of its names.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from typing import Any

import torch
from torch import nn

from .errors import AdapterError

SCHEMES = ("nf4", "fp4", "int8")
_BLOCKSIZE = 64  # bitsandbytes' and transformers' default 4-bit block


class _LazyBitsandbytes:
    """A meta-path finder that finds bitsandbytes as the other finders do and loads it lazily: `import bitsandbytes`
    binds the module at once and runs it at the first attribute read."""

    def find_spec(self, name: str, path: Sequence[str] | None = None, target: Any = None) -> ModuleSpec | None:
        if name != "bitsandbytes":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = importlib.util.LazyLoader(spec.loader)
                return spec
        return None


def _defer_bitsandbytes() -> None:
    if "bitsandbytes" not in sys.modules and not any(isinstance(f, _LazyBitsandbytes) for f in sys.meta_path):
        sys.meta_path.insert(0, _LazyBitsandbytes())


_defer_bitsandbytes()


def _bnb() -> Any:
    try:
        import bitsandbytes
    except ImportError as e:
        raise AdapterError(
            'quantized base layers need bitsandbytes: pip install -e ".[quant]" in nora\'s checkout (or pip install '
            '"bitsandbytes>=0.46").'
        ) from e
    return bitsandbytes


def scheme_of(module: nn.Module) -> dict[str, Any] | None:
    """The quantization of a bitsandbytes layer ({"scheme": "nf4" | "fp4" | "int8", ...}), None for any other."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")  # a bitsandbytes layer exists only once bitsandbytes has run
    if bnb_nn is None:
        return None
    if isinstance(module, bnb_nn.Linear4bit):
        w = module.weight
        state = getattr(w, "quant_state", None)
        return {"scheme": w.quant_type, "blocksize": int(getattr(state, "blocksize", None) or w.blocksize),
                "double_quant": bool(getattr(state, "nested", False))}  # fmt: skip
    if isinstance(module, bnb_nn.Linear8bitLt):
        return {"scheme": "int8"}
    return None


def is_quantized(module: nn.Module) -> bool:
    return scheme_of(module) is not None


def keep_standard_layout(module: nn.Module) -> None:
    """Stop bitsandbytes repacking a 4-bit weight for its CPU inference kernel (an eval-mode forward does it on
    CPUs with AVX512-BF16): the repacked form no longer dequantizes to the stored values, and an adapter's basis,
    digest and merges read them. A weight already repacked is unpacked, which rounds its block scales to bfloat16:
    said in a warning, as the weights then differ (by that rounding) from a fresh load."""
    bnb = _bnb()
    if not isinstance(module, bnb.nn.Linear4bit):
        return
    module.support_avx512bf16_for_cpu = False
    state = module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        module.weight.data, module.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(
            module.weight.data, state
        )
        warnings.warn(
            "a 4-bit layer had been repacked for bitsandbytes' CPU inference kernel (by an eval-mode forward before "
            "the adapter was added); unpacking it rounds its block scales to bfloat16, so its weights differ "
            "slightly from a fresh load's and an adapter saved from it may not load onto a fresh one without a "
            "weight mismatch. Add adapters before running the model in eval mode.",
            stacklevel=4,
        )


def out_in(module: nn.Module) -> tuple[int, int]:
    return int(module.out_features), int(module.in_features)


@torch.no_grad()
def dequantized(module: nn.Module) -> torch.Tensor:
    """The d × k weight a quantized layer computes with, in float32 (or the dtype it was quantized from)."""
    bnb = _bnb()
    w = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).reshape(out_in(module))
    if w.dtype != torch.int8:  # an 8-bit layer that keeps float weights (has_fp16_weights) or is not yet quantized
        return w.data
    scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
    return w.data.float() * (scb.float()[:, None] / 127.0)


@torch.no_grad()
def requantize(module: nn.Module, W: torch.Tensor) -> None:
    """Store the float weight W (d × k) in the quantized layer, quantized as its current weight was."""
    bnb = _bnb()
    old = module.weight
    device = old.device
    if isinstance(module, bnb.nn.Linear4bit):
        dtype = old.quant_state.dtype
        module.weight = bnb.nn.Params4bit(
            W.to(dtype).contiguous().cpu(), requires_grad=False, quant_type=old.quant_type,
            blocksize=old.quant_state.blocksize, compress_statistics=bool(old.quant_state.nested),
            quant_storage=old.quant_storage, module=module,
        ).to(device)  # fmt: skip
        return
    module.weight = bnb.nn.Int8Params(W.to(torch.float16).contiguous().cpu(), requires_grad=False,
                                      has_fp16_weights=False).to(device)  # fmt: skip
    module.state.CB, module.state.SCB = None, None  # the layer reads the new statistics at its next forward


def float_linear(module: nn.Module, W: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    """A plain nn.Linear of `dtype` holding W (d × k) and the quantized layer's bias."""
    d, k = out_in(module)
    linear = nn.Linear(k, d, bias=module.bias is not None, device=W.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(W)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    linear.requires_grad_(False)
    return linear.train(module.training)


@torch.no_grad()
def roundtrip(W: torch.Tensor, quant: dict[str, Any]) -> torch.Tensor:
    """deq(Q(W)): what a layer quantized with `quant` (a `scheme_of` record) would compute with."""
    bnb = _bnb()
    if quant["scheme"] == "int8":  # as Int8Params quantizes: from float16, row-wise absmax
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(W.to(torch.float16).contiguous())
        return cb.float() * (scb.float()[:, None] / 127.0)
    q, state = bnb.functional.quantize_4bit(
        W.contiguous(), blocksize=quant.get("blocksize", _BLOCKSIZE), quant_type=quant["scheme"],
        compress_statistics=quant.get("double_quant", False),
    )  # fmt: skip
    return bnb.functional.dequantize_4bit(q, state).reshape(W.shape)


def describe(quant: dict[str, Any] | None) -> str:
    return "full-precision" if quant is None else f"{quant['scheme']}-quantized"
