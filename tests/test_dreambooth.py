"""`--task dreambooth` on a tiny Stable-Diffusion-style pipeline built from configs (UNet, VAE, CLIP text encoder,
a word-level tokenizer: nora.offline.tiny_stable_diffusion) and real CIFAR-10 dog photos: training lowers the
noise-prediction loss, the saved adapter reloads to identical latents, prior preservation samples its class images,
`nora generate` writes a PNG grid, and the diffusers-format export (`nora export`, export_diffusers_lora) loaded by
`pipeline.load_lora_weights` gives nora's latents."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import shared_path
from test_bad_input import refused
from typer.testing import CliRunner

import nora
from nora.cli import app
from nora.offline import tiny_stable_diffusion

diffusers = pytest.importorskip("diffusers", reason="diffusers is in the dev extra; install it to test DreamBooth")

PROMPT = "a photo of sks dog"
tiny_pipeline = tiny_stable_diffusion  # 16-pixel images, 8×8 latents


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory) -> Path:
    return tiny_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def dogs(tmp_path_factory) -> Path:
    """Four real photos of one dog class (CIFAR-10), as DreamBooth's instance folder."""
    source = shared_path("data", "vision", "cifar10", "train", "dog")
    out = tmp_path_factory.mktemp("instance") / "dog"
    out.mkdir()
    for image in sorted(source.glob("*.jpg"))[:4]:
        shutil.copy(image, out / image.name)
    return out


def latents(pipeline, prompts=(PROMPT,), seed: int = 0) -> torch.Tensor:
    from nora.diffusion import sample

    return sample(pipeline, list(prompts), steps=3, seed=seed, output_type="latent")


def seeded_loss(model, data: Path) -> float:
    """DreamBooth's loss on the instance images with fixed noise and timesteps: comparable across adapters."""
    from nora.diffusion import DreamBoothProcessor
    from nora.imagefiles import images_in, open_rgb

    processor = DreamBoothProcessor(model.pipeline.tokenizer, 16)
    pixels = torch.stack([processor.pixels(open_rgb(p)) for p in images_in(data)])
    ids = processor.ids(PROMPT).expand(len(pixels), -1)
    torch.manual_seed(123)
    with torch.no_grad():
        return torch.stack([model(pixels, ids) for _ in range(8)]).mean().item()


