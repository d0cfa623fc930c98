"""Layer kinds are plug-ins (nora.layers): a kind defined here, one class plus one registry line, takes adapters
through every path — injection, forward, merge → unmerge, save → load, a mixed batch — against float64 references;
and the built-in kinds answer the contract as the flags they replaced did."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_float_close, tiny_gpt2
from torch import nn

import nora
from nora.layers import KINDS, MatrixKind, kind_of


class Projection(nn.Module):
    """A module of no kind nora knows: it holds its matrix in × out under a name of its own, `table`."""

    def __init__(self, k: int, d: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(k, d, dtype=torch.float64) / k**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.table


class ProjectionKind(MatrixKind):
    name = "projection"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, Projection)

    def weight(self, module: nn.Module) -> torch.Tensor:
        return module.table.T  # d × k, a view: merging writes through it


@pytest.fixture
def projection_kind():
    KINDS.append(ProjectionKind())  # the registry line
    yield
    KINDS.pop()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = Projection(12, 10)
        self.out = Projection(10, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.proj(x)))


def perturbed(model: nora.AdaptedModel, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers().values():
            for p in layer.adapters[name].parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_a_kind_of_its_own_is_one_class_and_one_registry_line(projection_kind, tmp_path):
    x = torch.randn(3, 12, dtype=torch.float64)
    plain = Net()
    before = plain(x)
    with pytest.raises(nora.AdapterError, match="matches no"):
        KINDS.pop()
        try:
            nora.get_peft_model(Net(), nora.LoraConfig(r=2, target_modules=["proj", "out"]))
        finally:
            KINDS.append(ProjectionKind())
    model = nora.get_peft_model(Net(), nora.LoraConfig(r=2, target_modules=["proj", "out"]))
    assert set(model.layers()) == {"proj", "out"}
    perturbed(model, "default", 1)
    out = model(x)
    # the float64 reference: LoRA's ΔW = s·B·A written into a plain copy, in the module's own (in × out) layout
    ref = Net()
    for name, layer in model.layers().items():
        core = layer.adapters["default"]
        delta = core.scale * core["lora_B"].detach() @ core["lora_A"].detach()
        with torch.no_grad():
            ref.get_submodule(name).table.add_(delta.T)
    assert_float_close(out, ref(x), "forward against W + s·B·A")
    assert not torch.allclose(out, before)

    model.merge()
    assert_float_close(model.model.proj.base_layer.table, ref.proj.table, "merged weight")
    assert_float_close(model(x), out, "merged forward")
    model.unmerge()
    assert_float_close(model.model.proj.base_layer.table, plain.proj.table, "unmerged weight")

    model.save_pretrained(tmp_path / "a")
    loaded = nora.AdaptedModel.from_pretrained(Net(), tmp_path / "a")
    assert_float_close(loaded(x), out, "loaded")


def test_a_kind_of_its_own_takes_a_basis_method_and_mixed_batches(projection_kind, tmp_path):
    x = torch.randn(4, 12, dtype=torch.float64)
    config = nora.NoraConfig(r=4, inner_r=2, target_modules=["proj", "out"], svd_dtype="float64")
    model = nora.get_peft_model(Net(), config)
    perturbed(model, "default", 1)
    model.add_adapter("b", config)
    perturbed(model, "b", 2)
    # NoRA's frozen basis is the SVD of the kind's d × k view (the stored table transposed)
    layer = model.layers()["proj"]
    basis = layer.basis_of(layer.adapters["default"])
    U, _, Vh = torch.linalg.svd(model.model.proj.base_layer.table.T.detach())
    assert_float_close(basis.B @ basis.B.T, U[:, :4] @ U[:, :4].T, "left singular subspace of the view")
    assert_float_close(basis.A.T @ basis.A, Vh[:4].T @ Vh[:4], "right singular subspace of the view")
    runs = {}
    for name in ("default", "b"):
        model.set_adapter(name)
        runs[name] = model(x)
    with model.disable_adapter():
        runs[nora.BASE] = model(x)
    names = ["b", nora.BASE, "default", "b"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
    assert_float_close(mixed, torch.stack([runs[n][i] for i, n in enumerate(names)]), "mixed batch")
    model.save_pretrained(tmp_path / "s")
    loaded = nora.AdaptedModel.from_pretrained(Net(), tmp_path / "s")  # inference-only: a resident slot
    assert_float_close(loaded(x), runs["default"], "loaded")


def test_the_builtin_kinds_see_their_weights_as_out_by_in():
    gpt2 = tiny_gpt2()
    conv1d = gpt2.transformer.h[0].attn.c_attn  # stored in × out
    assert kind_of(conv1d).name == "conv1d" and kind_of(conv1d).fan_in_fan_out
    assert kind_of(conv1d).weight(conv1d).shape == conv1d.weight.T.shape
    conv = nn.Conv2d(3, 5, 3)
    assert kind_of(conv).weight(conv).shape == (5, 27) and not kind_of(conv).mirrors
    assert kind_of(nn.Conv2d(4, 4, 3, groups=4)).refusal(nn.Conv2d(4, 4, 3, groups=4)) is not None
    assert kind_of(nn.Linear(3, 4)).name == "linear" and kind_of(nn.Embedding(3, 4)) is None


def test_nora_layer_still_exports_what_it_did():
    from nora.layer import BASE, AdapterLayer, conv_patches, is_adaptable, oriented_weight  # noqa: F401

    assert is_adaptable(nn.Linear(2, 3)) and not is_adaptable(nn.Conv2d(4, 4, 3, groups=4))
