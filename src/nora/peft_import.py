"""A standard PEFT LoRA directory (adapter_config.json with peft_type LORA + adapter_model.safetensors) as a nora
LoRA adapter, so one model (and one server) holds a user's existing LoRA adapters beside NoRA ones.

PEFT's `lora_A` / `lora_B` become nora's (Conv2d kernels flattened to the layer's `out × (in·kh·kw)` matrix, as
nora's Conv2d adapters are); each layer's rank is its `lora_A`'s, its scale PEFT's `alpha/r` (or `alpha/√r` with
rsLoRA) from `lora_alpha`, `rank_pattern` and `alpha_pattern`. Where a layer's alpha differs from `lora_alpha`, the
ratio is folded into its `lora_B`, so ΔW is PEFT's exactly. What nora's LoRA cannot hold (DoRA, LoRA biases,
layer replication, trained `modules_to_save`, other PEFT methods) is refused, naming it. A PEFT file records no
weight fingerprint: a base whose layer shapes differ is refused, one that differs only in its weights cannot be
told apart, and one whose recorded name differs is warned about.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import AdapterError
from .methods.lora import LoraConfig

PEFT_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_UNSUPPORTED = {  # PEFT LoraConfig field: what nora's LoRA would need for it
    "use_dora": "DoRA's magnitude vectors",
    "lora_bias": "a trained bias on lora_B",
    "layer_replication": "replicated layers",
    "modules_to_save": "fully trained modules",
    "target_parameters": "LoRA on bare parameters",
}


def is_peft_lora_dir(directory: str | os.PathLike) -> bool:
    config = Path(directory) / "adapter_config.json"
    try:
        payload = json.loads(config.read_text()) if config.is_file() else None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return False  # nora's own reader says what is wrong with the file
    return isinstance(payload, dict) and "peft_type" in payload


def read_peft_lora(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's config and tensors, checked to be a LoRA nora's LoRA reproduces."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{directory} is a PEFT {config.get('peft_type')} adapter; nora imports PEFT LoRA only.")
    used = [f"{k} ({why})" for k, why in _UNSUPPORTED.items() if config.get(k) not in (None, False, "none", [])]
    if used:
        raise AdapterError(
            f"{directory} uses {', '.join(used)}, which a nora LoRA adapter does not hold; load it with "
            "peft.PeftModel, or export the adapter again without it."
        )
    r, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    patterns = (config.get("rank_pattern") or {}, config.get("alpha_pattern") or {})
    if not (
        isinstance(r, int) and r > 0 and isinstance(alpha, int | float) and all(isinstance(p, dict) for p in patterns)
    ):
        raise AdapterError(
            f"{directory}/adapter_config.json: r={r!r}, lora_alpha={alpha!r} or its rank/alpha patterns are not what "
            "PEFT writes (a positive rank, a number, two mappings); the file was edited or damaged: save it again."
        )
    if not (directory / PEFT_WEIGHTS).is_file():
        raise AdapterError(f"{directory} has no {PEFT_WEIGHTS} (an old .bin file is never unpickled here): "
                           "save it again with PEFT's save_pretrained (safetensors is its default).")  # fmt: skip
    return config, load_file(directory / PEFT_WEIGHTS)


def peft_lora_as_nora(model: nn.Module, directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor],
                                                                       list[str], dict[str, int]]:  # fmt: skip
    """The PEFT LoRA adapter in `directory` as what AdaptedModel.load_adapter adds to `model`: a nora LoRA config,
    its tensors by nora's names, the adapted layers and each one's rank."""
    from peft.utils.other import get_pattern_key

    config, tensors = read_peft_lora(directory)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, kind = key.removeprefix(_PREFIX).rpartition(".lora_")
        if kind not in ("A.weight", "B.weight") or not key.startswith(_PREFIX):
            raise AdapterError(f"{directory}/{PEFT_WEIGHTS}: tensor {key!r} is not a LoRA factor nora can import.")
        pairs.setdefault(name.removesuffix(".base_layer"), {})[kind[0]] = tensor
    lone = sorted(n for n, p in pairs.items() if len(p) != 2)
    if lone or not pairs:
        raise AdapterError(f"{directory}/{PEFT_WEIGHTS}: {lone or 'no layer'} lack a lora_A/lora_B pair.")
    alpha, rslora = float(config.get("lora_alpha", config["r"])), bool(config.get("use_rslora", False))
    ranks, imported = {}, {}
    for name, pair in pairs.items():
        A, B = pair["A"], pair["B"]
        r = A.shape[0]
        layer_alpha = float((config.get("alpha_pattern") or {}).get(
            get_pattern_key(list(config.get("alpha_pattern") or {}), name), alpha))  # fmt: skip
        ranks[name] = r
        imported[f"{name}.lora_A"] = A.reshape(r, -1)
        B = B.reshape(B.shape[0], r)
        imported[f"{name}.lora_B"] = B if layer_alpha == alpha else B * (layer_alpha / alpha)
    recorded = config.get("base_model_name_or_path")
    nora_config = LoraConfig(r=int(config["r"]), alpha=alpha, use_rslora=rslora, target_modules=sorted(pairs),
                             dropout=float(config.get("lora_dropout", 0.0)),
                             base_model_name_or_path=recorded)  # fmt: skip
    own = getattr(getattr(model, "config", None), "_name_or_path", None)
    if recorded and own and Path(str(recorded)).name != Path(str(own)).name:
        warnings.warn(
            f"{directory} was trained on {recorded}; this model is {own}. PEFT files record no weight fingerprint, "
            "so only the layer shapes are checked.",
            stacklevel=3,
        )
    missing = sorted(set(pairs) - set(dict(model.named_modules())))
    if missing:
        raise AdapterError(f"{directory} adapts {missing[:3]}, which this model does not have: not its base model.")
    return nora_config, imported, sorted(pairs), ranks
