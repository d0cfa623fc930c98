"""A standard PEFT LoRA directory (adapter_config.json with peft_type LORA + adapter_model.safetensors) as a nora
LoRA adapter (or, with `use_dora`, a nora DoRA adapter), so one model (and one server) holds a user's existing
adapters beside NoRA ones, and every command reads them through one checked path.

PEFT's `lora_A` / `lora_B` become nora's (Conv2d kernels flattened to the layer's `out × (in·kh·kw)` matrix, as
nora's Conv2d adapters are), `lora_magnitude_vector` DoRA's `magnitude`, and the tensors of `modules_to_save` (a
trained head) nora's own; each layer's rank is its `lora_A`'s, checked against `r` / `rank_pattern`, its scale PEFT's
`alpha/r` (or `alpha/√r` with rsLoRA) from `lora_alpha`, `rank_pattern` and `alpha_pattern`. Where a layer's alpha
differs from `lora_alpha`, the ratio is folded into its `lora_B`, so ΔW (and DoRA's norm of W0 + ΔW) is PEFT's
exactly. The weights file is checked as nora's own are (io.checked_weights: complete, floating point, finite); what
nora cannot hold (LoRA biases, layer replication, bare-parameter LoRA, other PEFT methods) is refused, naming it. A
PEFT file records no weight fingerprint: a base whose layer shapes differ is refused, one that differs only in its
weights cannot be told apart, and one whose recorded name differs is warned about.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig
from .errors import AdapterError
from .io import SAVE_PREFIX, parse_weights, read_weights
from .methods.dora import DoraConfig
from .methods.lora import LoraConfig

PEFT_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_MAGNITUDE = "lora_magnitude_vector"
_UNSUPPORTED = {  # PEFT LoraConfig field: what nora's LoRA would need for it
    "lora_bias": "a trained bias on lora_B",
    "layer_replication": "replicated layers",
    "target_parameters": "LoRA on bare parameters",
}


def is_peft_lora_dir(directory: str | os.PathLike) -> bool:
    config = Path(directory) / "adapter_config.json"
    try:
        payload = json.loads(config.read_text()) if config.is_file() else None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return False  # nora's own reader says what is wrong with the file
    return isinstance(payload, dict) and "peft_type" in payload


def read_peft_config(directory: str | os.PathLike) -> dict[str, Any]:
    """PEFT's adapter_config.json, checked to describe a LoRA (or DoRA) nora reproduces; nothing else is read."""
    directory = Path(directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise AdapterError(
            f"{directory} is a PEFT {config.get('peft_type')} adapter; nora reads PEFT LoRA (and DoRA) adapters only. "
            "Evaluate it with peft and lm-evaluation-harness (lm_eval --model hf --model_args peft=DIR)."
        )
    used = [f"{k} ({why})" for k, why in _UNSUPPORTED.items() if config.get(k) not in (None, False, "none", [])]
    if used:
        raise AdapterError(
            f"{directory} uses {', '.join(used)}, which a nora adapter does not hold; load it with peft.PeftModel, "
            "or export the adapter again without it."
        )
    r, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    patterns = (config.get("rank_pattern") or {}, config.get("alpha_pattern") or {})
    if not (_positive_int(r) and _scale(alpha) and all(isinstance(p, dict) for p in patterns)) or not (
        all(_positive_int(v) for v in patterns[0].values()) and all(_scale(v) for v in patterns[1].values())
    ):
        raise AdapterError(
            f"{directory}/adapter_config.json: r={r!r}, lora_alpha={alpha!r} or its rank/alpha patterns are not what "
            "PEFT writes (a positive rank, a number, two mappings); the file was edited or damaged: save it again."
        )
    dropout, flags = config.get("lora_dropout", 0.0), [config.get(k) for k in ("use_dora", "use_rslora")]
    base = config.get("base_model_name_or_path")
    if not (
        type(dropout) in (int, float) and 0 <= dropout < 1 and all(f in (None, True, False) for f in flags)
        and (base is None or isinstance(base, str))
    ):  # fmt: skip
        raise AdapterError(
            f"{directory}/adapter_config.json: lora_dropout={dropout!r}, use_dora / use_rslora={flags} or "
            f"base_model_name_or_path={base!r} is not what PEFT writes (a rate in [0, 1), booleans, a name); the file "
            "was edited or damaged: save it again."
        )
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) for m in saved)):
        raise AdapterError(f"{directory}/adapter_config.json: modules_to_save={saved!r} is not a list of module names.")
    if not (directory / PEFT_WEIGHTS).is_file():
        raise AdapterError(f"{directory} has no {PEFT_WEIGHTS} (an old .bin file is never unpickled here): "
                           "save it again with PEFT's save_pretrained (safetensors is its default).")  # fmt: skip
    return config


