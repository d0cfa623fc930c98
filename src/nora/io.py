"""The adapter directory format: adapter_config.json + adapter_model.safetensors, written atomically, checked
on read. This module knows files, configs and tensors, nothing of models (state.py maps tensors to layers).

The file holds only what cannot be recomputed (trainable tensors, AwSVD scales, modules_to_save) and, in the
config's "nora" object, per layer the rank, shape, basis fingerprint and weight digest. `AdapterFile` keeps the
weights file's bytes, so a resident load (resident.py) can copy rows straight from them.

Every weights file nora reads (its own and PEFT's, peft_import.py) is checked here first, from its bytes: complete,
floating-point tensors only, every value finite (`checked_weights`), so no load path (library, eval, export,
generate, serve) takes a file that would compute NaN or silently cast integers.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from .atomic import atomic_replace_dir, atomic_save_safetensors, atomic_write_json
from .config import AdapterConfig
from .errors import AdapterError
from .methods import get_method

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
SAVE_PREFIX = "modules_to_save."  # tensors of modules trained whole (heads), by module path
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def nora_version() -> str:
    try:
        return version("nora-peft")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


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
    file = open_adapter(directory)
    return file.config, file.tensors(), file.meta


def _corrupt(w_path: Path, e: Exception | str) -> AdapterError:
    return AdapterError(
        f"{w_path} is corrupt or truncated ({e}). Copy or save the adapter again; nora only reads "
        "safetensors and never unpickles."
    )


def read_weights(w_path: Path) -> bytearray:
    """A safetensors file's bytes, checked by `checked_weights`."""
    try:
        with open(w_path, "rb") as fh:
            raw = bytearray(os.fstat(fh.fileno()).st_size)
            fh.readinto(raw)
    except OSError as e:
        raise _corrupt(w_path, e) from e
    checked_weights(raw, w_path)
    return raw


def parse_weights(raw: bytearray, w_path: Path) -> dict[str, torch.Tensor]:
    try:
        return load(bytes(raw))
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupt(w_path, e) from e


def checked_weights(raw: bytearray, w_path: Path) -> dict[str, Any]:
    """The header of the safetensors file `raw` (read from `w_path`), once every tensor in it is known to lie whole
    in the file, to be floating point and to hold finite values only; each refusal names the tensor."""
    if len(raw) < 8:
        raise _corrupt(w_path, f"{len(raw)} bytes, shorter than a safetensors header")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise _corrupt(w_path, f"its header claims {n} bytes, the file holds {len(raw) - 8}")
    try:
        header = json.loads(bytes(raw[8 : 8 + n]))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise _corrupt(w_path, f"its header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise _corrupt(w_path, "its header is not a JSON object")
    data = len(raw) - 8 - n
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        entry = entry if isinstance(entry, dict) else {}
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)) or not (
            isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
        ):
            raise _corrupt(w_path, f"the header entry of tensor {key!r} is malformed")
        if dtype not in FLOAT_DTYPES:
            raise AdapterError(
                f"{w_path}: tensor {key!r} is {dtype}, not floating point; an adapter's tensors are float32, float16, "
                "bfloat16 or float64 (an integer or boolean tensor would be cast silently). The file was not written "
                "by nora or PEFT, or was edited: save the adapter again."
            )
        torch_dtype = FLOAT_DTYPES[dtype]
        count = math.prod(shape)
        begin, end = offsets
        if not 0 <= begin <= end or end - begin != count * torch_dtype.itemsize:
            raise _corrupt(w_path, f"tensor {key!r}: its byte range does not fit its shape {shape} and dtype {dtype}")
        if end > data:
            raise _corrupt(w_path, f"tensor {key!r} ends at byte {end} of {data} data bytes: the file is cut")
        if count == 0:
            continue
        values = torch.frombuffer(raw, dtype=torch_dtype, count=count, offset=8 + n + begin)
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            raise AdapterError(
                f"{w_path}: tensor {key!r} holds {bad} non-finite value(s) (NaN or inf) of {count}; such an adapter "
                "computes NaN. It diverged in training or the file is damaged: train again (e.g. with a lower "
                "learning rate) or use an earlier checkpoint."
            )
    return header


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
            self._tensors = parse_weights(self.raw, self.weights_path)
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
    """The adapter in `directory`, its config read and its weights file checked (`checked_weights`)."""
    config, meta, w_path = _read_config(directory)
    return AdapterFile(Path(directory), config, meta, w_path, read_weights(w_path))


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
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise AdapterError(
            f"{cfg_path}: its per-layer metadata (nora.layers) is not an object of layers; the file was edited or "
            "damaged: save the adapter again."
        )
    if isinstance(version, bool) or not isinstance(version, int):
        raise AdapterError(f"{cfg_path}: format_version={version!r} is not a number; save the adapter again.")
    if version > FORMAT_VERSION:
        raise AdapterError(f"{directory} uses adapter format {meta['format_version']}; upgrade nora to load it.")
    config = AdapterConfig.from_dict(payload)
    if not layers and get_method(config.method).adapts_layers:
        raise AdapterError(
            f"{cfg_path}: its per-layer metadata (nora.layers) lists no layer, and a {config.method} adapter adapts "
            "some; the file was edited or damaged: save the adapter again."
        )
    if not w_path.is_file():
        raise AdapterError(f"{directory} has no {WEIGHTS_NAME}; the adapter was not saved completely.")
    return config, meta, w_path


def check_keys(expected, tensors: dict[str, torch.Tensor], where) -> None:
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterError(
            f"adapter {where} lacks tensors {missing[:5]}{'…' if len(missing) > 5 else ''}; the file is incomplete."
        )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise AdapterError(f"adapter {where} holds tensors this model has no place for: {extra[:5]}.")


def check_shape(shape: tuple[int, ...], src: torch.Tensor, key: str, where) -> None:
    if tuple(src.shape) != shape:
        raise AdapterError(
            f"adapter {where}: tensor {key} is {list(src.shape)} in the file but "
            f"{list(shape)} here; the file does not belong to this configuration."
        )
