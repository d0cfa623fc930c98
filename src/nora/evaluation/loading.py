"""What `nora eval` evaluates: a base or merged model, or a base model with a nora or PEFT adapter on it.

`MODEL` may be a model directory (or Hugging Face id), or an adapter directory: then the base is `--base`, else the
`base_model_name_or_path` the adapter recorded. `--adapter DIR` puts an adapter on `MODEL`. Every adapter, nora's
or PEFT's, is read by AdaptedModel.load_adapter (nora.io, nora.peft_import), which checks its files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import AdapterError
from ..file_check import layer_module
from ..io import open_adapter
from ..model import AdaptedModel
from ..peft_import import read_peft_lora
from ..pretrained import is_gguf, model_config, parse_dtype, require_package, resolve_device
from ..tasks import Head, TaskKind, read_head, task_kind
from ..tasks.base import saved_tokenizer
from ..tasks.registry import DEFAULT_TASK

ADAPTER_CONFIG = "adapter_config.json"
RECORDED_BASE = "the base model the adapter records (pass --base for another)"  # how errors name it


@dataclass(frozen=True)
class EvalTarget:
    base: str
    adapter: Path | None
    adapter_kind: Literal["nora", "peft"] | None
    layer_shapes: dict[str, list[int]] = field(default_factory=dict)  # the adapter's layers: [out, in] each
    trained_quantized: str | None = None  # the quantization of the base a nora adapter was trained on


def resolve_target(model: str, adapter: str | Path | None = None, base: str | None = None) -> EvalTarget:
    """Decide which base model to load and which adapter (if any) to put on it."""
    if (Path(model) / ADAPTER_CONFIG).is_file():
        if adapter is not None:
            raise AdapterError(f"{model} is an adapter directory; pass the base model as --base, not MODEL.")
        adapter = Path(model)
        base = base or recorded_base(adapter)
    elif base is not None:
        raise AdapterError("--base is only for an adapter directory given as MODEL; use --adapter to add one.")
    else:
        base = model
    if adapter is None:
        return EvalTarget(base, None, None)
    adapter = Path(adapter)
    if not adapter.is_dir():
        raise AdapterError(f"--adapter {adapter}: no such directory; check the path.")
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise AdapterError(f"{adapter} has no {ADAPTER_CONFIG}: not an adapter directory.")
    # a damaged file, or one nora cannot import, is refused now, before any model is loaded
    if "peft_type" in _adapter_config(adapter):
        peft = read_peft_lora(adapter)
        shapes = {n: [peft.tensors[f"{n}.lora_B"].shape[0], peft.tensors[f"{n}.lora_A"].shape[1]] for n in peft.layers}
        return EvalTarget(base, adapter, "peft", shapes)
    layers = open_adapter(adapter).meta["layers"]
    shapes = {n: info["shape"] for n, info in layers.items() if isinstance(info.get("shape"), list)}
    schemes = {info["quant"].get("scheme") for info in layers.values() if isinstance(info.get("quant"), dict)}
    return EvalTarget(base, adapter, "nora", shapes, ", ".join(sorted(map(str, schemes))) or None)


def check_base_fits(
    target: EvalTarget, kind: TaskKind, head: Head | None, num_labels: int | None, gguf_file: str | None
) -> None:
    """Refuse, before any weight is loaded, a base the adapter cannot go on: another architecture (its config.json
    built as a model on the meta device lacks the adapter's layers, or has them in other sizes), or, for an adapter
    trained on a quantized base, a machine without bitsandbytes (its basis is checked against the quantized
    weights)."""
    auto = kind.rebuilt_class(head)
    if target.adapter is None or auto is None:
        return
    if target.trained_quantized:
        require_package("bitsandbytes", "quant", f"{target.adapter}, trained on a {target.trained_quantized} base,")
    if not target.layer_shapes or gguf_file or is_gguf(target.base):
        return
    config = model_config(target.base)
    if config is None:
        return  # loading says what is wrong with it
    if num_labels is not None:
        config.num_labels = num_labels
    import transformers

    recorded = _adapter_config(target.adapter).get("base_model_name_or_path")
    try:
        with torch.device("meta"):
            skeleton = getattr(transformers, auto).from_config(config)
    except ValueError as e:
        raise AdapterError(
            f"{target.base} is a {config.model_type} model, which has no {kind.model_kind} model class in transformers "
            f"({auto}); the adapter {target.adapter} was made for {recorded}: give a base of that architecture."
        ) from e
    for lname, shape in target.layer_shapes.items():
        layer_module(skeleton, lname, shape, recorded, target.adapter)


def recorded_base(adapter: Path) -> str:
    """The base model an adapter directory records (`base_model_name_or_path`: a directory, a hub id or a .gguf
    file)."""
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise AdapterError(f"{adapter} has no {ADAPTER_CONFIG}: not an adapter directory.")
    base = _adapter_config(adapter).get("base_model_name_or_path")
    if not base or not isinstance(base, str):
        raise AdapterError(f"{adapter} records no base model; pass it with --base.")
    return base


def adapter_head(target: EvalTarget) -> Head | None:
    """The head a nora adapter records (`nora train --task seq-cls / regression` writes it): its label set, or
    regression. None for a base model, a PEFT adapter, or an adapter that trained no head."""
    if target.adapter is None or target.adapter_kind != "nora":
        return None
    config = _adapter_config(target.adapter)
    head = (config.get("nora") or {}).get("head") if isinstance(config.get("nora"), dict) else None
    if head is None:
        return None
    return read_head(head, target.adapter / ADAPTER_CONFIG)


def load_for_eval(
    target: EvalTarget,
    kind: TaskKind | None = None,
    num_labels: int | None = None,
    dtype: str = "auto",
    device: str = "auto",
    merge: bool = True,
    gguf_file: str | None = None,
) -> tuple[nn.Module, Any]:
    """The model on `device` in eval mode (its adapter merged unless `merge=False`) and what turns inputs into its
    inputs (a tokenizer; an image classifier's image processor). `kind` rebuilds the model (default: the kind of the
    head the adapter records, else a causal LM)."""
    resolved = resolve_device(device)
    torch_dtype = parse_dtype(dtype) or (torch.bfloat16 if resolved.type == "cuda" else torch.float32)
    head = adapter_head(target)
    kind = kind or (head.kind if head is not None else task_kind(DEFAULT_TASK))
    check_base_fits(target, kind, head, num_labels, gguf_file)
    model = kind.rebuild_model(head, target.base, torch_dtype, num_labels, gguf_file)
    model = _with_adapter(model.to(resolved), target, merge)
    return model.eval(), kind.load_eval_processor(target.adapter, target.base, gguf_file)


def eval_tokenizer(target: EvalTarget, gguf_file: str | None = None) -> Any:
    """The tokenizer an adapter was saved with, else the base model's."""
    return saved_tokenizer(target.adapter, target.base, gguf_file)


def adapted_pipeline(base: str, adapter: str | Path | None = None, dtype: torch.dtype | None = None,
                     device: torch.device | str = "cpu", merge: bool = True):  # fmt: skip
    """The pipeline in `base` on `device`, with the nora adapter saved in `adapter` on its UNet (and text encoder)
    — folded into the weights when `merge`, else kept as adapter layers."""
    from ..diffusion import DreamBoothModel

    model = DreamBoothModel.from_pretrained(base, dtype)
    if adapter is not None:
        adapted = AdaptedModel.from_pretrained(model, adapter)  # wraps the pipeline's own modules in place
        if merge:
            adapted.merge_and_unload()
        else:
            model.pipeline.nora_adapter = adapted  # the adapter's state lives as long as the pipeline
    model.pipeline.to(device)
    return model.pipeline


def _with_adapter(model: nn.Module, target: EvalTarget, merge: bool) -> nn.Module:
    """`model` with the target's adapter, nora's or PEFT's, read through nora's checked loader (nora.io)."""
    if target.adapter is None:
        return model
    adapted = AdaptedModel.from_pretrained(model, target.adapter)
    return adapted.merge_and_unload() if merge else adapted


def _adapter_config(adapter: Path) -> dict[str, Any]:
    try:
        config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{adapter / ADAPTER_CONFIG} cannot be read ({e}); save the adapter again.") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{adapter / ADAPTER_CONFIG} is not a JSON object; save the adapter again.")
    return config
