"""Adapter files: adapter_config.json + adapter_model.safetensors, written atomically, checked on load.

The file holds only what cannot be recomputed (trainable tensors, AwSVD scales, modules_to_save) and, per
layer, the rank, shape and basis fingerprint. Outer bases and residuals are recomputed from the base weights
(or read from the basis cache); an adapter is refused by a base whose fingerprint differs.
"""

from __future__ import annotations

import json
import os
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .atomic import atomic_replace_dir, atomic_save_safetensors, atomic_write_json
from .basis import basis_fingerprint
from .config import AdapterConfig
from .errors import AdapterError
from .inject import trainable_copies
from .layer import AdapterLayer, oriented_weight
from .methods import get_method
from .svd import fingerprint, weight_digest

if TYPE_CHECKING:
    from .model import AdaptedModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
_SAVE_PREFIX = "modules_to_save."


def _nora_version() -> str:
    try:
        return version("nora-peft")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


def adapter_state(model: AdaptedModel, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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
        layers[lname] = {"r": core.r, "shape": list(layer.shape), "fingerprint": core.fingerprint}
    for mname, tc in trainable_copies(model.model).items():
        if name in tc.copies:
            for pname, p in tc.copies[name].state_dict().items():
                tensors[f"{_SAVE_PREFIX}{mname}.{pname}"] = p.detach()
    meta = {"format_version": FORMAT_VERSION, "version": _nora_version(), "layers": layers}
    return tensors, meta


def save_adapter(model: AdaptedModel, name: str, directory: str | os.PathLike) -> None:
    config = model.peft_config[name]
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(getattr(model.model, "config", None), "_name_or_path", None)
    tensors, meta = adapter_state(model, name)
    payload = config.to_dict()
    payload["nora"] = meta

    def build(tmp: Path) -> None:
        atomic_save_safetensors(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt", "nora_method": config.method})
        atomic_write_json(payload, tmp / CONFIG_NAME)

    directory = Path(directory)
    if directory.exists() and any(p.is_dir() for p in directory.iterdir()):
        # Other adapters live in sub-directories here: replace only our two files.
        build(directory)
    else:
        atomic_replace_dir(build, directory)


def read_adapter(directory: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor], dict[str, Any]]:
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise AdapterError(
            f"{directory} has no {CONFIG_NAME}: not a nora adapter directory (save one with "
            "model.save_pretrained(dir))."
        )
    try:
        payload = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_path} is not valid JSON ({e}); the file is damaged: save the adapter again.") from e
    if "peft_type" in payload:
        raise AdapterError(f"{cfg_path} is a PEFT adapter ({payload['peft_type']}); load it with peft.PeftModel.")
    meta = payload.pop("nora", None)
    if not isinstance(meta, dict) or "layers" not in meta:
        raise AdapterError(f"{cfg_path} lacks nora's per-layer metadata; it was not written by nora.")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterError(f"{directory} uses adapter format {meta['format_version']}; upgrade nora to load it.")
    config = AdapterConfig.from_dict(payload)
    if not w_path.is_file():
        raise AdapterError(f"{directory} has no {WEIGHTS_NAME}; the adapter was not saved completely.")
    try:
        tensors = load_file(w_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(
            f"{w_path} is corrupt or truncated ({e}). Copy or save the adapter again; nora only reads "
            "safetensors and never unpickles."
        ) from e
    return config, tensors, meta


def check_layers(
    model: nn.Module, config: AdapterConfig, meta: dict[str, Any], tensors: dict[str, torch.Tensor], where
) -> tuple[list[str], dict[str, int]]:
    """Match the file's layers to the model's, refusing another base before any SVD is computed."""
    method = get_method(config.method)
    names, ranks = [], {}
    for lname, info in meta["layers"].items():
        try:
            module = model.get_submodule(lname)
        except AttributeError:
            module = None
        if module is None:
            raise AdapterError(
                f"adapter {where} targets module {lname!r}, which this model does not have: it was made for "
                f"another architecture (base: {config.base_model_name_or_path})."
            )
        weight = oriented_weight(module)
        if list(weight.shape) != info["shape"]:
            raise AdapterError(
                f"adapter {where}: module {lname!r} is {list(weight.shape)} here but {info['shape']} in the "
                f"adapter; it was made for another base model ({config.base_model_name_or_path})."
            )
        digest = module.weight_digest if isinstance(module, AdapterLayer) else weight_digest(weight)
        r = int(info["r"])
        scales = tensors.get(f"{lname}.awsvd_scale")
        if method.uses_basis:
            expected = basis_fingerprint(
                method.name, r, method.placement(config), config.svd_settings, tuple(weight.shape), digest, scales
            )
        else:
            expected = fingerprint(method=method.name, r=r, shape=list(weight.shape), digest=digest)
        if expected != info["fingerprint"]:
            message = (
                f"adapter {where} was made for a different base model: the weights of {lname!r} differ from "
                f"those it was trained on (base recorded: {config.base_model_name_or_path}). Load it onto that "
                "base model."
            )
            if method.uses_basis:
                raise AdapterError(message + " Its outer SVD basis would not match, so it is refused.")
            warnings.warn(message + " Loading anyway: a plain LoRA update does not depend on W0.", stacklevel=3)
        names.append(lname)
        ranks[lname] = r
    return names, ranks


def apply_tensors(model: AdaptedModel, name: str, tensors: dict[str, torch.Tensor], where) -> None:
    expected, _ = adapter_state(model, name)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterError(
            f"adapter {where} lacks tensors {missing[:5]}{'…' if len(missing) > 5 else ''}; the file is incomplete."
        )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise AdapterError(f"adapter {where} holds tensors this model has no place for: {extra[:5]}.")
    with torch.no_grad():
        for lname, layer in model.layers().items():
            if name not in layer.adapters:
                continue
            for pname, p in layer.adapters[name].params.items():
                _copy(p, tensors[f"{lname}.{pname}"], f"{lname}.{pname}", where)
        for mname, tc in trainable_copies(model.model).items():
            if name in tc.copies:
                for pname, p in tc.copies[name].state_dict().items():
                    _copy(p, tensors[f"{_SAVE_PREFIX}{mname}.{pname}"], f"{mname}.{pname}", where)


def _copy(dst: torch.Tensor, src: torch.Tensor, key: str, where) -> None:
    if dst.shape != src.shape:
        raise AdapterError(
            f"adapter {where}: tensor {key} is {list(src.shape)} in the file but "
            f"{list(dst.shape)} here; the file does not belong to this configuration."
        )
    dst.copy_(src)
