"""Standard PEFT LoRA directories loaded as nora adapters (nora.peft_import, through AdaptedModel.load_adapter and
so `nora serve --adapter`): PEFT's own outputs, per-layer rank and alpha patterns, Conv2d, mixed batches beside a
NoRA adapter, export back, and what is refused."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file
from test_conv2d import _images, cnn

import nora
from nora.errors import AdapterError
from nora.serving.loading import attach_adapters

IDS = torch.tensor([[1, 5, 9, 3, 7, 2], [4, 4, 8, 1, 6, 3], [2, 9, 9, 5, 1, 7]])


def _peft_lora(base, directory, seed: int = 1, **options):
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **options})
    model = peft.get_peft_model(base, config)
    torch.manual_seed(seed)
    with torch.no_grad():  # trained-looking: lora_B off its zero init
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(directory))
    return model.eval()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3.0, "down_proj": 16.0}},
        {"use_rslora": True},
        {"use_dora": True, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3.0}},
    ],
    ids=["plain", "rank-and-alpha-patterns", "rslora", "dora"],
)
def test_a_peft_lora_directory_loads_to_peft_outputs(tmp_path, options):
    theirs = _peft_lora(tiny_llama(), tmp_path / "peft", **options)
    ours = nora.AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-5, atol=1e-6)
    if options.get("rank_pattern"):
        q = ours.layers()["model.layers.0.self_attn.q_proj"].adapters["default"]
        assert q["lora_A"].shape[0] == 2
    assert ours.peft_config["default"].method == ("dora" if options.get("use_dora") else "lora")


def test_a_peft_lora_on_conv2d_loads_to_peft_outputs(tmp_path):
    theirs = _peft_lora(cnn(torch.float32), tmp_path / "peft", target_modules=["0", "2"])
    ours = nora.AdaptedModel.from_pretrained(cnn(torch.float32), tmp_path / "peft")
    x = _images(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_a_peft_lora_serves_in_a_mixed_batch_beside_a_nora_adapter_and_exports_back(tmp_path):
    theirs = _peft_lora(tiny_llama(), tmp_path / "peft")
    torch.manual_seed(2)
    mine = nora.get_peft_model(tiny_llama(), nora.NoraConfig(r=16, inner_r=4))
    with torch.no_grad():
        for p in mine.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    mine.save_pretrained(tmp_path / "nora")
    served = attach_adapters(tiny_llama(), {"old": tmp_path / "peft", "new": tmp_path / "nora"})  # as nora serve
    with torch.no_grad():
        mixed = served(IDS, adapter_names=["old", "new", nora.BASE]).logits
        torch.testing.assert_close(mixed[0], theirs(IDS[:1]).logits[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mixed[1], mine.eval()(IDS[1:2]).logits[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mixed[2], tiny_llama()(IDS[2:]).logits[0], rtol=1e-5, atol=1e-6)

    served.export_lora(tmp_path / "back", "old")  # alpha/r = 2 folds into lora_B on the way out
    original, back = (
        load_file(tmp_path / "peft" / "adapter_model.safetensors"),
        load_file(tmp_path / "back" / "adapter_model.safetensors"),
    )
    assert original.keys() == back.keys()
    for key in original:
        expected = original[key] * (2.0 if ".lora_B." in key else 1.0)
        torch.testing.assert_close(back[key], expected, rtol=1e-6, atol=1e-7, msg=key)
    again = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "back")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, theirs(IDS).logits, rtol=1e-5, atol=1e-6)


def test_what_nora_lora_cannot_hold_is_refused(tmp_path):
    _peft_lora(tiny_llama(), tmp_path / "biased", lora_bias=True)
    with pytest.raises(AdapterError, match="lora_bias"):
        nora.AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "biased")
    _peft_lora(tiny_llama(), tmp_path / "lora")
    with pytest.raises(AdapterError, match="in the file but"):  # a base with other layer sizes
        nora.AdaptedModel.from_pretrained(tiny_llama(hidden_size=48, intermediate_size=64), tmp_path / "lora")
    with pytest.raises(AdapterError, match="does not have"):
        nora.AdaptedModel.from_pretrained(cnn(torch.float32), tmp_path / "lora")
    ia3 = peft.get_peft_model(tiny_llama(), peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"]))
    ia3.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(AdapterError, match="PEFT IA3 adapter"):
        nora.AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "ia3")