def _positive_int(value: object) -> bool:
    return type(value) is int and value > 0


def _scale(value: object) -> bool:
    """A usable lora_alpha: a finite, non-zero number (alpha_pattern's ratios divide by lora_alpha)."""
    return type(value) in (int, float) and math.isfinite(value) and value != 0


@dataclass
class PeftLora:
    """A PEFT LoRA adapter in nora's terms, checked as far as it can be without the model."""

    config: AdapterConfig
    tensors: dict[str, torch.Tensor]  # by nora's names
    layers: list[str]
    ranks: dict[str, int]
    listed_heads: list[str]  # modules_to_save as PEFT's config lists them


def read_peft_lora(directory: str | os.PathLike) -> PeftLora:
    """The PEFT LoRA (or DoRA) adapter in `directory` as a nora config and tensors, its file checked as nora's own
    (io.checked_weights) and its tensors against its config: pairs complete and of the rank r / rank_pattern give,
    DoRA's magnitudes present exactly when use_dora is set, nothing else but modules_to_save."""
    from peft.utils.other import get_pattern_key

    config = read_peft_config(directory)
    where = Path(directory) / PEFT_WEIGHTS
    listed = config.get("modules_to_save") or []
    layers, heads = _split_tensors(parse_weights(read_weights(where), where), listed, where)
    dora = bool(config.get("use_dora"))
    expected = {"A", "B", _MAGNITUDE} if dora else {"A", "B"}
    for name, parts in sorted(layers.items()):
        missing, extra = sorted(expected - set(parts)), sorted(set(parts) - expected)
        if extra:
            raise AdapterError(f"{where}: layer {name!r} holds {extra[0]} but adapter_config.json has use_dora="
                               f"{dora}; the file and its config disagree: save the adapter again.")  # fmt: skip
        if missing:
            what = {"A": "lora_A.weight", "B": "lora_B.weight"}.get(missing[0], missing[0])
            flag = " (adapter_config.json sets use_dora, whose magnitudes it needs)" if missing[0] == _MAGNITUDE else ""
            raise AdapterError(f"{where}: layer {name!r} lacks {what}{flag}: no tensor {_PREFIX}{name}.{what}; the "
                               "file is incomplete.")  # fmt: skip
    if not layers:
        raise AdapterError(f"{where}: no lora_A/lora_B pair in the file; it adapts no layer.")
    alpha, rslora = float(config.get("lora_alpha", config["r"])), bool(config.get("use_rslora", False))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    ranks, imported = {}, {}
    for name, parts in layers.items():
        A, B = parts["A"], parts["B"]
        r = A.shape[0] if A.dim() in (2, 4) else -1
        if r < 1 or B.dim() != A.dim() or B.shape[1] != r or (B.dim() == 4 and tuple(B.shape[2:]) != (1, 1)):
            raise AdapterError(
                f"{where}: layer {name!r} has lora_A {list(A.shape)} and lora_B {list(B.shape)}, not a pair of rank r "
                "(A r × in, B out × r, or Conv2d kernels); the file was edited or damaged: save it again."
            )
        recorded = rank_pattern.get(get_pattern_key(list(rank_pattern), name), config["r"])
        if r != recorded:
            raise AdapterError(
                f"{where}: layer {name!r} has rank {r} in the file but r={recorded} in adapter_config.json (r / "
                "rank_pattern); the file and its config disagree: save the adapter again."
            )
        layer_alpha = float(alpha_pattern.get(get_pattern_key(list(alpha_pattern), name), alpha))
        ranks[name] = r
        imported[f"{name}.lora_A"] = A.reshape(r, -1)
        B = B.reshape(B.shape[0], r)
        imported[f"{name}.lora_B"] = B if layer_alpha == alpha else B * (layer_alpha / alpha)
        if dora:
            imported[f"{name}.magnitude"] = parts[_MAGNITUDE].reshape(-1)  # a Conv2d's is 1 × out × 1 × 1
    imported.update(heads)
    saved = sorted({k.removeprefix(SAVE_PREFIX).rpartition(".")[0] for k in heads})
    nora_config = (DoraConfig if dora else LoraConfig)(
        r=int(config["r"]), alpha=alpha, use_rslora=rslora, target_modules=sorted(layers),
        dropout=float(config.get("lora_dropout", 0.0)), modules_to_save=saved or None,
        base_model_name_or_path=config.get("base_model_name_or_path"),
    )  # fmt: skip
    return PeftLora(nora_config, imported, sorted(layers), ranks, listed)


