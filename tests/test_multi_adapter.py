"""Many adapters at once: shared-basis mixed batches, the resident store, and per-row generation."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_float_close, model_input, tiny_llama

import nora


def _perturb(model, name, seed):
    model.set_adapter(name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _zoo():
    model = nora.get_peft_model(tiny_llama(), nora.NoraConfig(r=12, inner_r=3), adapter_name="n0")
    configs = {
        "n1": nora.NoraConfig(r=12, inner_r=3),
        "n2": nora.NoraConfig(r=12, inner_r=2),  # same basis, other core shape
        "n3": nora.NoraConfig(r=8, inner_r=2),  # another basis
        "out": nora.NoraConfig(r=12, inner_r=3, inner="out"),
        "xs": nora.LoraXSConfig(r=6),
        "sv": nora.SVFitConfig(r=6),
        "lora": nora.LoraConfig(r=3),
        "dora": nora.DoraConfig(r=2),
    }
    for name, cfg in configs.items():
        model.add_adapter(name, cfg)
    for i, name in enumerate(model.peft_config):
        _perturb(model, name, i)
    model.eval_mode_frozen()
    return model


def _alone(model, name, inputs):
    if name == nora.BASE:
        with model.disable_adapter():
            return model(**inputs).logits
    model.set_adapter(name)
    return model(**inputs).logits


@torch.no_grad()
def test_mixed_batch_uses_the_shared_basis_and_equals_each_adapter_alone():
    model = _zoo()
    rows = ["n0", "n1", "n2", "n3", nora.BASE, "out", "xs", "sv", "lora", "dora", "n1", "sv"]
    inputs = model_input("llama", batch=len(rows))
    mixed = model(**inputs, adapter_names=rows).logits
    layer = next(iter(model.layers().values()))
    # one store per layout: (basis r12: nora i3, nora i2), nora r8, nora "out", lora-xs, svfit, lora; DoRA, whose
    # output is not linear in its tensors, runs on its own rows
    assert len(layer.mirrors) == 7
    for i, name in enumerate(rows):
        row = {k: v[i : i + 1] for k, v in inputs.items()}
        assert_float_close(mixed[i : i + 1], _alone(model, name, row))


@torch.no_grad()
def test_store_add_remove_keeps_the_other_adapters_unchanged():
    model = nora.get_peft_model(tiny_llama(), nora.NoraConfig(r=12, inner_r=3), adapter_name="a0")
    for i in range(1, 30):
        model.add_adapter(f"a{i}", nora.NoraConfig(r=12, inner_r=3))
    for i in range(30):
        _perturb(model, f"a{i}", i)
    names = [f"a{i}" for i in range(30)]
    inputs = model_input("llama", batch=30)
    before = model(**inputs, adapter_names=names).logits
    layer = next(iter(model.layers().values()))
    (stack,) = layer.mirrors.values()
    assert len(stack) == 30 and stack.capacity >= 30
    for gone in ("a3", "a17", "a29"):
        model.delete_adapter(gone)
    assert len(stack) == 27 and sorted(stack.slots.values()) == list(range(27))
    model.add_adapter("new", nora.NoraConfig(r=12, inner_r=3))
    _perturb(model, "new", 99)
    kept = [n for n in names if n not in ("a3", "a17", "a29")]
    keep_idx = [names.index(n) for n in kept]
    after = model(**{k: v[keep_idx] for k, v in inputs.items()}, adapter_names=kept).logits
    torch.testing.assert_close(after, before[keep_idx], rtol=1e-6, atol=1e-6)
    report = model.memory_report()
    assert report["adapters"] == 28 and report["stacks"] > 0


@torch.no_grad()
def test_store_follows_in_place_updates():
    model = nora.get_peft_model(tiny_llama(), nora.NoraConfig(r=12, inner_r=3), adapter_name="a")
    model.add_adapter("b", nora.NoraConfig(r=12, inner_r=3))
    inputs = model_input("llama", batch=2)
    model(**inputs, adapter_names=["a", "b"])
    _perturb(model, "b", 5)  # changes b after its slot was written
    mixed = model(**inputs, adapter_names=["a", "b"]).logits
    torch.testing.assert_close(mixed[1:], _alone(model, "b", {k: v[1:] for k, v in inputs.items()}))


@pytest.mark.parametrize("num_beams", [1, 2])
@torch.no_grad()
def test_generate_with_per_row_adapters_equals_one_adapter_at_a_time(num_beams):
    model = _zoo()
    rows = ["n0", "sv", nora.BASE, "lora"]
    prompt = torch.randint(1, 64, (len(rows), 6), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=num_beams, pad_token_id=0)
    mixed = model.generate(input_ids=prompt, adapter_names=rows, **kw)
    for i, name in enumerate(rows):
        if name == nora.BASE:
            with model.disable_adapter():
                alone = model.generate(input_ids=prompt[i : i + 1], **kw)
        else:
            model.set_adapter(name)
            alone = model.generate(input_ids=prompt[i : i + 1], **kw)
        assert torch.equal(mixed[i : i + 1], alone), name


def test_unknown_adapter_name_is_a_clear_error():
    model = nora.get_peft_model(tiny_llama(), nora.NoraConfig(r=12, inner_r=3))
    with pytest.raises(nora.AdapterError, match="not loaded"):
        model(**model_input("llama", batch=1), adapter_names=["nope"])
    with pytest.raises(nora.AdapterError, match="2 entries for a batch of 3"):
        model(**model_input("llama", batch=3), adapter_names=["default", "default"])
