"""DreamBooth: subject-driven generation (nora.diffusion). --data is a folder of the subject's images, each captioned
--instance-prompt; with --class-data and --class-prompt, prior preservation adds class images (sampled from the
base pipeline up to --num-class-images where the folder has fewer; a folder that does not exist only with
--generate-class-images), their loss weighted --prior-loss-weight. The loss is the noise-prediction mean squared
error per image; the run counts images."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..errors import AdapterError
from .base import Batch, Example, Loss, OptionRow, TaskKind
from .data import Encoded
from .images import IMAGE_ROWS, ImageOptions, check_image_options

if TYPE_CHECKING:
    from ..training.config import TrainConfig


@dataclass
class DreamBoothOptions(ImageOptions):
    instance_prompt: str | None = None  # the prompt of --data's subject images ("a photo of sks dog")
    class_data: str | None = None  # prior preservation: class images (sampled up to num_class_images)
    class_prompt: str | None = None  # prior preservation: the class's prompt ("a photo of a dog")
    num_class_images: int = 100
    generate_class_images: bool = False  # a --class-data folder that does not exist is made and filled
    prior_loss_weight: float = 1.0
    train_text_encoder: bool = False  # adapters on the text encoder's attention too

    paths = ("class_data",)
    free_on_resume = ("max_image_pixels", "generate_class_images", "train_text_encoder")


class DreamBooth(TaskKind):
    name = "dreambooth"
    Options = DreamBoothOptions
    option_rows = (
        *IMAGE_ROWS,
        OptionRow("instance_prompt", str, 'dreambooth: the prompt of --data\'s images ("a photo of sks dog").'),
        OptionRow(
            "class_data",
            str,
            "dreambooth prior preservation: folder of class images (made only with --generate-class-images).",
        ),
        OptionRow("class_prompt", str, 'dreambooth prior preservation: "a photo of a dog".'),
        OptionRow(
            "num_class_images",
            int,
            "dreambooth: class images used; --class-data is filled up to N by the base pipeline.",
        ),
        OptionRow(
            "generate_class_images",
            bool,
            "dreambooth: make --class-data if it does not exist, and fill it with class images sampled.",
        ),
        OptionRow("prior_loss_weight", float, "dreambooth: weight of the class images' loss."),
        OptionRow("train_text_encoder", bool, "dreambooth: adapters on the text encoder too."),
    )
    model_class = "DiffusionPipeline"
    model_kind = "diffusion"
    reads_images = True
    counts = "images"

    def check_options(self, config: TrainConfig) -> None:
        check_image_options(config)
        options = _options(config)
        if not options.instance_prompt:
            raise AdapterError(
                "--task dreambooth needs --instance-prompt: the prompt that names the subject of --data's images, "
                'with a rare token for it (e.g. --instance-prompt "a photo of sks dog").'
            )
        if (options.class_data is None) != (options.class_prompt is None):
            raise AdapterError(
                "prior preservation takes --class-data DIR and --class-prompt together (e.g. --class-data "
                'class-images --class-prompt "a photo of a dog"); give both, or neither to train without it.'
            )
        if options.generate_class_images and options.class_data is None:
            raise AdapterError(
                "--generate-class-images samples prior preservation's class images into --class-data: give "
                '--class-data DIR and --class-prompt (e.g. "a photo of a dog") with it.'
            )
        weight = options.prior_loss_weight
        if options.num_class_images < 1 or not (math.isfinite(weight) and weight >= 0):
            raise AdapterError("num_class_images must be at least 1 and prior_loss_weight a number ≥ 0.")
        if config.eval_fraction:
            raise AdapterError("--task dreambooth trains on every subject image: leave --eval-fraction unset.")

    def default_adapter_fields(self, config: TrainConfig) -> dict[str, Any]:
        from ..diffusion import TEXT_ENCODER_TARGETS, UNET_TARGETS

        both = f"(?:{UNET_TARGETS})|(?:{TEXT_ENCODER_TARGETS})"
        return {"target_modules": both if _options(config).train_text_encoder else UNET_TARGETS}

    def check_model(self, config: TrainConfig) -> None:
        from ..diffusion import check_pipeline

        check_pipeline(config.model)

    def build_model(self, config: TrainConfig, labels: list[str] | None) -> nn.Module | None:
        from ..diffusion import DreamBoothModel

        return DreamBoothModel.from_pretrained(config.model)

    def rebuilt_class(self, head: Any) -> str | None:
        return None

    def rebuild_model(
        self, head: Any, base: str, dtype: torch.dtype, num_labels: int | None, gguf_file: str | None
    ) -> nn.Module:
        from ..diffusion import DreamBoothModel

        return DreamBoothModel.from_pretrained(base, dtype)

    def read_rows(self, config: TrainConfig, source: str, train: bool) -> list[dict[str, Any]]:
        from ..diffusion import class_images, image_files

        options = _options(config)
        files = image_files(source, "--data")
        rows = [{"image": str(p), "prompt": options.instance_prompt, "prior": False} for p in files]
        if train and options.class_data is not None:
            images = class_images(config.model, options.class_data, options.class_prompt, options.num_class_images,
                                  config.seed, options.generate_class_images)  # fmt: skip
            rows += [{"image": str(p), "prompt": options.class_prompt, "prior": True} for p in images]
        return rows

    def load_processor(self, config: TrainConfig) -> Any:
        from ..diffusion import DreamBoothProcessor

        return DreamBoothProcessor.from_pretrained(config.model, _options(config).image_size)

    def fit_processor(self, processor: Any, model: nn.Module) -> None:
        return None

    def encode(
        self, config: TrainConfig, processor: Any, rows: list[dict[str, Any]], source: str, labels: list[str] | None
    ) -> Encoded:
        from ..imagefiles import open_rgb

        options = _options(config)
        examples = [
            {"pixel_values": processor.pixels(open_rgb(r["image"], options.max_image_pixels)),
             "input_ids": processor.ids(r["prompt"]),
             "weight": options.prior_loss_weight if r["prior"] else 1.0}
            for r in rows
        ]  # fmt: skip
        return Encoded(examples)

    def collate(self, examples: list[Example], pad_id: int) -> Batch:
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "input_ids": torch.stack([e["input_ids"] for e in examples]),
            "weight": torch.tensor([e["weight"] for e in examples]),
        }

    def count_targets(self, batch: Batch) -> int:
        return batch["weight"].numel()

    def count_inputs(self, batch: Batch) -> int:
        return batch["weight"].numel()

    def loss(self, model: nn.Module, batch: Batch, num_items: int) -> Loss:
        per_image = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"])
        return Loss((per_image * batch["weight"]).sum() / num_items, per_image)


def _options(config: TrainConfig) -> DreamBoothOptions:
    return cast(DreamBoothOptions, config.options)
