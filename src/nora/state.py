"""Adapter state ↔ tensors: what an adapter of a model is as named tensors (and per-layer metadata), and the
reverse.

Works on an AdaptedModel through its public surface (layers(), trainable_copies(), resident_bank()); the file
format itself is io.py's, the check that a file belongs to a model file_check.py's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .io import FORMAT_VERSION, SAVE_PREFIX, check_keys, check_shape, nora_version

if TYPE_CHECKING:
    from .model import AdaptedModel
    from .slots import AdapterBank


def adapter_state(model: AdaptedModel, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    bank = model.resident_bank(name)
    if bank is not None:
        return _resident_state(model, bank, name)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for lname, layer in model.layers().items():
        if name not in layer.adapters:
            continue
        core = layer.adapters[name]
        for pname, p in core.params.items():
            tensors[f"{lname}.{pname}"] = p.detach()
        basis = layer.basis_of(core)
        if basis is not None and basis.scales is not None:
            tensors[f"{lname}.awsvd_scale"] = basis.scales
        layers[lname] = {
            "r": core.r, "shape": list(layer.shape), "fingerprint": core.fingerprint, "weight": layer.weight_digest
        }  # fmt: skip
        if layer.quant is not None:
            layers[lname]["quant"] = layer.quant
    for mname, tc in model.trainable_copies().items():
        if name in tc.copies:
            for pname, p in tc.copies[name].state_dict().items():
                tensors[f"{SAVE_PREFIX}{mname}.{pname}"] = p.detach()
    meta = {"format_version": FORMAT_VERSION, "version": nora_version(), "layers": layers}
    return tensors, meta


def _resident_state(model: AdaptedModel, bank: AdapterBank, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """adapter_state of a resident adapter, read from its slot (copies: a slot is reused once freed)."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    slot = bank.slots[name]
    for lname, layer in model.layers().items():
        stack = bank.stacks.get(lname)
        if stack is None:
            continue
        for pname, t in stack.tensors_at(slot).items():
            tensors[f"{lname}.{pname}"] = t.clone()
        scales = layer.bases[stack.basis_key].scales
        if scales is not None:
            tensors[f"{lname}.awsvd_scale"] = scales
        layers[lname] = {
            "r": stack.r, "shape": list(layer.shape), "fingerprint": stack.fingerprint, "weight": layer.weight_digest
        }  # fmt: skip
        if layer.quant is not None:
            layers[lname]["quant"] = layer.quant
    meta = {"format_version": FORMAT_VERSION, "version": nora_version(), "layers": layers}
    return tensors, meta


def adapter_payload(model: AdaptedModel, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and adapter_config.json of adapter `name`. With FSDP-sharded parameters this gathers each
    tensor in full: a collective, so every process calls it (and one writes)."""
    config = model.peft_config[name]
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(getattr(model.model, "config", None), "_name_or_path", None)
    tensors, meta = adapter_state(model, name)
    tensors = {k: _full(v) for k, v in tensors.items()}
    payload = config.to_dict()
    payload["nora"] = meta
    return tensors, payload


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor shard (FSDP) → the whole tensor


def apply_tensors(model: AdaptedModel, name: str, tensors: dict[str, torch.Tensor], where) -> None:
    expected, _ = adapter_state(model, name)
    check_keys(expected, tensors, where)
    with torch.no_grad():
        for lname, layer in model.layers().items():
            if name not in layer.adapters:
                continue
            for pname, p in layer.adapters[name].params.items():
                _copy(p, tensors[f"{lname}.{pname}"], f"{lname}.{pname}", where)
        for mname, tc in model.trainable_copies().items():
            if name in tc.copies:
                for pname, p in tc.copies[name].state_dict().items():
                    _copy(p, tensors[f"{SAVE_PREFIX}{mname}.{pname}"], f"{mname}.{pname}", where)


def _copy(dst: torch.Tensor, src: torch.Tensor, key: str, where) -> None:
    check_shape(tuple(dst.shape), src, key, where)
    dst.copy_(src)
