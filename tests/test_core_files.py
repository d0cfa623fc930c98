"""Save/load, export to PEFT, the basis cache, reproducibility across processes, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import BUILDERS, ROOT, model_input, model_output
from peft import PeftModel
from safetensors.torch import load_file, save_file

import nora
from nora.svd import BASIS_CACHE, SVDSettings, truncated_svd

CONFIGS = {
    "lora": lambda: nora.LoraConfig(r=4),
    "pissa": lambda: nora.PissaConfig(r=4, alpha=8),
    "dora": lambda: nora.DoraConfig(r=4),
    "lora-xs": lambda: nora.LoraXSConfig(r=4, svd="randomized"),
    "nora": lambda: nora.NoraConfig(r=12, inner_r=3, alpha=24, svd="randomized", niter=2),
    "nora-out": lambda: nora.NoraConfig(r=12, inner_r=3, inner="out", placement="in"),
    "svfit": lambda: nora.SVFitConfig(energy=0.95),
}


def _trained(arch: str, config, seed: int = 0):
    model = nora.get_peft_model(BUILDERS[arch](), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _run_python(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=ROOT / "tests",
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_save_load_in_a_fresh_process_gives_identical_outputs(tmp_path):
    """Every method's adapter, saved here, loads in one fresh process (nothing shared but the files) to the
    same outputs, to float32 rounding (another process may run other kernels: another thread count or
    instruction set)."""
    for method, make in CONFIGS.items():
        model = _trained("llama", make())
        inputs = model_input("llama")
        torch.save(model_output(model, inputs).detach(), tmp_path / f"{method}.pt")
        model.save_pretrained(tmp_path / method)
        files = sorted(p.name for p in (tmp_path / method).iterdir())
        assert files == ["adapter_config.json", "adapter_model.safetensors"], method
        tensors = load_file(tmp_path / method / "adapter_model.safetensors")
        assert sum(t.numel() for t in tensors.values()) == model.get_nb_trainable_parameters()[0], method
    _run_python(f"""
        import torch, nora
        from conftest import assert_float_close, tiny_llama, model_input, model_output
        for method in {list(CONFIGS)!r}:
            model = nora.AdaptedModel.from_pretrained(tiny_llama(), {str(tmp_path)!r} + "/" + method)
            got = model_output(model, model_input("llama"))
            want = torch.load({str(tmp_path)!r} + "/" + method + ".pt")
            assert_float_close(got, want, msg=method)
            assert not any(p.requires_grad for p in model.parameters()), method
    """)


def test_randomized_svd_is_reproducible_across_processes():
    code = """
        import torch
        from nora.svd import SVDSettings, truncated_svd
        torch.manual_seed(123)
        W = torch.randn(96, 80, generator=torch.Generator().manual_seed(7))
        U, S, Vh = truncated_svd(W, 10, SVDSettings("randomized", niter=2, oversample=8, seed=5))
        print(torch.cat([U.flatten(), S, Vh.flatten()]).double().sum().item(), U[:3, :3].tolist())
    """
    assert _run_python(code) == _run_python(code.replace("manual_seed(123)", "manual_seed(999)"))


def test_randomized_svd_matches_exact_subspace():
    W = torch.randn(120, 90, generator=torch.Generator().manual_seed(0)) @ torch.diag(torch.logspace(0, -3, 90))
    U, S, Vh = truncated_svd(W, 8, SVDSettings("randomized", niter=4, seed=1))
    Ue, Se, Vhe = truncated_svd(W, 8, SVDSettings("exact"))
    torch.testing.assert_close(S, Se, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(U, Ue, rtol=1e-3, atol=1e-4)  # signs canonicalised: same vectors, not just span
    torch.testing.assert_close(Vh, Vhe, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_export_lora_loads_in_peft_with_the_same_outputs(arch, method, tmp_path):
    model = _trained(arch, CONFIGS[method]())
    inputs = model_input(arch)
    expected = model_output(model, inputs).detach()
    model.export_lora(tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    peft_model = PeftModel.from_pretrained(BUILDERS[arch](), str(tmp_path / "peft")).eval()
    got = model_output(peft_model, inputs).detach()
    base = model_output(BUILDERS[arch](), inputs).detach()
    assert (got - expected).norm() / (expected - base).norm() < 1e-5
    assert (got - expected).norm() / expected.norm() < 1e-5


def test_export_rank_is_the_rank_of_the_core(tmp_path):
    model = _trained("llama", nora.NoraConfig(r=12, inner_r=3))
    model.export_lora(tmp_path / "peft")
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")} == {3}
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 3


def test_several_adapters_save_and_load_by_name(tmp_path):
    model = _trained("llama", nora.NoraConfig(r=12, inner_r=3))
    model.add_adapter("svfit", nora.SVFitConfig(r=4))
    model.set_adapter("svfit")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.5)
    inputs = model_input("llama")
    outs = {}
    for name in ("default", "svfit"):
        model.set_adapter(name)
        outs[name] = model_output(model, inputs).detach()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "svfit" / "adapter_config.json").exists()
    fresh = nora.AdaptedModel.from_pretrained(BUILDERS["llama"](), tmp_path)
    fresh.load_adapter(tmp_path / "svfit", "svfit")
    for name in ("default", "svfit"):
        fresh.set_adapter(name)
        torch.testing.assert_close(model_output(fresh, inputs), outs[name], rtol=0, atol=0)


def test_loading_n_adapters_computes_each_svd_once(tmp_path):
    model = _trained("llama", nora.NoraConfig(r=12, inner_r=3))
    n_layers = len(model.layers())
    model.save_pretrained(tmp_path / "a")
    BASIS_CACHE.clear()
    base = BUILDERS["llama"]()
    fresh = nora.AdaptedModel.from_pretrained(base, tmp_path / "a", adapter_name="a0")
    for i in range(1, 4):
        fresh.load_adapter(tmp_path / "a", f"a{i}")
    assert BASIS_CACHE.misses == n_layers  # the SVD ran once per layer
    assert all(len(layer.bases) == 1 for layer in fresh.layers().values())
    # a second model on the same weights hits the cache
    nora.AdaptedModel.from_pretrained(BUILDERS["llama"](), tmp_path / "a")
    assert BASIS_CACHE.misses == n_layers and BASIS_CACHE.hits >= n_layers


def test_disk_basis_cache_survives_the_process(tmp_path):
    cfg = nora.NoraConfig(r=12, inner_r=3, basis_cache_dir=str(tmp_path / "cache"))
    nora.get_peft_model(BUILDERS["llama"](), cfg)
    files = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 14  # 2 layers × 7 linear modules
    BASIS_CACHE.clear()
    nora.get_peft_model(BUILDERS["llama"](), cfg)
    assert BASIS_CACHE.misses == 0 and BASIS_CACHE.hits == 14


# ---- clear errors ----------------------------------------------------------------------------------------------


def test_rank_larger_than_the_matrix():
    with pytest.raises(nora.AdapterError, match=r"larger than min\(d, k\)=32"):
        nora.get_peft_model(BUILDERS["llama"](), nora.NoraConfig(r=40, inner_r=4, target_modules=["q_proj"]))


def test_inner_rank_larger_than_outer():
    with pytest.raises(nora.AdapterError, match="inner_r=9 is larger than the outer rank r=8"):
        nora.get_peft_model(BUILDERS["llama"](), nora.NoraConfig(r=8, inner_r=9))


def test_no_module_matches():
    with pytest.raises(nora.AdapterError, match="matches no nn.Linear.*q_proj"):
        nora.get_peft_model(BUILDERS["llama"](), nora.LoraConfig(target_modules=["query_key"]))


def test_failed_injection_leaves_the_model_usable():
    model = nora.get_peft_model(BUILDERS["llama"](), nora.LoraConfig(r=2), adapter_name="a")
    with pytest.raises(nora.AdapterError):
        model.add_adapter("b", nora.LoraConfig(r=33))
    assert "b" not in model.peft_config
    assert all(list(layer.adapters) == ["a"] for layer in model.layers().values())


def test_unknown_method_in_a_file(tmp_path):
    model = _trained("llama", nora.LoraConfig(r=2))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["method"] = "mystery"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(nora.AdapterError, match="unknown adapter method 'mystery'"):
        nora.AdaptedModel.from_pretrained(BUILDERS["llama"](), tmp_path)


def test_adapter_for_another_base_is_refused(tmp_path):
    model = _trained("llama", nora.NoraConfig(r=12, inner_r=3))
    model.save_pretrained(tmp_path)
    other = BUILDERS["llama"](seed=42)
    with pytest.raises(nora.AdapterError, match="made for a different base model"):
        nora.AdaptedModel.from_pretrained(other, tmp_path)
    assert not any(isinstance(m, nora.AdapterLayer) for m in other.modules())


def test_lora_on_another_base_warns(tmp_path):
    _trained("llama", nora.LoraConfig(r=2)).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="different base model"):
        nora.AdaptedModel.from_pretrained(BUILDERS["llama"](seed=42), tmp_path)


def test_adapter_for_another_architecture_is_refused(tmp_path):
    _trained("llama", nora.NoraConfig(r=12, inner_r=3)).save_pretrained(tmp_path)
    with pytest.raises(nora.AdapterError, match="does not have"):
        nora.AdaptedModel.from_pretrained(BUILDERS["gpt2"](), tmp_path)


def test_truncated_safetensors(tmp_path):
    _trained("llama", nora.NoraConfig(r=12, inner_r=3)).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(nora.AdapterError, match="corrupt or truncated"):
        nora.AdaptedModel.from_pretrained(BUILDERS["llama"](), tmp_path)


def test_garbage_safetensors(tmp_path):
    _trained("llama", nora.NoraConfig(r=12, inner_r=3)).save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(nora.AdapterError, match="corrupt or truncated"):
        nora.AdaptedModel.from_pretrained(BUILDERS["llama"](), tmp_path)


def test_wrong_tensor_shape_in_file(tmp_path):
    _trained("llama", nora.NoraConfig(r=12, inner_r=3)).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("inner_A"))
    tensors[key] = torch.zeros(5, 5)
    save_file(tensors, path)
    with pytest.raises(nora.AdapterError, match="does not belong to this configuration"):
        nora.AdaptedModel.from_pretrained(BUILDERS["llama"](), tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(nora.AdapterError, match="no adapter_config.json"):
        nora.AdaptedModel.from_pretrained(BUILDERS["llama"](), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(nora.AdapterError, match="not valid JSON"):
        nora.AdaptedModel.from_pretrained(BUILDERS["llama"](), tmp_path)


def test_nan_in_a_weight_at_svd():
    base = BUILDERS["llama"]()
    with torch.no_grad():
        base.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    with pytest.raises(nora.AdapterError, match=r"model.layers.1.mlp.up_proj.*NaN/Inf"):
        nora.get_peft_model(base, nora.NoraConfig(r=12, inner_r=3))


def test_bad_config_values():
    with pytest.raises(nora.AdapterError, match="placement"):
        nora.NoraConfig(placement="middle")
    with pytest.raises(nora.AdapterError, match="solver"):
        nora.NoraConfig(svd="fast")
    with pytest.raises(nora.AdapterError, match="fraction"):
        nora.NoraConfig(r=1.5)


def test_save_is_atomic_and_keeps_the_old_adapter_on_failure(tmp_path, monkeypatch):
    model = _trained("llama", nora.NoraConfig(r=12, inner_r=3))
    model.save_pretrained(tmp_path / "adapter")
    before = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    import nora.atomic as atomic

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(atomic, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_config_round_trips_through_json(tmp_path):
    cfg = nora.NoraConfig(r=0.5, inner_r=2, inner="out", awsvd=True, target_modules=["q_proj", "v_proj"])
    assert nora.AdapterConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert Path(nora.__file__).exists()
