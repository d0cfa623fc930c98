"""Loading base models and tokenizers (a Hugging Face id or a local directory, optionally a GGUF file in it): the
one place `nora train`, `nora eval` and `nora serve` get them from."""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import AdapterError
from .hf_compat import clear_gguf_quantization

DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_device(device: str) -> torch.device:
    """ "auto" → CUDA where present, else CPU; anything else as torch reads it ("cpu", "cuda:1", ...)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise AdapterError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise AdapterError(f"--device {device}: this machine has no CUDA device torch can use; use --device cpu.")
        if resolved.index is not None and resolved.index >= count:
            raise AdapterError(f"--device {device}: there are only {count} CUDA device(s), cuda:0..cuda:{count - 1}.")
    return resolved


def check_threads(threads: int | None) -> None:
    """Refuse more torch threads than this process may run on: each is an OpenMP thread that only waits on the
    others, and a typo such as --threads 100000 crashed the process (a segmentation fault) at its first op."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if threads is not None and threads > cpus:
        raise AdapterError(f"--threads {threads}: this machine lets nora use {cpus} CPU(s); give at most {cpus}.")


def parse_dtype(dtype: str) -> torch.dtype | None:
    """A --dtype value → a torch dtype, or None for "auto"."""
    if dtype not in DTYPES:
        raise AdapterError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}.")
    return DTYPES[dtype]


def looks_local(name: str) -> bool:
    """A path rather than a hub id (`owner/name`): absolute, relative with ./ or ../, ~, or more than one `/`."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name in (".", "..") or name.count("/") > 1 or "\\" in name


def is_gguf(name: str | os.PathLike) -> bool:
    """Whether a base model is given as the path of a GGUF file (DIR/model.gguf)."""
    return str(name).lower().endswith(".gguf")


def locate(name: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(model directory or hub id, GGUF file in it or None) of a base given as a directory or hub id with an
    optional `gguf_file`, or as the path of a GGUF file — the form an adapter trained from one records, so that
    a `.gguf` path works as a base everywhere."""
    if not is_gguf(name):
        return name, gguf_file
    path = Path(name).expanduser()
    if gguf_file is not None and Path(gguf_file).name != path.name:
        raise AdapterError(f"{name} is a GGUF file and --gguf-file names another ({gguf_file}); give one of them.")
    return str(path.parent), path.name


def base_reference(name: str, gguf_file: str | None = None) -> str:
    """How an adapter records its base so that every command finds it again: a local directory as its absolute
    path, a hub id as it is, a GGUF file (local, or a hub one in the Hugging Face cache) as its absolute path."""
    name, gguf_file = locate(name, gguf_file)
    source = _gguf_path(name, gguf_file) if gguf_file else None
    if source is not None:
        return os.path.abspath(source)  # not resolved: a hub cache entry is a link to a blob without the suffix
    local = Path(name).expanduser()
    return str(local.resolve()) if local.exists() else name


def check_model_source(name: str, gguf_file: str | None = None, what: str = "--model") -> None:
    """Refuse, at once and saying how to fix it, a model that cannot be loaded: a local path that does not exist
    or is not a model directory, a GGUF path that is not there or not a GGUF file, a malformed hub id, or a hub
    model that is neither cached nor reachable (which transformers would retry for about a minute before a long
    traceback)."""
    given = name
    name, gguf_file = locate(name, gguf_file)
    path = Path(name).expanduser()
    if is_gguf(given) and not (path / str(gguf_file)).is_file():
        raise AdapterError(f"{what} {given}: no such GGUF file. Check the path (relative to {Path.cwd()}).")
    if path.exists():
        if path.is_file():
            raise AdapterError(f"{what} {name} is a file; a model is a directory or a .gguf file: pass its directory.")
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise AdapterError(f"{what} {name} holds no GGUF file {gguf_file!r}; check --gguf-file.")
            _check_gguf_magic(path / gguf_file, what)
        elif not (path / "config.json").is_file():
            raise AdapterError(
                f"{what} {name} holds no config.json, so it is not a transformers model directory (save one with "
                "model.save_pretrained(DIR), or point at the directory that has config.json)."
            )
        else:
            _refuse_pickled(path, what)
        return
    if looks_local(name):
        raise AdapterError(f"{what} {name}: no such directory. Check the path (relative to {Path.cwd()}).")
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise AdapterError(
            f"{what} {name!r} is neither an existing directory nor a hub id like 'owner/name'; check the spelling."
        ) from None
    if try_to_load_from_cache(name, gguf_file or "config.json") is not None or hub_reachable():
        return
    raise AdapterError(
        f"{what} {name}: not a local directory, not in the Hugging Face cache, and the hub cannot be reached "
        f"(offline{' mode' if _offline_mode() else ''}). On a machine with internet run `hf download {name} "
        f"--local-dir DIR`, copy DIR here and pass {what} DIR."
    )


PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _refuse_pickled(path: Path, what: str) -> None:
    """A model directory whose weights are only pickled (pytorch_model.bin, *.pt): loading them runs the unpickler
    on the file, which nora never does."""
    if any(path.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in PICKLED for p in path.glob(pattern))
    if pickled:
        raise AdapterError(
            f"{what} {path} holds its weights only as pickled files ({', '.join(pickled[:3])}), which nora does not "
            "load: unpickling runs code from the file. Convert it once, where you trust the file: "
            "AutoModel...from_pretrained(DIR).save_pretrained(NEW_DIR) writes model.safetensors; pass NEW_DIR."
        )


def require_package(module: str, extra: str, purpose: str) -> None:
    """Refuse, before anything is loaded, a step whose optional dependency is not installed."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise AdapterError(
            f'{purpose} needs {module}, which is not installed: pip install -e ".[{extra}]" in nora\'s checkout (or '
            f"pip install {module})."
        ) from e


def _check_gguf_magic(path: Path, what: str) -> None:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise AdapterError(f"{what}: {path} is not a GGUF file (it does not start with GGUF); check the path.")


def _offline_mode() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE") == "1")


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connection (once per process; False in offline mode)."""
    if _offline_mode():
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_kwargs(name: str | Path) -> dict[str, Any]:
    """local_files_only for a cached hub model when the hub is out of reach, so nothing waits on retries."""
    if Path(name).expanduser().exists() or hub_reachable():
        return {}
    return {"local_files_only": True}


