"""Subject-driven generation with diffusers pipelines (`nora train --task dreambooth`, `nora generate`).

A Stable-Diffusion-style pipeline directory (model_index.json with a UNet, a VAE, a CLIP text encoder, its
tokenizer and a scheduler) is trained as one module, `DreamBoothModel`: its forward takes images and prompt tokens
and returns each example's noise-prediction loss (the VAE encodes the images, noise is added at a random timestep
of the pipeline's DDPM schedule, the UNet predicts the noise, or the velocity for v-prediction models). Adapters go
on the UNet's attention and, optionally, the text encoder's; the VAE stays frozen. Module names are those of the
pipeline's components under `unet.` and `text_encoder.`, the prefixes diffusers' LoRA files use, so an adapter
exports to `pytorch_lora_weights.safetensors` for `pipeline.load_lora_weights` (nora.export.export_diffusers_lora).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterError
from .imagefiles import IMAGE_SUFFIXES, StatedTransforms, images_in

# The attention projections DreamBooth-LoRA adapts (diffusers' train_dreambooth_lora.py): the UNet's, and with
# --train-text-encoder the CLIP text encoder's. Anchored on the component, since the VAE's attention uses the same
# names.
UNET_TARGETS = r"unet\..*\.(to_q|to_k|to_v|to_out\.0)"
TEXT_ENCODER_TARGETS = r"text_encoder\..*\.(q_proj|k_proj|v_proj|out_proj)"


def _component_config(path: str, name: str) -> dict[str, Any]:
    """`name` (model_index.json, or a component's config.json) of a pipeline directory or hub id."""
    local = Path(path).expanduser() / name
    if local.is_file():
        return json.loads(local.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(path, name)).read_text())


def check_pipeline(path: str | None) -> None:
    """Refuse, before anything loads, what is not a UNet text-to-image pipeline (a local directory, or a hub id
    that is cached or reachable)."""
    from .pretrained import looks_local

    root = Path(path or "").expanduser()
    if path is None or (looks_local(path) and not root.is_dir()):
        raise AdapterError(f"--model {path}: no such pipeline directory. Check the path (relative to {Path.cwd()}).")
    if root.is_dir() and not (root / "model_index.json").is_file():
        raise AdapterError(
            f"--model {path} holds no model_index.json: --task dreambooth trains a diffusers pipeline directory "
            "(pipeline.save_pretrained(DIR), or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5)."
        )
    try:
        parts = _component_config(path, "model_index.json")
    except OSError as e:
        raise AdapterError(f"--model {path}: cannot read its model_index.json ({e}); download it first.") from e
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not parts.get(c, [None])[0]]
    if missing:
        raise AdapterError(
            f"--model {path} is a {parts.get('_class_name', 'pipeline')} without {missing}: DreamBooth here trains "
            "UNet pipelines with one CLIP text encoder (Stable Diffusion 1.x/2.x style)."
        )


def load_pipeline(path: str, dtype: torch.dtype | None = None):
    """The pipeline in `path` (a directory or a hub id), without a safety checker (nothing here shows images to
    anyone; generated class images and grids are files the user asked for)."""
    from diffusers import DiffusionPipeline

    has_checker = "safety_checker" in _component_config(path, "model_index.json")
    kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False} if has_checker else {}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def resolution(unet_config: Any, vae_config: Any) -> int:
    """The image size the UNet was trained at: its latent size times the VAE's downsampling."""
    return int(unet_config["sample_size"]) * 2 ** (len(vae_config["block_out_channels"]) - 1)


class DreamBoothModel(nn.Module):
    """A pipeline's UNet, text encoder and VAE as one module whose forward is the DreamBooth training loss per
    example. `pipeline` shares these modules, so an adapter injected here is what `pipeline(...)` samples with."""

    def __init__(self, pipeline) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        self.unet, self.text_encoder, self.vae = pipeline.unet, pipeline.text_encoder, pipeline.vae
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise AdapterError(
                f"the pipeline's scheduler predicts {self.prediction_type!r}; DreamBooth here trains epsilon- or "
                "v-prediction UNets."
            )
        self.pipeline = pipeline  # not an nn.Module, so not a submodule: its modules are registered above
        self.config = pipeline.unet.config  # what model-wide code reads (name_or_path, dtype checks)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None) -> DreamBoothModel:
        return cls(load_pipeline(path, dtype))

    def encode_prompts(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[0]

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            pixels = pixel_values.to(self.vae.device, self.vae.dtype)
            latents = self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (latents.shape[0],), device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        pred = self.unet(noisy, t, self.encode_prompts(input_ids)).sample
        target = noise if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, t)
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


