"""`nora generate`: images from a diffusers pipeline, with or without a DreamBooth adapter, as one PNG grid (and,
with --image-dir, one PNG per image); or, from a causal language model (a directory, hub id or .gguf file) with or
without an adapter, each prompt's greedy continuation on stdout."""

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
        str | None,
        typer.Option(help="A pipeline, or a causal LM (directory, hub id or .gguf file); default: the adapter's base."),
    ] = None,
    adapter: Annotated[
        Path | None, typer.Option(help="A nora adapter: trained with --task dreambooth, or on a causal LM.")
    ] = None,
    gguf_file: Annotated[str | None, typer.Option(help="Load this GGUF file from the base (dequantised).")] = None,
    num_images: Annotated[int, typer.Option(min=1, help="Images per prompt.")] = 4,
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps.")] = 25,
    guidance: Annotated[float, typer.Option(min=0.0, help="Classifier-free guidance scale (≤ 1: none).")] = 7.5,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the starting noise (same seed, same images).")] = 0,
    size: Annotated[int | None, typer.Option(min=8, help="Image side in pixels (default: the UNet's).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="A causal LM's longest continuation, in tokens.")] = 32,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="The PNG grid (default grid.png): one row per prompt.")
    ] = None,
    image_dir: Annotated[Path | None, typer.Option(help="Also write each image here as a PNG.")] = None,
    merge: Annotated[bool, typer.Option(help="Fold the adapter into the weights before sampling.")] = True,
    dtype: Annotated[str, typer.Option(help="auto (float32 on CPU, float16 on CUDA), float32, bfloat16, float16.")] = (
        "auto"
    ),
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:1, ...")] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch (default: torch's choice).")] = None,
) -> None:
    """Sample --num-images images for each --prompt and write them as a grid; or print a causal LM's continuation
    of each --prompt."""
    import torch

    from ..atomic import atomic_write_bytes
    from ..diffusion import check_pipeline, grid, sample
    from ..evaluation.loading import RECORDED_BASE, adapted_pipeline, resolve_target
    from ..pretrained import check_model_source, check_threads, parse_dtype, resolve_device
    from .preflight import check_writable

    try:
        check_threads(threads)
        if threads is not None:
            torch.set_num_threads(threads)
        prompts = [p for p in prompt if p.strip()]
        if len(prompts) != len(prompt):
            raise AdapterError('--prompt "": every prompt needs words, e.g. --prompt "a photo of sks dog".')
        if adapter is None and base is None:
            raise AdapterError("nothing to sample from: pass --base MODEL, --adapter DIR, or both.")
        if adapter is not None and not (adapter / "adapter_config.json").is_file():
            raise AdapterError(f"--adapter {adapter}: no such adapter directory (it holds adapter_config.json); check "
                               "the path.")  # fmt: skip
        target = resolve_target(str(adapter), None, base) if adapter is not None else resolve_target(base)
        if not _is_pipeline(target.base, gguf_file, "--base" if base or not adapter else RECORDED_BASE):
            if output is not None or image_dir is not None:
                raise AdapterError("--output and --image-dir hold a pipeline's images; a language model's text is "
                                   "printed (redirect it to keep it).")  # fmt: skip
            check_model_source(target.base, gguf_file, "--base" if base or not adapter else RECORDED_BASE)
            for text in _continue(target, prompts, max_new_tokens, dtype, device, merge, gguf_file):
                typer.echo(text)
            return
        output = output or Path("grid.png")
        if output.suffix.lower() != ".png" or output.is_dir():
            raise AdapterError(f"--output {output}: give a .png file path, e.g. --output grid.png.")
        if image_dir is not None and image_dir.exists() and not image_dir.is_dir():
            raise AdapterError(f"--image-dir {image_dir} is a file; give a directory.")
        check_writable(output, "--output")
        if image_dir is not None:
            check_writable(image_dir / "000-000.png", "--image-dir")
        check_pipeline(target.base)
        resolved = resolve_device(device)
        torch_dtype = parse_dtype(dtype) or (torch.float16 if resolved.type == "cuda" else None)  # None: as saved
        pipe = adapted_pipeline(target.base, adapter, torch_dtype, resolved, merge)
        images = sample(pipe, prompts, num_images, steps, guidance, seed, size)
    except (AdapterError, OSError) as e:
        raise typer.BadParameter(str(e)) from e
    try:  # each file whole or not at all: an earlier grid or image stays as it was
        for i, image in enumerate(images if image_dir is not None else []):
            atomic_write_bytes(_png(image), image_dir / f"{i // num_images:03d}-{i % num_images:03d}.png")
        atomic_write_bytes(_png(grid(images, columns=num_images)), output)
    except OSError as e:  # checked writable at the start: the disk filled up, or the folder changed since
        raise typer.BadParameter(f"the images could not be written ({e}); files written before stay whole. Free "
                                 "some space (or fix the folder) and run it again.") from e  # fmt: skip
    typer.echo(f"{len(images)} images of {len(prompts)} prompt(s) -> {output}")


def _is_pipeline(base: str, gguf_file: str | None, flag: str) -> bool:
    """Whether `base` is a diffusers pipeline (model_index.json) rather than a transformers model; a hub id found
    in neither form in the local cache is taken for a pipeline where the hub can be reached, else refused."""
    from ..pretrained import check_model_source, is_gguf, looks_local

    local = Path(base).expanduser()
    if gguf_file or is_gguf(base) or local.exists() or looks_local(base):
        return (local / "model_index.json").is_file()
    from huggingface_hub import try_to_load_from_cache

    cached = {name: isinstance(try_to_load_from_cache(base, name), str) for name in ("model_index.json", "config.json")}
    if not any(cached.values()):
        check_model_source(base, gguf_file, flag)  # not cached: refused, saying how to get it, unless the hub answers
    return cached["model_index.json"] or not cached["config.json"]


def _continue(target, prompts, max_new_tokens, dtype, device, merge, gguf_file) -> list[str]:
    """Each prompt followed by the model's greedy continuation (the adapter folded in unless not `merge`)."""
    from ..evaluation.generation import generate_responses
    from ..evaluation.loading import load_for_eval
    from ..tasks import task_kind
    from ..tasks.registry import DEFAULT_TASK

    model, tokenizer = load_for_eval(target, task_kind(DEFAULT_TASK), None, dtype, device, merge, gguf_file)
    texts = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    return [prompt + text for prompt, text in zip(prompts, texts, strict=True)]


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
