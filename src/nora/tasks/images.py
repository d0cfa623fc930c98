"""What the kinds that read images share: the options that size and bound their images, and their checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import AdapterError
from .base import OptionRow, TaskOptions, at_least_one

if TYPE_CHECKING:
    from ..training.config import TrainConfig


@dataclass
class ImageOptions(TaskOptions):
    image_size: int | None = None  # stated transforms (resize, crop) for a model without an image processor
    max_image_pixels: int | None = None  # larger images are refused (None: Pillow's limit)

    free_on_resume = ("max_image_pixels",)


IMAGE_ROWS = (
    OptionRow(
        "image_size", int, "image-cls/dreambooth: resize and centre-crop to N (image-cls: models with no processor)."
    ),
    OptionRow(
        "max_image_pixels",
        int,
        "image-cls/dreambooth: refuse larger images (default 89,478,485: Pillow's decompression-bomb guard).",
    ),
)


def check_image_options(config: TrainConfig) -> None:
    at_least_one(config.options, ("image_size", "max_image_pixels"))
    if config.group_by_length:
        raise AdapterError("group_by_length batches texts by token count; images have no length: leave it off.")
