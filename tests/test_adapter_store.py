"""Resident adapters: inference-only adapters loaded from files live as slots of per-layer stacked buffers (no
module per adapter), load without walking the model, and give the outputs their modules would."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_float_close, model_input, tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn

import nora
from nora.resident import ResidentAdapters
from nora.slots import AdapterBank

NORA = nora.NoraConfig(r=12, inner_r=3)


def _save_distinct(root, config, n: int, seed: int = 0, **model_kw) -> list:
    """`n` distinct adapters of one layout (every tensor random), saved as root/a{i}."""
    model = nora.get_peft_model(tiny_llama(seed=seed, **model_kw), config)
    paths = []
    with torch.no_grad():
        for i in range(n):
            g = torch.Generator().manual_seed(1000 + i)
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
            model.save_pretrained(root / f"a{i}")
            paths.append(root / f"a{i}")
    return paths


def _module_reference(path, **model_kw):
    """The adapter at `path` loaded as modules (trainable load), on a fresh base: the reference output."""
    model = nora.AdaptedModel.from_pretrained(tiny_llama(**model_kw), path, is_trainable=True)
    model.eval_mode_frozen()
    return model


@torch.no_grad()
def test_three_hundred_resident_adapters_match_their_modules_through_adds_and_removes(tmp_path):
    paths = _save_distinct(tmp_path, NORA, 300)
    model = nora.AdaptedModel.from_pretrained(tiny_llama(), paths[0], adapter_name="a0")
    modules_before = sum(1 for _ in model.modules())
    for i in range(1, 300):
        model.load_adapter(paths[i], f"a{i}")
    layer = next(iter(model.layers().values()))
    assert list(layer.adapters) == ["a0"]  # the 299 others have no module anywhere
    assert sum(1 for _ in model.modules()) == modules_before + len(model.layers())  # one stack per layer, total
    (bank,) = model.resident.banks.values()
    assert len(bank) == 299 and bank.capacity >= 299
    assert model.memory_report()["resident_adapters"] == 299

    probe = [0, 1, 2, 57, 150, 298, 299]
    refs = {i: _module_reference(paths[i]) for i in probe}
    inputs = model_input("llama", batch=1)
    alone = {i: refs[i](**inputs).logits for i in probe}
    base = tiny_llama()(**inputs).logits

    # per-row mixed batch (module adapter a0, resident ones, the base) equals each adapter alone
    rows = ["a0", "a1", nora.BASE, "a57", "a299", "a2", "a150", "a298", "a1"]
    batch = model_input("llama", batch=len(rows))
    mixed = model(**batch, adapter_names=rows).logits
    for j, name in enumerate(rows):
        row = {k: v[j : j + 1] for k, v in batch.items()}
        reference = tiny_llama() if name == nora.BASE else refs[int(name[1:])]
        ref = reference(**row).logits
        assert_float_close(mixed[j : j + 1], ref)

    # removing adapters (swap-remove moves the last slots) and adding new ones leaves the others unchanged
    for gone in (1, 100, 299, 17):
        model.delete_adapter(f"a{gone}")
    assert len(bank) == 295 and sorted(bank.slots.values()) == list(range(295))
    extra = _save_distinct(tmp_path / "more", NORA, 3, seed=0)
    for i, path in enumerate(extra):
        model.load_adapter(path, f"new{i}")
    for i in (0, 2, 57, 150, 298):
        got = model(**inputs, adapter_names=[f"a{i}"]).logits
        assert_float_close(got, alone[i])
    assert not torch.allclose(alone[57], base, atol=1e-3)  # the adapters do change the output
    with pytest.raises(nora.AdapterError, match="not loaded"):
        model(**inputs, adapter_names=["a299"])


def test_loading_into_an_existing_bank_walks_no_module_and_copies_straight_from_the_file(tmp_path, monkeypatch):
    paths = _save_distinct(tmp_path, NORA, 3)
    model = nora.AdaptedModel.from_pretrained(tiny_llama(), paths[0], adapter_name="a0")
    model.load_adapter(paths[1], "a1")  # makes the bank
    (bank,) = model.resident.banks.values()
    assert bank.file_layout is not None

    def no_walk(*args, **kwargs):
        raise AssertionError("a load into an existing bank walked the model's modules")

    monkeypatch.setattr(nn.Module, "named_modules", no_walk)
    monkeypatch.setattr(ResidentAdapters, "_new_bank", no_walk)
    model.load_adapter(paths[2], "a2")
    monkeypatch.undo()
    tensors = load_file(paths[2] / "adapter_model.safetensors")
    slot = bank.slots["a2"]
    for lname, stack in bank.stacks.items():
        for pname, t in stack.tensors_at(slot).items():
            assert torch.equal(t, tensors[f"{lname}.{pname}"]), (lname, pname)
        assert stack.data[slot, 0].item() == NORA.scale(stack.r)


@torch.no_grad()
def test_a_file_with_another_layout_of_bytes_takes_the_checked_path(tmp_path):
    (path,) = _save_distinct(tmp_path, NORA, 1)
    tensors = load_file(path / "adapter_model.safetensors")
    other = tmp_path / "reordered"
    other.mkdir()
    (other / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    save_file(tensors, other / "adapter_model.safetensors", metadata={"written": "elsewhere"})
    model = nora.AdaptedModel.from_pretrained(tiny_llama(), path, adapter_name="a")
    model.load_adapter(path, "fast")
    bank = model.resident_bank("fast")
    layout = bank.file_layout
    model.load_adapter(other, "checked")
    assert model.resident_bank("checked") is bank and bank.file_layout is layout
    for stack in bank.stacks.values():
        assert torch.equal(stack.data[bank.slots["fast"]], stack.data[bank.slots["checked"]])
    inputs = model_input("llama", batch=1)
    expected = model(**inputs).logits  # "a", the same tensors as modules
    for name in ("fast", "checked"):
        assert_float_close(model(**inputs, adapter_names=[name]).logits, expected)


@pytest.mark.parametrize(
    "config",
    [
        nora.NoraConfig(r=12, inner_r=3, alpha=30.0),
        nora.LoraXSConfig(r=6),
        nora.SVFitConfig(r=6),
        nora.NoraConfig(r=0.5, inner_r=2, use_rslora=True),
    ],
    ids=["nora", "lora-xs", "svfit", "nora-fraction-rslora"],
)
@torch.no_grad()
def test_each_stackable_method_is_resident_and_matches_its_modules(config, tmp_path):
    paths = _save_distinct(tmp_path, config, 3)
    model = nora.get_peft_model(tiny_llama(), nora.LoraConfig(r=2), adapter_name="lora")
    for i, path in enumerate(paths):
        model.load_adapter(path, f"r{i}")
        assert model.resident_bank(f"r{i}") is not None
    rows = ["r2", "lora", "r0", "r1"]
    batch = model_input("llama", batch=len(rows))
    mixed = model(**batch, adapter_names=rows).logits
    for j, name in enumerate(rows):
        row = {k: v[j : j + 1] for k, v in batch.items()}
        if name == "lora":
            model.set_adapter("lora")
            ref = model(**row).logits
        else:
            ref = _module_reference(paths[int(name[1:])])(**row).logits
        assert_float_close(mixed[j : j + 1], ref)


def test_adapters_that_do_not_stack_or_train_are_modules(tmp_path):
    (nora_out,) = _save_distinct(tmp_path / "o", nora.NoraConfig(r=8, inner_r=3, inner="out"), 1)
    (lora,) = _save_distinct(tmp_path / "l", nora.LoraConfig(r=2), 1)
    (plain,) = _save_distinct(tmp_path / "p", NORA, 1)
    model = nora.get_peft_model(tiny_llama(), nora.LoraConfig(r=2), adapter_name="x")
    model.load_adapter(nora_out, "out")
    model.load_adapter(lora, "lora")
    model.load_adapter(plain, "trainable", is_trainable=True)
    layer = next(iter(model.layers().values()))
    assert set(layer.adapters) == {"x", "out", "lora", "trainable"} and not model.resident.banks
    assert len(layer.bases) == 2 and not layer.banks
    model.set_adapter("trainable")
    assert all(p.requires_grad for p in layer.adapters["trainable"].parameters())


@torch.no_grad()
def test_resident_adapter_saves_merges_and_activates_bit_identically(tmp_path):
    paths = _save_distinct(tmp_path, NORA, 2)
    model = nora.AdaptedModel.from_pretrained(tiny_llama(), paths[0], adapter_name="a0")
    model.load_adapter(paths[1], "a1")
    model.save_pretrained(tmp_path / "again", selected_adapters=["a1"])
    saved = load_file(tmp_path / "again" / "a1" / "adapter_model.safetensors")
    original = load_file(paths[1] / "adapter_model.safetensors")
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    meta = json.loads((tmp_path / "again" / "a1" / "adapter_config.json").read_text())["nora"]["layers"]
    assert meta == json.loads((paths[1] / "adapter_config.json").read_text())["nora"]["layers"]

    inputs = model_input("llama")
    expected = _module_reference(paths[1])(**inputs).logits
    layer = next(iter(model.layers().values()))
    reference_layer = _module_reference(paths[1]).layers()[layer.module_name]
    assert torch.equal(layer.delta_weight("a1"), reference_layer.delta_weight("default"))
    model.set_adapter("a1")  # needs modules: the slot becomes one, with the very same tensors
    assert "a1" in layer.adapters and model.resident_bank("a1") is None and not model.resident.banks
    assert torch.equal(model(**inputs).logits, expected)
    model.merge(["a1"])
    torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-4, atol=1e-4)
    model.unmerge()


def test_deleting_the_last_resident_adapter_frees_its_bank_and_bases(tmp_path):
    paths = _save_distinct(tmp_path, nora.NoraConfig(r=8, inner_r=2), 2)
    model = nora.get_peft_model(tiny_llama(), NORA, adapter_name="x")
    for i, path in enumerate(paths):
        model.load_adapter(path, f"r{i}")
    layer = next(iter(model.layers().values()))
    assert len(layer.bases) == 2 and len(layer.banks) == 1
    model.delete_adapter("r0")
    model.delete_adapter("r1")
    assert len(layer.bases) == 1 and len(layer.banks) == 0 and not model.resident.banks
    assert set(model.peft_config) == {"x"}
    report = model.memory_report()
    assert report["resident"] == 0 and report["resident_adapters"] == 0


def test_a_bad_second_file_is_refused_and_leaves_no_slot(tmp_path):
    paths = _save_distinct(tmp_path, NORA, 2)
    model = nora.AdaptedModel.from_pretrained(tiny_llama(), paths[0], adapter_name="a0")
    model.load_adapter(paths[0], "ok")
    bad = load_file(paths[1] / "adapter_model.safetensors")
    key = next(k for k in bad if k.endswith("inner_A"))
    bad[key] = torch.zeros(3, 5)
    save_file(bad, paths[1] / "adapter_model.safetensors")
    with pytest.raises(nora.AdapterError, match="does not belong to this configuration"):
        model.load_adapter(paths[1], "bad")
    del bad[key]
    save_file(bad, paths[1] / "adapter_model.safetensors")
    with pytest.raises(nora.AdapterError, match="lacks tensors"):
        model.load_adapter(paths[1], "bad")
    with pytest.raises(nora.AdapterError, match="exists"):
        model.load_adapter(paths[0], "ok")
    (bank,) = model.resident.banks.values()
    assert bank.names == ["ok"] and "bad" not in model.peft_config
    other = nora.get_peft_model(tiny_llama(seed=7), nora.LoraConfig(r=2))
    with pytest.raises(nora.AdapterError, match="made for a different base model"):
        other.load_adapter(paths[0], "other")
    # a bad first file of a layout: the bank is not made, and the bases made for it are dropped
    fresh = nora.get_peft_model(tiny_llama(), nora.LoraConfig(r=2))
    with pytest.raises(nora.AdapterError, match="lacks tensors"):
        fresh.load_adapter(paths[1], "bad")
    assert not fresh.resident.banks and all(not layer.bases for layer in fresh.layers().values())
    assert set(fresh.peft_config) == {"default"}


def test_loading_onto_merged_weights_is_refused(tmp_path):
    paths = _save_distinct(tmp_path, NORA, 2)
    model = nora.AdaptedModel.from_pretrained(tiny_llama(), paths[0], adapter_name="a0")
    model.load_adapter(paths[1], "a1")
    model.merge(["a0"])
    with pytest.raises(nora.AdapterError, match="merged"):
        model.load_adapter(paths[1], "a2")
    assert "a2" not in model.peft_config


@pytest.mark.parametrize("num_beams", [1, 2])
@torch.no_grad()
def test_generate_with_resident_rows_equals_each_adapter_alone(num_beams, tmp_path):
    paths = _save_distinct(tmp_path, NORA, 3)
    model = nora.get_peft_model(tiny_llama(), nora.LoraConfig(r=2), adapter_name="lora")
    for i, path in enumerate(paths):
        model.load_adapter(path, f"r{i}")
    model.eval_mode_frozen()
    rows = ["r1", nora.BASE, "r0", "r2"]
    prompt = torch.randint(1, 64, (len(rows), 6), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=num_beams, pad_token_id=0)
    mixed = model.generate(input_ids=prompt, adapter_names=rows, **kw)
    for i, name in enumerate(rows):
        if name == nora.BASE:
            alone = tiny_llama().generate(input_ids=prompt[i : i + 1], **kw)
        else:
            alone = _module_reference(paths[int(name[1:])]).generate(input_ids=prompt[i : i + 1], **kw)
        assert torch.equal(mixed[i : i + 1], alone), name


@torch.no_grad()
def test_resident_stacks_follow_the_model_to_another_dtype(tmp_path):
    paths = _save_distinct(tmp_path, NORA, 2)
    model = nora.get_peft_model(tiny_llama(), nora.LoraConfig(r=2), adapter_name="lora")
    for i, path in enumerate(paths):
        model.load_adapter(path, f"r{i}")
    inputs = model_input("llama", batch=2)
    before = model(**inputs, adapter_names=["r0", "r1"]).logits
    model.double()
    (bank,) = model.resident.banks.values()
    assert all(s.data.dtype == torch.float64 for s in bank.stacks.values())
    after = model(**inputs, adapter_names=["r0", "r1"]).logits
    assert after.dtype == torch.float64
    torch.testing.assert_close(after.float(), before, rtol=1e-4, atol=1e-4)


def test_bank_slots_grow_by_doubling_and_swap_remove():
    bank = AdapterBank("k", nora.methods.get_method("nora"), NORA, capacity=2)
    for i in range(5):
        bank.allocate(f"n{i}", NORA)
    assert bank.capacity == 8 and bank.slots == {f"n{i}": i for i in range(5)}
    bank.remove("n1")
    assert bank.slots == {"n0": 0, "n4": 1, "n2": 2, "n3": 3} and bank.names == ["n0", "n4", "n2", "n3"]
    bank.remove("n3")
    assert bank.names == ["n0", "n4", "n2"] and "n3" not in bank


def test_the_export_function_takes_a_resident_adapter_too(tmp_path):
    from nora.export import export_lora

    paths = _save_distinct(tmp_path, NORA, 2)
    model = nora.AdaptedModel.from_pretrained(tiny_llama(), paths[0], adapter_name="a0")
    model.load_adapter(paths[1], "a1")
    assert model.resident_bank("a1") is not None
    export_lora(model, "a1", tmp_path / "peft")
    exported = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert len(exported) == 2 * len(model.layers())  # lora_A and lora_B for every adapted layer


@torch.no_grad()
def test_reserved_slots_mean_no_load_grows_or_moves_the_stores(tmp_path):
    paths = _save_distinct(tmp_path, NORA, 24)
    model = nora.AdaptedModel.from_pretrained(tiny_llama(), paths[0], adapter_name="a0")
    with pytest.raises(ValueError, match="≥ 0"):
        model.reserve_resident(-1)
    model.reserve_resident(20)
    model.load_adapter(paths[1], "a1")
    (bank,) = model.resident.banks.values()
    assert bank.capacity == 20  # the bank was made with the reserved room, not the default 8
    buffers = {n: s.data.data_ptr() for n, s in bank.stacks.items()}
    for i in range(2, 21):
        model.load_adapter(paths[i], f"a{i}")
    assert len(bank) == 20 and bank.capacity == 20
    assert {n: s.data.data_ptr() for n, s in bank.stacks.items()} == buffers  # never reallocated or copied
    inputs = model_input("llama", batch=1)
    before = {i: model(**inputs, adapter_names=[f"a{i}"]).logits for i in (1, 7, 20)}
    model.reserve_resident(64)  # an existing bank grows once, keeping every resident adapter
    assert bank.capacity == 64 and model.memory_report()["resident"] == 64 * bank.slot_bytes
    model.load_adapter(paths[21], "a21")
    for i, logits in before.items():
        torch.testing.assert_close(model(**inputs, adapter_names=[f"a{i}"]).logits, logits, rtol=0, atol=0)
    ref = _module_reference(paths[21])(**inputs).logits
    assert_float_close(model(**inputs, adapter_names=["a21"]).logits, ref)
