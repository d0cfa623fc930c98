"""Building what `nora serve` serves: the base model and its tokenizer from a directory or a Hugging Face id, and
the adapters named on the command line (`NAME=PATH`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdapterError
from ..layer import BASE
from ..model import AdaptedModel

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_adapter_specs(specs: list[str]) -> dict[str, Path]:
    """`["math=runs/math", ...]` → `{"math": Path("runs/math"), ...}`, refusing malformed or repeated names."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise AdapterError(f"--adapter {spec!r}: write NAME=PATH, e.g. --adapter math=runs/math-adapter.")
        if name in adapters or name == BASE:
            raise AdapterError(f"--adapter {spec!r}: the name {name!r} is taken; give each adapter its own name.")
        if not Path(path).is_dir():
            raise AdapterError(f"--adapter {spec!r}: {path} is not a directory (save one with save_pretrained).")
        adapters[name] = Path(path)
    return adapters


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_base(
    base: str,
    tokenizer: str | None = None,
    gguf_file: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    chat_template: Path | None = None,
) -> tuple[nn.Module, Any]:
    """The causal LM at `base` (on `device`, in `dtype`) and its tokenizer (from `tokenizer`, else `base`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise AdapterError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}.")
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[dtype], **extra)
    if gguf_file:  # dequantised to float: no longer quantized, whatever the loader recorded
        model.hf_quantizer = None
        model.config.quantization_config = None
    tok = AutoTokenizer.from_pretrained(tokenizer or base, **({} if tokenizer else extra))
    if chat_template is not None:
        tok.chat_template = Path(chat_template).read_text()
    return model.to(resolve_device(device)).eval(), tok


def attach_adapters(model: nn.Module, adapters: dict[str, Path]) -> nn.Module:
    """`model` with every adapter of `adapters` loaded (an AdaptedModel), or unchanged when there are none."""
    for name, path in adapters.items():
        if isinstance(model, AdaptedModel):
            model.load_adapter(path, name)
        else:
            model = AdaptedModel.from_pretrained(model, path, name)
    if isinstance(model, AdaptedModel):
        model.eval_mode_frozen()
    return model.eval()
