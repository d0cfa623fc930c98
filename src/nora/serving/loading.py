"""Building what `nora serve` serves: the base model and its tokenizer from a directory or a Hugging Face id, and
the adapters named on the command line (`NAME=PATH`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..errors import AdapterError
from ..layers import BASE
from ..model import AdaptedModel
from ..pretrained import load_model, load_tokenizer, parse_dtype, resolve_device


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


def load_base(
    base: str,
    tokenizer: str | None = None,
    gguf_file: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    chat_template: Path | None = None,
) -> tuple[nn.Module, Any]:
    """The causal LM at `base` (on `device`, in `dtype`) and its tokenizer (from `tokenizer`, else `base`)."""
    model = load_model(base, dtype=parse_dtype(dtype) or "auto", gguf_file=gguf_file)
    tok = load_tokenizer(tokenizer or base, None if tokenizer else gguf_file, chat_template)
    return model.to(resolve_device(device)).eval(), tok


def attach_adapters(model: nn.Module, adapters: dict[str, Path]) -> AdaptedModel:
    """`model` wrapped as an AdaptedModel with every adapter of `adapters` loaded for inference (all alike:
    resident slots where the method allows); none given: the bare base, wrapped."""
    adapted = AdaptedModel(model)
    for name, path in adapters.items():
        adapted.load_adapter(path, name)
    adapted.eval_mode_frozen()
    return adapted.eval()
