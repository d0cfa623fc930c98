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
from ..io import open_adapter
from ..model import AdaptedModel
from ..peft_import import read_peft_lora
from ..pretrained import (
    is_gguf,
    load_model,
    load_tokenizer,
    model_config,
    name_labels,
    parse_dtype,
    require_package,
    resolve_device,
)
from ..state import layer_module
from .tasks import Head

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


def check_base_fits(target: EvalTarget, task_kind: str, num_labels: int | None, gguf_file: str | None) -> None:
    """Refuse, before any weight is loaded, a base the adapter cannot go on: another architecture (its config.json
    built as a model on the meta device lacks the adapter's layers, or has them in other sizes), or, for an adapter
    trained on a quantized base, a machine without bitsandbytes (its basis is checked against the quantized
    weights)."""
    if target.adapter is None:
        return
    if target.trained_quantized:
        require_package("bitsandbytes", "quant", f"{target.adapter}, trained on a {target.trained_quantized} base,")
    if not target.layer_shapes or gguf_file or is_gguf(target.base):
        return
    config = model_config(target.base)
    if config is None:
        return  # loading says what is wrong with it
    if num_labels is not None and task_kind != "causal":
        config.num_labels = num_labels
    auto = {"causal": "AutoModelForCausalLM", "seq-cls": "AutoModelForSequenceClassification",
            "image-cls": "AutoModelForImageClassification"}[task_kind]  # fmt: skip
    import transformers

    recorded = _adapter_config(target.adapter).get("base_model_name_or_path")
    try:
        with torch.device("meta"):
            skeleton = getattr(transformers, auto).from_config(config)
    except ValueError as e:
        raise AdapterError(
            f"{target.base} is a {config.model_type} model, which has no {task_kind} model class in transformers "
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
    where = target.adapter / ADAPTER_CONFIG
    task, labels = (head.get("task"), head.get("labels", [])) if isinstance(head, dict) else (None, None)
    valid_labels = (
        isinstance(labels, list) and all(isinstance(x, str) for x in labels) and len(set(labels)) == len(labels)
    )
    if (
        task not in ("seq-cls", "regression", "image-cls")
        or not valid_labels
        or (task != "regression" and len(labels) < 2)
    ):
        raise AdapterError(
            f"{where}: the head it records ({str(head)[:120]}) is not a task (seq-cls, regression, image-cls) with a "
            "label set of distinct names; the file was edited or damaged: save the adapter again."
        )
    template = head.get("template")
    if template is not None and (not isinstance(template, str) or "{}" not in template):
        raise AdapterError(
            f"{where}: the head's class prompt template {template!r} has no {{}}; save the adapter again."
        )
    return Head(task, tuple(labels), template)


def load_for_eval(
    target: EvalTarget,
    task_kind: Literal["causal", "seq-cls", "image-cls"] = "causal",
    num_labels: int | None = None,
    dtype: str = "auto",
    device: str = "auto",
    merge: bool = True,
    gguf_file: str | None = None,
) -> tuple[nn.Module, Any]:
    """The model on `device` in eval mode (its adapter merged unless `merge=False`) and its tokenizer, or for an
    image classifier its image processor (the adapter directory's when it holds one, else the base's)."""
    resolved = resolve_device(device)
    torch_dtype = parse_dtype(dtype) or (torch.bfloat16 if resolved.type == "cuda" else torch.float32)
    head = adapter_head(target)
    if head is None or head.template is None:
        check_base_fits(target, task_kind, num_labels, gguf_file)
    if task_kind == "image-cls" and head is not None and head.template is not None:
        from ..clip import ClipClassifier

        model = ClipClassifier.from_pretrained(target.base, list(head.labels), head.template, dtype=torch_dtype)
    else:
        model = load_model(target.base, task_kind, dtype=torch_dtype, num_labels=num_labels, gguf_file=gguf_file)
    if head is not None and head.template is None and getattr(model, "config", None) is not None:
        if head.task == "regression":
            model.config.problem_type = "regression"
        else:
            name_labels(model, head.labels)
    model = _with_adapter(model.to(resolved), target, merge)
    if task_kind == "image-cls":
        from ..imagefiles import TRANSFORMS_FILE, load_image_processor

        saved = target.adapter and any(
            (target.adapter / f).is_file() for f in ("preprocessor_config.json", TRANSFORMS_FILE)
        )
        tokenizer = load_image_processor(str(target.adapter) if saved else target.base, None)
    else:
        tokenizer = eval_tokenizer(target, gguf_file)
    return model.eval(), tokenizer


def eval_tokenizer(target: EvalTarget, gguf_file: str | None = None) -> Any:
    """The tokenizer an adapter was saved with, else the base model's."""
    if target.adapter and (target.adapter / "tokenizer_config.json").is_file():
        return load_tokenizer(target.adapter)
    return load_tokenizer(target.base, gguf_file)


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