class DreamBoothProcessor:
    """Images → pixels in [-1, 1] at the training resolution (resize the short side, centre crop), prompts →
    the tokenizer's padded ids, as the pipeline's text encoder reads them."""

    def __init__(self, tokenizer, resolution: int) -> None:
        self.tokenizer, self.resolution = tokenizer, resolution
        self.pad_token_id = tokenizer.pad_token_id

    @classmethod
    def from_pretrained(cls, path: str, size: int | None) -> DreamBoothProcessor:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        if size is None:
            size = resolution(*(_component_config(path, f"{c}/config.json") for c in ("unet", "vae")))
        return cls(tokenizer, size)

    def save_pretrained(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(directory)  # what the run's prompts were encoded with, beside the adapter

    def pixels(self, image) -> torch.Tensor:
        half = (0.5, 0.5, 0.5)
        return StatedTransforms(self.resolution, half, half)([image])["pixel_values"][0]

    def ids(self, prompt: str) -> torch.Tensor:
        length = self.tokenizer.model_max_length
        return self.tokenizer(prompt, padding="max_length", max_length=length, truncation=True,
                              return_tensors="pt").input_ids[0]  # fmt: skip


def image_files(folder: str, what: str, empty_ok: bool = False) -> list[Path]:
    """The images directly in `folder`, sorted by name."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise AdapterError(f"{what} {folder}: no such directory; it should hold the images (.jpg, .png, ...).")
    files = images_in(root)
    if not files and not empty_ok:
        raise AdapterError(f"{what} {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); put the images in it.")
    return files


@torch.no_grad()
def sample(pipe, prompts: list[str], per_prompt: int = 1, steps: int = 25, guidance: float = 7.5, seed: int = 0,
           size: int | None = None, output_type: str = "pil") -> Any:  # fmt: skip
    """`per_prompt` images for each prompt, from one seeded generator (the same call gives the same images)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    size = size or resolution(pipe.unet.config, pipe.vae.config)
    return pipe(prompts, num_images_per_prompt=per_prompt, num_inference_steps=steps, guidance_scale=guidance,
                generator=generator, height=size, width=size, output_type=output_type).images  # fmt: skip


def grid(images: list, columns: int):
    """The images tiled row by row, `columns` per row."""
    from PIL import Image

    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    canvas = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        canvas.paste(image, ((i % columns) * w, (i // columns) * h))
    return canvas


def class_images(model: str, folder: str, prompt: str, count: int, seed: int, generate: bool = False) -> list[Path]:
    """Prior preservation's class images: the first `count` of `folder`, which is first filled up to `count` with
    images of `prompt` sampled from the base pipeline (as DreamBooth makes them; existing images are kept, each
    new file is written whole or not at all). A `folder` that does not exist is refused (a mistyped path would
    otherwise be filled with sampled images) unless `generate` asks for it to be made."""
    import io
    import os

    from .atomic import atomic_write_bytes

    root = Path(folder).expanduser()
    if not root.exists() and not generate:
        raise AdapterError(
            f"--class-data {folder}: no such directory (relative to {Path.cwd()}). Give the folder of class images, "
            f"or pass --generate-class-images to have the base pipeline sample {count} images of {prompt!r} into it."
        )
    have = image_files(folder, "--class-data", empty_ok=True) if root.exists() else []
    missing = count - len(have)
    if missing <= 0:
        return have[:count]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise AdapterError(
            f"--class-data {folder} has {len(have)} of --num-class-images {count} images; several processes would "
            f"each sample the missing ones. Make them first with one process: nora generate --base {model} "
            f'--prompt "{prompt}" --num-images {missing} --image-dir {folder}'
        )
    pipe = load_pipeline(model)
    if torch.cuda.is_available():
        pipe.to("cuda")
    for i in range(len(have), count):
        (image,) = sample(pipe, [prompt], seed=seed + i)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        atomic_write_bytes(buffer.getvalue(), root / f"class-{i:05d}.png")
    return image_files(folder, "--class-data")[:count]
