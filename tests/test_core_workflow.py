"""Identity at init, parameter counts, merge/unmerge, mixed batches and learning on tiny real architectures."""

from __future__ import annotations

import pytest
import torch
from conftest import BUILDERS, assert_float_close, model_input, model_output

import nora

METHOD_CONFIGS = {
    "lora": lambda: nora.LoraConfig(r=4),
    "pissa": lambda: nora.PissaConfig(r=4),
    "dora": lambda: nora.DoraConfig(r=4),
    "lora-xs": lambda: nora.LoraXSConfig(r=4, core_init="zeros"),
    "nora": lambda: nora.NoraConfig(r=12, inner_r=3),
    "nora-out": lambda: nora.NoraConfig(r=12, inner_r=3, inner="out"),
    "svfit": lambda: nora.SVFitConfig(),
}
EXACT_IDENTITY = set(METHOD_CONFIGS)  # lora-xs with core_init="zeros" too


def _expected_count(method: str, d: int, k: int, core) -> int:
    r = core.r
    return {
        "lora": r * (d + k),
        "pissa": r * (d + k),
        "dora": r * (d + k) + d,
        "lora-xs": r * r,
        "nora": 2 * r * 3,
        "nora-out": 2 * d * 3,
        "svfit": r,
    }[method]


def _perturb(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_init_counts_merge_unload(arch, method):
    base = BUILDERS[arch]()
    inputs = model_input(arch)
    ref = model_output(base, inputs).detach()
    model = nora.get_peft_model(base, METHOD_CONFIGS[method]())

    # identity at init
    assert_float_close(model_output(model, inputs), ref)

    # only the method's tensors train, in the counts of METHODS.md's table
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable)
    total = 0
    for layer in model.layers().values():
        d, k = layer.shape
        core = layer.adapters["default"]
        count = sum(p.numel() for p in core.parameters())
        assert count == _expected_count(method, d, k, core)
        total += count
    assert model.get_nb_trainable_parameters()[0] == total

    # merge / unmerge round trip, merge_and_unload equals the adapted model
    _perturb(model)
    adapted = model_output(model, inputs).detach()
    assert not torch.allclose(adapted, ref, atol=1e-4)
    model.merge()
    torch.testing.assert_close(model_output(model, inputs), adapted, rtol=1e-4, atol=1e-5)
    model.unmerge()
    torch.testing.assert_close(model_output(model, inputs), adapted, rtol=1e-5, atol=1e-6)
    with model.disable_adapter():
        torch.testing.assert_close(model_output(model, inputs), ref, rtol=1e-5, atol=1e-6)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, nora.AdapterLayer) for m in merged.modules())
    torch.testing.assert_close(model_output(merged, inputs), adapted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_unload_restores_original(method):
    base = BUILDERS["llama"]()
    inputs = model_input("llama")
    ref = model_output(base, inputs).detach()
    model = nora.get_peft_model(base, METHOD_CONFIGS[method]())
    _perturb(model)
    model.merge()
    plain = model.unload()
    assert_float_close(model_output(plain, inputs), ref)


def test_lora_xs_default_init_is_near_identity():
    base = BUILDERS["llama"]()
    inputs = model_input("llama")
    ref = model_output(base, inputs).detach()
    model = nora.get_peft_model(base, nora.LoraXSConfig(r=4))
    torch.testing.assert_close(model_output(model, inputs), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_batch_equals_each_row_alone(arch):
    base = BUILDERS[arch]()
    inputs = model_input(arch, batch=5)
    model = nora.get_peft_model(base, nora.NoraConfig(r=12, inner_r=3), adapter_name="a")
    model.add_adapter("b", nora.NoraConfig(r=12, inner_r=3))
    model.add_adapter("c", nora.LoraConfig(r=4))
    model.add_adapter("d", nora.DoraConfig(r=2))
    for name in ("a", "b", "c", "d"):
        model.set_adapter(name)
        _perturb(model, seed=hash(name) % 100)
    rows = ["a", "b", nora.BASE, "c", "d"]
    mixed = model_output_rows(model, inputs, rows)
    for i, name in enumerate(rows):
        row = {k: v[i : i + 1] for k, v in inputs.items()}
        if name == nora.BASE:
            with model.disable_adapter():
                alone = model_output(model, row)
        else:
            model.set_adapter(name)
            alone = model_output(model, row)
        assert_float_close(mixed[i : i + 1], alone)


def model_output_rows(model, inputs, rows):
    return model(**inputs, adapter_names=rows).logits


def test_adapters_of_one_method_share_one_basis():
    model = nora.get_peft_model(BUILDERS["llama"](), nora.NoraConfig(r=12, inner_r=3), adapter_name="a")
    model.add_adapter("b", nora.NoraConfig(r=12, inner_r=2))
    model.add_adapter("c", nora.NoraConfig(r=8, inner_r=2))
    for layer in model.layers().values():
        a, b, c = (layer.adapters[n] for n in "abc")
        assert a.basis_key == b.basis_key != c.basis_key
        assert len(layer.bases) == 2
    model.delete_adapter("c")
    assert all(len(layer.bases) == 1 for layer in model.layers().values())


def test_only_active_adapter_trains():
    model = nora.get_peft_model(BUILDERS["llama"](), nora.NoraConfig(r=12, inner_r=3), adapter_name="a")
    model.add_adapter("b", nora.SVFitConfig(r=4))
    model.set_adapter("b")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".adapters.b." in n for n in names)


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_a_few_steps_lower_the_loss(method):
    base = BUILDERS["llama"](seed=1)
    model = nora.get_peft_model(base, METHOD_CONFIGS[method]())
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    lr = {"svfit": 5e-2, "lora-xs": 2e-1}.get(method, 2e-2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_modules_to_save_head_trains_and_unloads():
    base = BUILDERS["bert"]()
    inputs = model_input("bert")
    ref = model_output(base, inputs).detach()
    model = nora.get_peft_model(base, nora.NoraConfig(r=12, inner_r=3, modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.copies.default" in n for n in trainable)
    assert not any("classifier.original" in n for n in trainable)
    assert all("classifier" not in name for name in model.layers())  # the head is saved whole, not adapted
    pooled = nora.get_peft_model(BUILDERS["bert"](), nora.NoraConfig(r=12, inner_r=3, modules_to_save=["pooler"]))
    assert pooled.layers() and not any(".pooler." in name for name in pooled.layers())  # nor are modules inside one
    _perturb(model)
    assert not torch.allclose(model_output(model, inputs), ref, atol=1e-4)
    torch.testing.assert_close(model_output(model.unload(), inputs), ref)


def test_modules_to_save_on_a_block_list_the_model_loops_over():
    base = BUILDERS["llama"]()
    inputs = model_input("llama")
    ref = model_output(base, inputs).detach()
    config = nora.LoraConfig(r=2, target_modules=["lm_head"], modules_to_save=["model.layers"])  # iterated, sliced
    model = nora.get_peft_model(base, config)
    torch.testing.assert_close(model_output(model, inputs), ref)
    model_output(model, inputs).sum().backward()
    copies = [p for n, p in model.named_parameters() if "layers.copies.default" in n]
    assert copies and all(p.grad is not None for p in copies)
    assert all(p.grad is None for n, p in model.named_parameters() if "layers.original" in n)


def test_dropout_acts_in_training_only():
    inputs = model_input("llama")
    model = nora.get_peft_model(BUILDERS["llama"](), nora.NoraConfig(r=12, inner_r=3, dropout=0.5))
    _perturb(model)
    no_drop = nora.get_peft_model(BUILDERS["llama"](), nora.NoraConfig(r=12, inner_r=3))
    _perturb(no_drop)
    torch.testing.assert_close(model_output(model, inputs), model_output(no_drop, inputs))
    model.train()
    torch.manual_seed(0)
    first = model_output(model, inputs)
    assert not torch.allclose(first, model_output(model, inputs))


def test_eval_mode_frozen_freezes_and_stops_dropout(tmp_path):
    model = nora.get_peft_model(BUILDERS["llama"]().train(), nora.NoraConfig(r=12, inner_r=3, dropout=0.5))
    _perturb(model)
    model.save_pretrained(tmp_path)
    assert model.training and model.eval_mode_frozen() is model
    assert not any(m.training for m in model.modules()) and not any(p.requires_grad for p in model.parameters())
    loaded = nora.AdaptedModel.from_pretrained(BUILDERS["llama"]().train(), tmp_path)  # as PEFT: eval mode
    assert not any(m.training for m in loaded.modules())
    inputs = model_input("llama")
    assert_float_close(model_output(loaded, inputs), model_output(model, inputs))  # no dropout on either
