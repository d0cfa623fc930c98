"""Adapter files: adapter_config.json + adapter_model.safetensors, written atomically, checked on load.

The file holds only what cannot be recomputed (trainable tensors, AwSVD scales, modules_to_save) and, per
layer, the rank, shape and basis fingerprint. Outer bases and residuals are recomputed from the base weights
(or read from the basis cache); an adapter is refused by a base whose fingerprint differs.

Inference-only adapters go to a resident AdapterBank (store.py). The first file of a layout is checked in full
and fixes where each layer's tensors lie in such a file; a later file whose safetensors header is byte-for-byte
the same (same names, shapes, dtypes and offsets) is copied into its slot straight from its bytes, one copy per
layer. Any other file takes the checked path.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file
from torch import nn

from .atomic import atomic_replace_dir, atomic_save_safetensors, atomic_write_json
from .basis import basis_fingerprint
from .config import AdapterConfig
from .errors import AdapterError
from .layer import AdapterLayer, is_adaptable, oriented_weight
from .methods import get_method
from .svd import fingerprint, weight_digest

if TYPE_CHECKING:
    from .model import AdaptedModel
    from .store import AdapterBank

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
    for mname, tc in model._copies().items():
        if name in tc.copies:
            for pname, p in tc.copies[name].state_dict().items():
                tensors[f"{_SAVE_PREFIX}{mname}.{pname}"] = p.detach()
    meta = {"format_version": FORMAT_VERSION, "version": _nora_version(), "layers": layers}
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
    meta = {"format_version": FORMAT_VERSION, "version": _nora_version(), "layers": layers}
    return tensors, meta


def save_adapter(model: AdaptedModel, name: str, directory: str | os.PathLike) -> None:
    write_adapter(*adapter_payload(model, name), directory)


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


def write_adapter(tensors: dict[str, torch.Tensor], payload: dict[str, Any], directory: str | os.PathLike) -> None:
    config_method = payload["method"]

    def build(tmp: Path) -> None:
        atomic_save_safetensors(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt", "nora_method": config_method})
        atomic_write_json(payload, tmp / CONFIG_NAME)

    directory = Path(directory)
    if directory.exists() and any(p.is_dir() for p in directory.iterdir()):
        # Other adapters live in sub-directories here: replace only our two files.
        build(directory)
    else:
        atomic_replace_dir(build, directory)


def read_adapter(directory: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor], dict[str, Any]]:
    config, meta, w_path = _read_config(directory)
    try:
        tensors = load_file(w_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupt(w_path, e) from e
    return config, tensors, meta


def _corrupt(w_path: Path, e: Exception) -> AdapterError:
    return AdapterError(
        f"{w_path} is corrupt or truncated ({e}). Copy or save the adapter again; nora only reads "
        "safetensors and never unpickles."
    )


@dataclass
class AdapterFile:
    """An adapter directory read into memory: its config and metadata parsed, its weights file as bytes
    (tensors parsed only when asked for)."""

    directory: Path
    config: AdapterConfig
    meta: dict[str, Any]
    weights_path: Path
    raw: bytearray
    _tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            try:
                self._tensors = load(bytes(self.raw))
            except (SafetensorError, OSError, ValueError) as e:
                raise _corrupt(self.weights_path, e) from e
        return self._tensors

    def header_bytes(self) -> bytes | None:
        """The safetensors header as written (None if the file is too short to hold one)."""
        if len(self.raw) < 8:
            return None
        (n,) = struct.unpack("<Q", self.raw[:8])
        return bytes(self.raw[8 : 8 + n]) if 8 + n <= len(self.raw) else None

    def header(self) -> dict[str, Any] | None:
        head = self.header_bytes()
        try:
            parsed = json.loads(head) if head is not None else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return parsed if isinstance(parsed, dict) else None


def open_adapter(directory: str | os.PathLike) -> AdapterFile:
    config, meta, w_path = _read_config(directory)
    try:
        with open(w_path, "rb") as fh:
            raw = bytearray(os.fstat(fh.fileno()).st_size)
            fh.readinto(raw)
    except OSError as e:
        raise _corrupt(w_path, e) from e
    return AdapterFile(Path(directory), config, meta, w_path, raw)


def _read_config(directory: str | os.PathLike) -> tuple[AdapterConfig, dict[str, Any], Path]:
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not directory.exists():
        raise AdapterError(f"adapter directory {directory} does not exist; check the path.")
    if not directory.is_dir():
        raise AdapterError(f"{directory} is a file; an adapter is the directory holding {CONFIG_NAME}.")
    if not cfg_path.is_file():
        inside = sorted(p.name for p in directory.iterdir() if (p / CONFIG_NAME).is_file())
        if inside:
            raise AdapterError(
                f"{directory} holds no adapter of its own but adapters in sub-directories {inside} (save_pretrained "
                f"puts every adapter but 'default' in DIR/NAME, as PEFT does): load {directory / inside[0]}."
            )
        raise AdapterError(
            f"{directory} has no {CONFIG_NAME}: not a nora adapter directory (save one with "
            "model.save_pretrained(dir))."
        )
    try:
        payload = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # (RecursionError: nested too deep)
        raise AdapterError(f"{cfg_path} is not valid JSON ({e}); the file is damaged: save the adapter again.") from e
    if not isinstance(payload, dict):
        raise AdapterError(f"{cfg_path} holds a JSON {type(payload).__name__}, not an object; save the adapter again.")
    if "peft_type" in payload:
        raise AdapterError(f"{cfg_path} is a PEFT adapter ({payload['peft_type']}); load it with peft.PeftModel.")
    meta = payload.pop("nora", None)
    if not isinstance(meta, dict) or "layers" not in meta:
        raise AdapterError(f"{cfg_path} lacks nora's per-layer metadata; it was not written by nora.")
    layers, version = meta["layers"], meta.get("format_version", 0)
    if not isinstance(layers, dict) or not layers or not all(isinstance(v, dict) for v in layers.values()):
        raise AdapterError(
            f"{cfg_path}: its per-layer metadata (nora.layers) is not an object of layers; the file was edited or "
            "damaged: save the adapter again."
        )
    if isinstance(version, bool) or not isinstance(version, int):
        raise AdapterError(f"{cfg_path}: format_version={version!r} is not a number; save the adapter again.")
    if version > FORMAT_VERSION:
        raise AdapterError(f"{directory} uses adapter format {meta['format_version']}; upgrade nora to load it.")
    config = AdapterConfig.from_dict(payload)
    if not w_path.is_file():
        raise AdapterError(f"{directory} has no {WEIGHTS_NAME}; the adapter was not saved completely.")
    return config, meta, w_path


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
        if not (isinstance(module, AdapterLayer) or is_adaptable(module)) or lname.endswith("base_layer"):
            raise AdapterError(
                f"adapter {where} targets module {lname!r}, a {type(module).__name__} of this model that takes no "
                "adapter (only nn.Linear / Conv1D layers do): its adapter_config.json was edited, or it was made for "
                "another architecture."
            )
        r, shape = info.get("r"), info.get("shape")
        whole = [r, *shape] if isinstance(shape, list) and len(shape) == 2 else [None]
        if any(type(n) is not int for n in whole) or r < 1 or not isinstance(info.get("fingerprint"), str):
            raise AdapterError(
                f"adapter {where}: the metadata of layer {lname!r} ({repr(info)[:80]}) does not give its rank r, shape "
                "and fingerprint; its adapter_config.json was edited or damaged: save the adapter again."
            )
        weight = oriented_weight(module)
        if list(weight.shape) != info["shape"]:
            raise AdapterError(
                f"adapter {where}: module {lname!r} is {list(weight.shape)} here but {info['shape']} in the "
                f"adapter; it was made for another base model ({config.base_model_name_or_path})."
            )
        digest = module.weight_digest if isinstance(module, AdapterLayer) else weight_digest(weight)
        scales = tensors.get(f"{lname}.awsvd_scale")
        if method.uses_basis:
            expected = basis_fingerprint(
                method.name, r, method.placement(config), config.svd_settings, tuple(weight.shape), digest, scales
            )
        else:
            expected = fingerprint(method=method.name, r=r, shape=list(weight.shape), digest=digest)
        if expected != info["fingerprint"] and info.get("weight") == digest:
            raise AdapterError(
                f"adapter {where}: the settings recorded for {lname!r} (r={r}, placement, SVD options) are not those "
                "it was saved with, though the base weights match: its adapter_config.json was edited or damaged "
                "after saving. Restore the file (or save the adapter again)."
            )
        if expected != info["fingerprint"]:
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
        ranks[lname] = r
    return names, ranks


def check_keys(expected, tensors: dict[str, torch.Tensor], where) -> None:
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterError(
            f"adapter {where} lacks tensors {missing[:5]}{'…' if len(missing) > 5 else ''}; the file is incomplete."
        )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise AdapterError(f"adapter {where} holds tensors this model has no place for: {extra[:5]}.")


def apply_tensors(model: AdaptedModel, name: str, tensors: dict[str, torch.Tensor], where) -> None:
    expected, _ = adapter_state(model, name)
    check_keys(expected, tensors, where)
    with torch.no_grad():
        for lname, layer in model.layers().items():
            if name not in layer.adapters:
                continue
            for pname, p in layer.adapters[name].params.items():
                _copy(p, tensors[f"{lname}.{pname}"], f"{lname}.{pname}", where)
        for mname, tc in model._copies().items():
            if name in tc.copies:
                for pname, p in tc.copies[name].state_dict().items():
                    _copy(p, tensors[f"{_SAVE_PREFIX}{mname}.{pname}"], f"{mname}.{pname}", where)


def _copy(dst: torch.Tensor, src: torch.Tensor, key: str, where) -> None:
    check_shape(tuple(dst.shape), src, key, where)
    dst.copy_(src)


def check_shape(shape: tuple[int, ...], src: torch.Tensor, key: str, where) -> None:
    if tuple(src.shape) != shape:
        raise AdapterError(
            f"adapter {where}: tensor {key} is {list(src.shape)} in the file but "
            f"{list(shape)} here; the file does not belong to this configuration."
        )


# ---- resident adapters ---------------------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16", torch.float16: "F16"}


def set_file_layout(bank: AdapterBank, file: AdapterFile) -> None:
    """Record how to copy `bank`'s rows straight from a file laid out as `file` (the first of its layout): each
    layer's tensors adjacent, in its stack's column order, in the stacks' dtype. All rows, scales included, are
    then gathered from the file's bytes in one indexing op and written with one copy per layer."""
    header, head = file.header(), file.header_bytes()
    stacks = list(bank.stacks.items())
    if header is None or head is None or not stacks:
        return
    dtype = stacks[0][1].data.dtype
    size, start_of_data = dtype.itemsize, 8 + len(head)
    if any(s.data.dtype != dtype for _, s in stacks) or start_of_data % size or (len(file.raw) - start_of_data) % size:
        return
    ranks = sorted({s.r for _, s in stacks})
    pieces = []
    for lname, stack in stacks:
        entries = [header.get(f"{lname}.{pname}") for pname, _, _ in stack.layout]
        if any(not isinstance(e, dict) or e.get("dtype") != _SAFETENSORS_DTYPES.get(dtype) for e in entries):
            return
        offsets = [e["data_offsets"] for e in entries]
        if any(a[1] != b[0] for a, b in zip(offsets, offsets[1:], strict=False)) or offsets[0][0] % size:
            return
        first, end = offsets[0][0] // size, offsets[-1][1] // size
        if end - first != stack.data.shape[1] - 1:
            return
        # staged vector: the scales (one per rank), then the file's data region
        pieces += [torch.tensor([ranks.index(stack.r)]), torch.arange(first, end) + len(ranks)]
    bank.file_layout = {
        "header": head,
        "size": len(file.raw),
        "ranks": ranks,
        "index": torch.cat(pieces),
        "widths": [stack.data.shape[1] for _, stack in stacks],
    }