def invoke(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.mark.parametrize("text_encoder", [False, True], ids=["unet", "unet+text-encoder"])
def test_dreambooth_trains_reloads_and_generates(tmp_path, pipe_dir, dogs, text_encoder):
    from PIL import Image

    from nora.diffusion import DreamBoothModel, load_pipeline
    from nora.evaluation.loading import adapted_pipeline
    from nora.training import TrainConfig, train

    config = TrainConfig(model=str(pipe_dir), task="dreambooth", data=str(dogs), instance_prompt=PROMPT,
                         train_text_encoder=text_encoder, method="nora", adapter={"r": 16, "inner_r": 4},
                         max_steps=40, batch_size=4, learning_rate=1e-2, output_dir=str(tmp_path / "run"),
                         progress=False, plot=False, seed=0)  # fmt: skip
    result = train(config)
    assert result.summary["examples"] == 4 and result.summary["steps"] == 40
    base = DreamBoothModel.from_pretrained(str(pipe_dir))
    adapted = nora.AdaptedModel.from_pretrained(DreamBoothModel.from_pretrained(str(pipe_dir)), result.adapter_dir)
    layers = set(adapted.layers())
    assert any(n.startswith("unet.") for n in layers)
    assert any(n.startswith("text_encoder.") for n in layers) == text_encoder
    assert not any(n.startswith("vae.") for n in layers)
    assert seeded_loss(adapted.model, dogs) < 0.95 * seeded_loss(base, dogs)

    reloaded = latents(adapted_pipeline(str(pipe_dir), result.adapter_dir, merge=False))
    torch.testing.assert_close(reloaded, latents(adapted.model.pipeline), rtol=0, atol=0)  # save → load: identical
    torch.testing.assert_close(latents(adapted_pipeline(str(pipe_dir), result.adapter_dir)), reloaded)  # merged
    assert (reloaded - latents(base.pipeline)).abs().max() > 1e-3  # the adapter changes what is sampled

    invoke("export", result.adapter_dir, "-o", tmp_path / "diffusers")  # a pipeline's adapter: diffusers' format
    pipeline = load_pipeline(str(pipe_dir))
    pipeline.load_lora_weights(tmp_path / "diffusers")
    torch.testing.assert_close(latents(pipeline), reloaded, rtol=1e-4, atol=1e-4)

    grid, images = tmp_path / "grid.png", tmp_path / "images"
    out = invoke("generate", "--adapter", result.adapter_dir, "-p", PROMPT, "-p", "a photo of a dog on the beach",
                 "--num-images", 3, "--steps", 2, "-o", grid, "--image-dir", images)  # fmt: skip
    assert "6 images of 2 prompt(s)" in out
    assert Image.open(grid).size == (3 * 16, 2 * 16)
    assert sorted(p.name for p in images.iterdir()) == [f"{i:03d}-{j:03d}.png" for i in range(2) for j in range(3)]


def test_prior_preservation_samples_class_images_from_the_base(tmp_path, pipe_dir, dogs):
    classes = tmp_path / "class-images"
    classes.mkdir()
    shutil.copy(next(dogs.iterdir()), classes / "kept.jpg")  # one given; the base pipeline samples the other two
    out = invoke("train", "--model", pipe_dir, "--task", "dreambooth", "--data", dogs, "--instance-prompt", PROMPT,
           "--class-data", classes, "--class-prompt", "a photo of a dog", "--num-class-images", 3,
           "--prior-loss-weight", 0.5, "--max-steps", 2, "--batch-size", 7, "--rank", 8,
           "-o", tmp_path / "run", "--no-plot")  # fmt: skip
    assert sorted(p.name for p in classes.iterdir()) == ["class-00001.png", "class-00002.png", "kept.jpg"]
    assert "images/s" in out and "tokens/s" not in out  # the rate counts what the task counts
    import json

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["examples"] == 4 + 3


@pytest.mark.parametrize("method", ["nora", "lora", "pissa", "lora-xs", "svfit", "dora"])
def test_diffusers_export_loads_with_load_lora_weights_to_the_same_latents(tmp_path, pipe_dir, method):
    from nora.diffusion import TEXT_ENCODER_TARGETS, UNET_TARGETS, DreamBoothModel, load_pipeline

    targets = f"(?:{UNET_TARGETS})|(?:{TEXT_ENCODER_TARGETS})"
    config = nora.AdapterConfig.from_dict({"method": method, "r": 8, "target_modules": targets})
    adapted = nora.get_peft_model(DreamBoothModel.from_pretrained(str(pipe_dir)), config)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: every trainable tensor moved off its init
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p) * (p.abs().mean() + 0.1))
    ours = latents(adapted.model.pipeline, ["a photo of sks dog", "a cat"])
    nora.export_diffusers_lora(adapted, "default", tmp_path / "lora")
    pipeline = load_pipeline(str(pipe_dir))
    pipeline.load_lora_weights(tmp_path / "lora")
    theirs = latents(pipeline, ["a photo of sks dog", "a cat"])
    base = latents(load_pipeline(str(pipe_dir)), ["a photo of sks dog", "a cat"])
    assert (ours - base).abs().max() > 1e-2
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_dreambooth_bad_input_is_refused_with_the_fix(tmp_path, pipe_dir, dogs):
    run = ["train", "--model", pipe_dir, "--task", "dreambooth", "-o", tmp_path / "run"]
    refused([*run, "--data", dogs], "needs --instance-prompt", "sks dog")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused([*run, "--data", empty, "--instance-prompt", PROMPT], "holds no images", str(empty))
    broken = tmp_path / "broken"
    shutil.copytree(dogs, broken)
    (broken / "0002.jpg").write_bytes(b"not a jpeg")
    refused([*run, "--data", broken, "--instance-prompt", PROMPT], r"0002\.jpg: not a readable image", "replace")
    refused([*run, "--data", dogs, "--instance-prompt", PROMPT, "--class-data", empty], "--class-prompt")
    refused([*run[:2], tmp_path, *run[3:], "--data", dogs, "--instance-prompt", PROMPT], "no model_index.json")
    refused(["train", "--data", dogs, "--instance-prompt", PROMPT], "instance_prompt.*options of --task dreambooth")
    refused(["generate", "--base", pipe_dir, "-p", ""], "every prompt needs words")
    refused(["generate", "--base", pipe_dir, "-p", PROMPT, "-o", tmp_path / "grid.jpg"], r"\.png file")
    refused(["generate", "-p", PROMPT], "pass --base")


def test_an_adapter_refuses_a_pipeline_it_was_not_made_for(tmp_path, pipe_dir):
    from nora.diffusion import UNET_TARGETS, DreamBoothModel

    adapted = nora.get_peft_model(DreamBoothModel.from_pretrained(str(pipe_dir)),
                                  nora.NoraConfig(r=8, inner_r=2, target_modules=UNET_TARGETS))  # fmt: skip
    adapted.save_pretrained(tmp_path / "adapter")
    other = tiny_pipeline(tmp_path / "other", seed=1)
    refused(["generate", "--base", other, "--adapter", tmp_path / "adapter", "-p", PROMPT], "not made for|differ")
