"""`nora generate`: images from a diffusers pipeline, with or without a DreamBooth adapter, as one PNG grid (and,
with --image-dir, one PNG per image)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated

import typer

from ..errors import AdapterError
from . import app


@app.command("generate")
def generate(
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="A prompt; repeat for several.")],
    base: Annotated[
        str | None, typer.Option(help="The pipeline: a directory or hub id (default: the adapter's recorded base).")
    ] = None,
    adapter: Annotated[Path | None, typer.Option(help="A nora adapter trained with --task dreambooth.")] = None,
    num_images: Annotated[int, typer.Option(min=1, help="Images per prompt.")] = 4,
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps.")] = 25,
    guidance: Annotated[float, typer.Option(min=0.0, help="Classifier-free guidance scale (≤ 1: none).")] = 7.5,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the starting noise (same seed, same images).")] = 0,
    size: Annotated[int | None, typer.Option(min=8, help="Image side in pixels (default: the UNet's).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="The PNG grid: one row per prompt.")] = Path(
        "grid.png"
    ),
    image_dir: Annotated[Path | None, typer.Option(help="Also write each image here as a PNG.")] = None,
    merge: Annotated[bool, typer.Option(help="Fold the adapter into the weights before sampling.")] = True,
    dtype: Annotated[str, typer.Option(help="auto (float32 on CPU, float16 on CUDA), float32, bfloat16, float16.")] = (
        "auto"
    ),
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:1, ...")] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch (default: torch's choice).")] = None,
) -> None:
    """Sample --num-images images for each --prompt and write them as a grid."""
    import torch

    from ..atomic import atomic_write_bytes
    from ..diffusion import check_pipeline, grid, sample
    from ..evaluation.loading import adapted_pipeline, resolve_target
    from ..pretrained import parse_dtype, resolve_device

    if threads is not None:
        torch.set_num_threads(threads)
    try:
        prompts = [p for p in prompt if p.strip()]
        if len(prompts) != len(prompt):
            raise AdapterError('--prompt "": every prompt needs words, e.g. --prompt "a photo of sks dog".')
        if output.suffix.lower() != ".png" or output.is_dir():
            raise AdapterError(f"--output {output}: give a .png file path, e.g. --output grid.png.")
        if image_dir is not None and image_dir.exists() and not image_dir.is_dir():
            raise AdapterError(f"--image-dir {image_dir} is a file; give a directory.")
        if adapter is not None:
            base = resolve_target(str(adapter), None, base).base
        elif base is None:
            raise AdapterError("nothing to sample from: pass --base PIPELINE, --adapter DIR, or both.")
        check_pipeline(base)
        resolved = resolve_device(device)
        torch_dtype = parse_dtype(dtype) or (torch.float16 if resolved.type == "cuda" else None)  # None: as saved
        pipe = adapted_pipeline(base, adapter, torch_dtype, resolved, merge)
        images = sample(pipe, prompts, num_images, steps, guidance, seed, size)
    except (AdapterError, OSError) as e:
        raise typer.BadParameter(str(e)) from e
    for i, image in enumerate(images if image_dir is not None else []):
        atomic_write_bytes(_png(image), image_dir / f"{i // num_images:03d}-{i % num_images:03d}.png")
    atomic_write_bytes(_png(grid(images, columns=num_images)), output)
    typer.echo(f"{len(images)} images of {len(prompts)} prompt(s) -> {output}")


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
