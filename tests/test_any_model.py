"""Beyond language models: CLIP and diffusion UNet / DiT models built from configs."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_float_close

import nora


def _clip():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
    )
    vision = dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4
    )
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {
        "input_ids": torch.randint(0, 64, (2, 7), generator=g),
        "pixel_values": torch.randn(2, 3, 16, 16, generator=g),
    }
    return model, inputs, lambda out: out.logits_per_image


def _unet():
    diffusers = pytest.importorskip("diffusers", reason="diffusers is in the dev extra; install it to test UNets")
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {
        "sample": torch.randn(2, 4, 8, 8, generator=g),
        "timestep": torch.tensor([3, 7]),
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=g),
    }
    return model, inputs, lambda out: out.sample


def _dit():
    diffusers = pytest.importorskip("diffusers", reason="diffusers is in the dev extra; install it to test DiTs")
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=8,
    ).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=g),
        "timestep": torch.tensor([3, 7]),
        "class_labels": torch.tensor([1, 2]),
    }
    return model, inputs, lambda out: out.sample


@pytest.mark.parametrize("build", [_clip, _unet, _dit], ids=["clip", "unet", "dit"])
@pytest.mark.parametrize(
    "config", [lambda: nora.NoraConfig(r=0.5, inner_r=2), lambda: nora.SVFitConfig(r=4)], ids=["nora", "svfit"]
)
def test_adapt_merge_save_load(build, config, tmp_path):
    model, inputs, read = build()
    with torch.no_grad():
        ref = read(model(**inputs))
    adapted = nora.get_peft_model(model, config())
    assert len(adapted.layers()) >= 8
    with torch.no_grad():
        assert_float_close(read(adapted(**inputs)), ref)
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.05)
        out = read(adapted(**inputs))
        assert not torch.allclose(out, ref, atol=1e-4)
        adapted.save_pretrained(tmp_path)
        fresh_model = build()[0]
        fresh = nora.AdaptedModel.from_pretrained(fresh_model, tmp_path)
        torch.testing.assert_close(read(fresh(**inputs)), out)
        adapted.merge()
        torch.testing.assert_close(read(adapted(**inputs)), out, rtol=1e-4, atol=1e-5)
