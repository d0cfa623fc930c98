"""Image classification: one class per image (nora.imagefiles): an image folder or a path/label file, --shots K per
class, preprocessed by the model's image processor (or --image-size's stated transforms); top-1 and, with 10 or
more classes, top-5 accuracy. A CLIP model trains as a zero-shot classifier from --clip-template's prompts. The run
counts images where text tasks count tokens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..pretrained import name_labels
from .base import Batch, Example, Loss, OptionRow, TaskKind, at_least_one, two_classes
from .data import Encoded
from .images import IMAGE_ROWS, ImageOptions, check_image_options

if TYPE_CHECKING:
    from ..training.config import TrainConfig
    from .records import Head


@dataclass
class ImageClassificationOptions(ImageOptions):
    shots: int | None = None  # K seeded training images per class (the few-shot protocol)
    clip_template: str = "a photo of a {}."  # with a CLIP model: each class's prompt


class ImageClassification(TaskKind):
    name = "image-cls"
    Options = ImageClassificationOptions
    option_rows = (
        OptionRow("shots", int, "image-cls: K seeded training images per class (few-shot)."),
        OptionRow("clip_template", str, "image-cls with CLIP: each class's prompt, with {}."),
        *IMAGE_ROWS,
    )
    model_class = "AutoModelForImageClassification"
    model_kind = "image-cls"
    has_label_set = True
    reads_images = True
    counts = "images"
    adapter_defaults = {"modules_to_save": ["classifier", "head", "fc", "_fc"]}  # the head, as models name it

    def check_options(self, config: TrainConfig) -> None:
        at_least_one(config.options, ("shots",))
        check_image_options(config)

    def default_adapter_fields(self, config: TrainConfig) -> dict[str, Any]:
        from ..clip import is_clip

        if config.model is not None and is_clip(config.model):  # CLIP-LoRA's protocol: q/k/v of both encoders
            return {"target_modules": ["q_proj", "k_proj", "v_proj"]}
        return self.adapter_defaults

    def build_model(self, config: TrainConfig, labels: list[str] | None) -> nn.Module | None:
        from ..clip import ClipClassifier, is_clip

        if config.model is None or not is_clip(config.model):
            return None
        return ClipClassifier.from_pretrained(config.model, labels or [], _options(config).clip_template)

    def pretrained_kwargs(self, num_labels: int | None) -> dict[str, Any]:
        # a new label set replaces the checkpoint's head (e.g. ImageNet's 1,000 classes)
        return {"num_labels": num_labels, "ignore_mismatched_sizes": True}

    def label_model(self, model: nn.Module, labels: list[str] | None) -> None:
        name_labels(model, labels)

    def head_record(self, labels: list[str] | None, config: TrainConfig) -> dict[str, Any] | None:
        from ..clip import is_clip

        head = {"task": self.name, "labels": list(labels or [])}
        if config.model is not None and is_clip(config.model):
            head["template"] = _options(config).clip_template  # nora eval rebuilds the classifier from the prompts
        return head

    def rebuilt_class(self, head: Head | None) -> str | None:
        return None if head is not None and head.template is not None else self.model_class

    def rebuild_model(
        self, head: Head | None, base: str, dtype: torch.dtype, num_labels: int | None, gguf_file: str | None
    ) -> nn.Module:
        if head is None or head.template is None:
            return super().rebuild_model(head, base, dtype, num_labels, gguf_file)
        from ..clip import ClipClassifier

        return ClipClassifier.from_pretrained(base, list(head.labels), head.template, dtype=dtype)

    def load_eval_processor(self, adapter_dir: Path | None, base: str, gguf_file: str | None) -> Any:
        from ..imagefiles import TRANSFORMS_FILE, load_image_processor

        saved = adapter_dir is not None and any(
            (adapter_dir / f).is_file() for f in ("preprocessor_config.json", TRANSFORMS_FILE)
        )
        return load_image_processor(str(adapter_dir) if saved else base, None)

    def read_rows(self, config: TrainConfig, source: str, train: bool) -> list[dict[str, Any]]:
        from ..imagefiles import draw_shots, image_rows

        rows = image_rows(source)
        shots = _options(config).shots
        if train and shots is not None:
            rows = draw_shots(rows, shots, config.seed, source)
        return rows[: config.max_examples] if train and config.max_examples is not None else rows

    def load_processor(self, config: TrainConfig) -> Any:
        from ..imagefiles import load_image_processor

        return load_image_processor(config.model, _options(config).image_size)

    def fit_processor(self, processor: Any, model: nn.Module) -> None:
        return None

    def encode(
        self, config: TrainConfig, processor: Any, rows: list[dict[str, Any]], source: str, labels: list[str] | None
    ) -> Encoded:
        from ..imagefiles import encode_images

        label_set = list(labels) if labels is not None else sorted({r["label"] for r in rows})
        two_classes(label_set, source)
        examples = encode_images(rows, processor, label_set, source, _options(config).max_image_pixels)
        return Encoded(examples, labels=label_set)

    def collate(self, examples: list[Example], pad_id: int) -> Batch:
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["label"] for e in examples]),
        }

    def count_targets(self, batch: Batch) -> int:
        return batch["labels"].numel()

    def count_inputs(self, batch: Batch) -> int:
        return batch["labels"].numel()

    def loss(self, model: nn.Module, batch: Batch, num_items: int) -> Loss:
        from ..imagefiles import image_logits

        logits = image_logits(model, batch["pixel_values"])
        return Loss(F.cross_entropy(logits.float(), batch["labels"], reduction="sum") / num_items, logits)

    def eval_records(self, batch: Batch, output: Any) -> list[tuple[int, list[int]]]:
        top = output.float().topk(5 if output.shape[-1] >= 10 else 1, dim=-1).indices.tolist()  # top-5: ≥ 10 classes
        return list(zip(batch["labels"].tolist(), top, strict=True))

    def metrics(self, records: list[tuple[int, list[int]]]) -> dict[str, float]:
        scores = {"acc": sum(gold == top[0] for gold, top in records) / len(records)}
        if len(records[0][1]) >= 5:
            scores["top5_acc"] = sum(gold in top for gold, top in records) / len(records)
        return scores


def _options(config: TrainConfig) -> ImageClassificationOptions:
    return cast(ImageClassificationOptions, config.options)
