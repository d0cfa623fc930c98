"""Image-classification evaluation: a saved image classifier's top-1 (and, with ten or more classes, top-5)
accuracy on an image folder (or a path/label file), its labels read with the head's recorded label set."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from ..imagefiles import encode_images, image_logits, image_rows
from .loglik import inference
from .tasks import subsample


def evaluate_images(
    model: nn.Module,
    processor: Any,
    source: str,
    labels: list[str],
    batch_size: int = 32,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = False,
    max_pixels: int | None = None,
) -> dict[str, Any]:
    """Top-1 (and top-5 with ≥ 10 classes) accuracy of `model` on the images of `source`; `limit` draws that many
    with `seed`. A label outside `labels`, an unreadable image or one over `max_pixels` (None: Pillow's limit) is an
    error naming it."""
    start = time.perf_counter()
    rows = image_rows(source)
    rows = [rows[i] for i in subsample(len(rows), limit, seed)]
    examples = encode_images(rows, processor, labels, source, max_pixels)
    device = next(model.parameters()).device
    k = 5 if len(labels) >= 10 else 1
    top1 = topk = 0
    with inference(model, len(examples), "images", progress) as bar:
        for i in range(0, len(examples), batch_size):
            batch = examples[i : i + batch_size]
            pixels = torch.stack([e["pixel_values"] for e in batch]).to(device)
            top = image_logits(model, pixels).float().topk(k, dim=-1).indices.cpu()
            gold = torch.tensor([e["label"] for e in batch])
            top1 += int((top[:, 0] == gold).sum())
            topk += int((top == gold[:, None]).any(-1).sum())
            bar.update(len(batch))
    n = len(examples)
    metrics: dict[str, Any] = {"n": n, "correct": top1, "acc": top1 / n}
    if k == 5:
        metrics["top5_acc"] = topk / n
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    return metrics
