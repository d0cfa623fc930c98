"""Loading base models and tokenizers (a Hugging Face id or a local directory, optionally a GGUF file in it): the
one place `nora train`, `nora eval` and `nora serve` get them from."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .errors import AdapterError

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
    return torch.device(device)


def parse_dtype(dtype: str) -> torch.dtype | None:
    """A --dtype value → a torch dtype, or None for "auto"."""
    if dtype not in DTYPES:
        raise AdapterError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}.")
    return DTYPES[dtype]


def load_model(
    name: str,
    task: Literal["causal", "seq-cls"] = "causal",
    *,
    dtype: torch.dtype | Literal["auto"] | None = None,
    num_labels: int | None = None,
    gguf_file: str | None = None,
) -> nn.Module:
    """The pretrained causal LM or sequence classifier at `name`. `dtype`: a torch dtype, "auto" (the checkpoint's)
    or None (float32). A GGUF file is dequantised to float, so the model trains, merges and saves like any other."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if task == "seq-cls":
        model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=num_labels, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if gguf_file:  # no longer quantized, whatever the loader recorded
        model.hf_quantizer = None
        model.config.quantization_config = None
    return model


def load_tokenizer(name: str | Path, gguf_file: str | None = None, chat_template: Path | None = None) -> Any:
    """The tokenizer at `name` (read from the GGUF file when one is given)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name, **({"gguf_file": gguf_file} if gguf_file else {}))
    if chat_template is not None:
        tokenizer.chat_template = Path(chat_template).read_text()
    return tokenizer
