"""Export any nora adapter as a standard PEFT LoRA adapter (what PEFT and vLLM load unchanged).

Each layer's ΔW is a sum of chains (chain.py), split at its narrowest inner dimension into an exact pair
B·A = ΔW with the scale folded into B, so lora_alpha = r (scaling 1) and no approximation is made. Layers whose
rank differs from the most common one go into PEFT's rank_pattern/alpha_pattern. A method's own PEFT options
and tensors (DoRA: use_dora=True and its magnitude vector) come from the method; how a layer's pair is laid out
(a Conv2d's kernel, a fused expert stack's PEFT `target_parameters` layout) from its layer kind (nora.layers).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .atomic import atomic_replace_dir, atomic_save_safetensors
from .chain import detached, terms_lora_pair
from .errors import AdapterError
from .layers import AdapterLayer, PeftEntry, PeftPart, is_adaptable
from .methods import get_method

if TYPE_CHECKING:
    from .model import AdaptedModel

_PREFIX = "base_model.model."


def _task_type(model) -> str | None:
    cls = type(model).__name__
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
    ):
        if cls.endswith(suffix):
            return task
    return None


def _target_names(names: list[str], all_names: list[str]) -> list[str]:
    """Short suffixes (q_proj, …) when they select exactly these modules, else the full paths."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = [n for n in all_names if n.rsplit(".", 1)[-1] in suffixes]
    return suffixes if sorted(selected) == sorted(names) else sorted(names)


def _exportable(model: AdaptedModel, adapter_name: str, target: str) -> None:
    if adapter_name not in model.peft_config:
        raise AdapterError(f"no adapter named {adapter_name!r}; loaded: {sorted(model.peft_config)}.")
    model.materialize(adapter_name)
    config = model.peft_config[adapter_name]
    if not get_method(config.method).adapts_layers:
        raise AdapterError(
            f"adapter {adapter_name!r} ({config.method}) adapts no layer, and {target} needs at least one (PEFT "
            "refuses a LoRA config that targets nothing). Save the model with the head instead: "
            "model.merge_and_unload().save_pretrained(DIR)."
        )
    refused: dict[str, list[str]] = {}
    for n, lay in model.layers().items():
        reason = lay.kind.peft_refusal(lay.base_layer) if adapter_name in lay.adapters else None
        if reason is not None:
            refused.setdefault(reason, []).append(n)
    for reason, names in refused.items():
        raise AdapterError(
            f"adapter {adapter_name!r} adapts {reason} ({names[:3]}). Merge the adapter instead (merge_and_unload), "
            "or leave those layers out of target_modules."
        )


def _lora_part(model: AdaptedModel, adapter_name: str, prefix: str) -> PeftPart:
    """Each adapted layer's exact pair (and the method's own PEFT tensors) as its kind lays them out under `prefix`,
    each layer's (or expert parameter's) rank, and the targets."""
    method = get_method(model.peft_config[adapter_name].method)
    by_kind: dict[int, tuple] = {}
    for lname, layer in model.layers().items():
        if adapter_name not in layer.adapters:
            continue
        core = layer.adapters[adapter_name]
        B, A = terms_lora_pair(detached(layer.terms(core), torch.float64))
        dtype = layer.base_weight().dtype if layer.base_weight().dtype != torch.float64 else torch.float32
        entry = PeftEntry(lname, layer.base_layer, B, A, method.peft_tensors(core), dtype)
        by_kind.setdefault(id(layer.kind), (layer.kind, []))[1].append(entry)
    whole = PeftPart()
    for kind, entries in by_kind.values():
        part = kind.peft_part(entries, prefix)
        whole.tensors.update(part.tensors)
        whole.ranks.update(part.ranks)
        whole.modules += part.modules
        whole.parameters += part.parameters
        whole.fan_in_fan_out |= part.fan_in_fan_out
    return whole


@torch.no_grad()
def export_lora(model: AdaptedModel, adapter_name: str, directory: str | os.PathLike) -> None:
    """Write adapter `adapter_name` of `model` (a resident one is made modules first) as a PEFT LoRA directory."""
    _exportable(model, adapter_name, "PEFT's LoRA format")
    config = model.peft_config[adapter_name]
    method = get_method(config.method)
    part = _lora_part(model, adapter_name, _PREFIX)
    tensors, ranks = part.tensors, part.ranks
    saved = []
    for mname, tc in model.trainable_copies().items():
        if adapter_name in tc.copies:
            saved.append(mname)
            for pname, p in tc.copies[adapter_name].state_dict().items():
                tensors[f"{_PREFIX}{mname}.{pname}"] = p.detach()
    candidates = [
        n
        for n, m in model.model.named_modules()
        if isinstance(m, AdapterLayer) or (is_adaptable(m) and not n.endswith(".base_layer"))
    ]
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(n): k for n, k in ranks.items() if k != r}
    from peft import LoraConfig as PeftLoraConfig  # imported here: loading peft takes seconds

    peft_config = PeftLoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=_target_names(part.modules, candidates) if part.modules else None,
        target_parameters=part.parameters or None,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        fan_in_fan_out=part.fan_in_fan_out,
        **method.peft_options,
        modules_to_save=saved or None,
        base_model_name_or_path=config.base_model_name_or_path
        or getattr(getattr(model.model, "config", None), "_name_or_path", None),
        task_type=_task_type(model.model),
        inference_mode=True,
    )

    def build(tmp: Path) -> None:
        peft_config.save_pretrained(str(tmp))
        atomic_save_safetensors(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})

    atomic_replace_dir(build, directory)


DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"


@torch.no_grad()
def export_diffusers_lora(model: AdaptedModel, adapter_name: str, directory: str | os.PathLike) -> None:
    """Write adapter `adapter_name` of a DreamBooth-trained pipeline (nora.diffusion.DreamBoothModel) as diffusers'
    LoRA file, `DIRECTORY/pytorch_lora_weights.safetensors`, keyed `unet.<module>.lora_A.weight` /
    `text_encoder.<module>.lora_B.weight` with the scale folded into B (alpha = rank), so
    `pipeline.load_lora_weights(DIRECTORY)` applies exactly nora's ΔW."""
    from .diffusion import DreamBoothModel

    if not isinstance(model.model, DreamBoothModel):
        raise AdapterError(
            f"export_diffusers_lora writes a diffusers pipeline's LoRA file; this model is a "
            f"{type(model.model).__name__}. Export it with export_lora (PEFT's format) instead."
        )
    _exportable(model, adapter_name, "diffusers' LoRA format")
    if model.trainable_copies():
        raise AdapterError("diffusers' LoRA file holds no fully trained modules: leave modules_to_save unset.")
    tensors = _lora_part(model, adapter_name, "").tensors
    # DoRA's magnitude as the module's own parameter name: transformers' loader (the text encoder's) reads only
    # that spelling, diffusers' UNet loader reads both.
    tensors = {f"{k}.weight" if k.endswith(".lora_magnitude_vector") else k: t for k, t in tensors.items()}
    metadata = {"format": "pt", "nora_method": model.peft_config[adapter_name].method}

    def build(tmp: Path) -> None:
        atomic_save_safetensors(tensors, tmp / DIFFUSERS_WEIGHTS, metadata=metadata)

    atomic_replace_dir(build, directory)