def model_config(name: str) -> Any:
    """The transformers config of the model directory or cached hub id `name` (config.json only, no weights), or
    None where it cannot be read here."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, **_hub_kwargs(name))
    except (OSError, ValueError, KeyError):
        return None


def load_model(
    name: str,
    model_class: str = "AutoModelForCausalLM",
    *,
    dtype: torch.dtype | Literal["auto"] | None = None,
    gguf_file: str | None = None,
    quantize: str | None = None,
    **from_pretrained: Any,
) -> nn.Module:
    """The pretrained model at `name` (a directory, a hub id, or a .gguf file) as transformers' `model_class` (a
    causal LM unless a task kind names another, e.g. AutoModelForSequenceClassification; `from_pretrained`: what
    the kind adds, e.g. num_labels). `dtype`: a torch dtype, "auto" (the checkpoint's) or None (float32). A GGUF
    file is dequantised to float, so the model trains, merges and saves like any other — once: the dequantised copy
    is kept in the GGUF cache (`dequantized_gguf`); the model's `name_or_path` is the GGUF file, which an adapter
    saved on it records.
    `quantize` ("nf4", "fp4": 4-bit, QLoRA's setting; "int8") loads the linear layers in bitsandbytes on CUDA when
    present, else on the CPU (its CPU backend), computing in `dtype`; the output head stays in float."""
    import transformers

    name, gguf_file = locate(name, gguf_file)
    reference = base_reference(name, gguf_file) if gguf_file else None
    cached = dequantized_gguf(name, gguf_file) if gguf_file else None
    if cached is not None:  # the dequantised copy: a plain checkpoint
        name, gguf_file = str(cached), None
    kwargs: dict[str, Any] = _hub_kwargs(name)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if quantize and gguf_file:
        raise AdapterError(
            f"quantize={quantize} with a GGUF file requantizes its dequantised copy, kept in the GGUF cache, which is "
            "off (NORA_GGUF_CACHE=0): turn it on, or save the dequantised model and load that."
        )
    if quantize:
        kwargs.update(quantization_kwargs(quantize, dtype if isinstance(dtype, torch.dtype) else torch.float32))
    model = getattr(transformers, model_class).from_pretrained(name, **from_pretrained, **kwargs)
    if gguf_file:  # loaded from the GGUF itself: no longer quantized, whatever the loader recorded
        clear_gguf_quantization(model)
    if reference is not None:
        model.name_or_path = model.config.name_or_path = reference
    return model


def gguf_cache_root() -> Path | None:
    """Where dequantised GGUF checkpoints are kept: $NORA_CACHE/gguf (default ~/.cache/nora/gguf, under
    $XDG_CACHE_HOME where set); NORA_GGUF_CACHE=0 turns the cache off."""
    if os.environ.get("NORA_GGUF_CACHE", "1") in ("0", "false", "no", "off"):
        return None
    root = os.environ.get("NORA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nora"
    return Path(root) / "gguf"


def dequantized_gguf(name: str, gguf_file: str | None = None) -> Path | None:
    """A save_pretrained directory of the model in GGUF file `gguf_file` of `name` (a local directory, or a hub id
    whose file is in the Hugging Face cache; or `name` is the GGUF file's path), dequantised to float32 on first use
    and kept, keyed by the file's path, size and modification time, so later loads (train, eval, serve, benchmarks)
    skip the dequantisation. None where the file cannot be found here or the cache is off (the caller loads the
    GGUF itself)."""
    import hashlib

    name, gguf_file = locate(name, gguf_file)
    root = gguf_cache_root()
    source = _gguf_path(name, gguf_file) if gguf_file else None
    if root is None or source is None:
        return None
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = root / f"{source.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .atomic import atomic_replace_dir

    def build(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        clear_gguf_quantization(model)  # no longer quantized, whatever the loader recorded
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "nora_gguf_source.txt").write_text(f"{source}\n")

    atomic_replace_dir(build, target)
    return target


def _gguf_path(name: str, gguf_file: str) -> Path | None:
    local = Path(name).expanduser() / gguf_file
    if local.is_file():
        return local
    if looks_local(name):
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, gguf_file)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def quantization_kwargs(scheme: str, compute_dtype: torch.dtype) -> dict[str, Any]:
    """from_pretrained's arguments for a bitsandbytes base: nf4/fp4 (4-bit, block 64, no double quantization) or
    int8, on the first CUDA device when there is one, else on the CPU."""
    from transformers import BitsAndBytesConfig

    from .quant import SCHEMES

    if scheme not in SCHEMES:
        raise AdapterError(f"quantize={scheme!r}: choose from {', '.join(SCHEMES)}.")
    require_package("bitsandbytes", "quant", f"quantize={scheme} (a bitsandbytes base)")
    if scheme == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head", "score", "classifier"])
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme, bnb_4bit_compute_dtype=compute_dtype,
                                    llm_int8_skip_modules=["lm_head", "score", "classifier"])  # fmt: skip
    return {"quantization_config": config, "device_map": {"": 0} if torch.cuda.is_available() else "cpu"}


def name_labels(model: nn.Module, labels: Sequence[str] | None) -> None:
    """Record a classifier's label names, in id order, in its config (id2label / label2id) where it has one."""
    config = getattr(model, "config", None)
    if labels and config is not None:
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}


def load_tokenizer(name: str | Path, gguf_file: str | None = None, chat_template: Path | None = None) -> Any:
    """The tokenizer at `name` (read from the GGUF file when one is given, or when `name` is one)."""
    from transformers import AutoTokenizer

    name, gguf_file = locate(str(name), gguf_file)
    cached = dequantized_gguf(str(name), gguf_file) if gguf_file else None
    if cached is not None:
        name, gguf_file = cached, None
    kwargs = _hub_kwargs(name) | ({"gguf_file": gguf_file} if gguf_file else {})
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    if chat_template is not None:
        tokenizer.chat_template = Path(chat_template).read_text()
    return tokenizer


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """A key/value cache passed as the model's forward takes it: `cache=` from transformers 5.2x on (where
    `past_key_values=` warns that it goes in 5.40), `past_key_values=` before."""
    cls = type(model)
    if cls not in _CACHE_NAME:
        _CACHE_NAME[cls] = _cache_name(model)
    return {_CACHE_NAME[cls]: cache}


def _cache_name(model: nn.Module, depth: int = 0) -> str:
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    inner = model._modules.get("model") or model._modules.get("base_model")  # a wrapper (nora, PEFT) passes it on
    return _cache_name(inner, depth + 1) if inner is not None and depth < 4 else "past_key_values"


def output_cache(out: Any) -> Any:
    """The cache a forward returned (`out.cache`, or `out.past_key_values` before transformers 5.2x)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


_CACHE_NAME: dict[type, str] = {}