def peft_lora_as_nora(model: nn.Module, directory: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor],
                                                                       list[str], dict[str, int]]:  # fmt: skip
    """The PEFT LoRA adapter in `directory` as what AdaptedModel.load_adapter adds to `model`: a nora LoRA (or DoRA)
    config, its tensors by nora's names, the adapted layers and each one's rank (their shapes are checked against
    the model's as the tensors are copied in)."""
    adapter = read_peft_lora(directory)
    recorded = adapter.config.base_model_name_or_path
    own = getattr(getattr(model, "config", None), "_name_or_path", None)
    if recorded and own and Path(str(recorded)).name != Path(str(own)).name:
        warnings.warn(
            f"{directory} was trained on {recorded}; this model is {own}. PEFT files record no weight "
            "fingerprint, so only the layer shapes are checked.",
            stacklevel=3,
        )
    modules = dict(model.named_modules())
    missing = sorted(set(adapter.layers) - set(modules))
    if missing:
        raise AdapterError(f"{directory} adapts {missing[:3]}, which this model does not have: not its base model.")
    saved = adapter.config.modules_to_save or []
    for m in adapter.listed_heads:
        if any(_is(n, m) for n in modules) and not any(_is(n, m) for n in saved):
            raise AdapterError(
                f"{Path(directory) / PEFT_WEIGHTS}: adapter_config.json lists {m!r} in modules_to_save, a module of "
                "this model, but the file holds none of its tensors; the file is incomplete: save the adapter again."
            )
    return adapter.config, adapter.tensors, adapter.layers, adapter.ranks


def _is(name: str, listed: str) -> bool:
    return name == listed or name.endswith(f".{listed}")


def _split_tensors(
    tensors: dict[str, torch.Tensor], saved: list[str], where: Path
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """PEFT's tensors as {layer: {"A", "B", magnitude}} and the modules_to_save tensors by nora's names."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    heads: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        path = key.removeprefix(_PREFIX)
        name, _, kind = path.rpartition(".lora_")
        if key.startswith(_PREFIX) and kind in ("A.weight", "B.weight", "magnitude_vector"):
            part = kind[0] if kind != "magnitude_vector" else _MAGNITUDE
            layers.setdefault(name.removesuffix(".base_layer"), {})[part] = tensor
            continue
        module, _, param = path.replace(".modules_to_save.", ".").rpartition(".")
        if key.startswith(_PREFIX) and any(_is(module, m) for m in saved):
            heads[f"{SAVE_PREFIX}{module}.{param}"] = tensor
            continue
        raise AdapterError(
            f"{where}: tensor {key!r} is neither a LoRA factor nor a tensor of modules_to_save "
            f"({saved or 'none listed'}); nora cannot import it."
        )
    return layers, heads