@torch.no_grad()
def fill_slot(bank: AdapterBank, slot: int, file: AdapterFile, where) -> None:
    """Write the adapter in `file` to `slot` of every layer of `bank`, with its scale."""
    config = file.config
    scales = {r: bank.method.scale(config, r) for r in {s.r for s in bank.stacks.values()}}
    known = bank.file_layout
    if known is not None and len(file.raw) == known["size"] and file.header_bytes() == known["header"]:
        dtype = next(iter(bank.stacks.values())).data.dtype
        flat = torch.frombuffer(file.raw, dtype=dtype, offset=8 + len(known["header"]))
        staged = torch.cat([torch.tensor([scales[r] for r in known["ranks"]], dtype=dtype), flat])
        rows = staged.index_select(0, known["index"])
        on_device: dict[torch.device, list[torch.Tensor]] = {}
        for i, stack in enumerate(bank.stacks.values()):
            device = stack.data.device
            if device not in on_device:
                on_device[device] = list(rows.to(device).split(known["widths"]))
            stack.data[slot].copy_(on_device[device][i])
        return
    tensors = file.tensors()
    check_keys(bank.expected_keys, tensors, where)
    for lname, stack in bank.stacks.items():
        row = stack.data[slot]
        for pname, start, shape in stack.layout:
            key = f"{lname}.{pname}"
            check_shape(shape, tensors[key], key, where)
            row[start : start + tensors[key].numel()].view(shape).copy_(tensors[key])
        row[0] = scales[stack.r]
