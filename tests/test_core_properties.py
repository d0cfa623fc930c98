"""Property tests of the core (hypothesis): for random shapes, ranks, methods and options,

* every method's forward and merged weight equal its METHODS.md formula, written out here in numpy (float64);
* merge → unmerge restores the base weight, and the merged forward equals the unmerged one;
* export_lora reproduces ΔW, loaded by PEFT itself (DoRA: PEFT's DoRA with the exported magnitude);
* save_pretrained → from_pretrained / load_adapter (module or resident) on a fresh base gives identical outputs;
* chain.py's chosen multiplication order equals the naive left-to-right dense product (that it is the cheapest:
  test_chain_order.py, against brute force);
* a mixed batch (adapter_names=, the base included) equals running each row alone.

The bases are tiny stacks of nn.Linear (with or without bias) and GPT-2 Conv1D layers in float64. Every trainable
tensor is moved off its init, so no method is tested at ΔW = 0. Examples are derandomized and bounded so the file
runs in seconds.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ref_place, ref_svd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import nora
from nora.chain import (
    Term,
    chain_apply,
    chain_product,
    terms_add,
    terms_apply,
    terms_lora_pair,
    terms_product,
)
from nora.svd import BASIS_CACHE


def _props(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


METHODS = ("lora", "pissa", "dora", "lora-xs", "nora", "svfit")
PLACEMENTS = ("sqrt", "out", "in", "none")
KINDS = ("linear", "linear-nobias", "conv1d")

# ---- tiny bases ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    kinds: tuple[str, ...]  # one per layer
    dims: tuple[int, ...]  # layer i maps dims[i] → dims[i + 1]
    targets: tuple[int, ...]  # the adapted layers
    seed: int

    @property
    def names(self) -> list[str]:
        return [f"layers.{i}" for i in self.targets]

    @property
    def min_dk(self) -> int:
        return min(min(self.dims[i], self.dims[i + 1]) for i in self.targets)


class Tiny(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        layers = []
        for kind, k, d in zip(spec.kinds, spec.dims, spec.dims[1:], strict=False):
            layers.append(Conv1D(d, k) if kind == "conv1d" else nn.Linear(k, d, bias=kind == "linear"))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x if i == 0 else torch.tanh(x))
        return x


def build(spec: Spec) -> Tiny:
    """The same float64 base for the same spec, every time (weights drawn from spec.seed)."""
    model = Tiny(spec).double().eval()
    g = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / math.sqrt(p.shape[0]))
    return model


def oriented(layer: nn.Module) -> torch.Tensor:
    """d × k weight of a plain Linear / Conv1D."""
    return layer.weight.T if isinstance(layer, Conv1D) else layer.weight


def inputs(spec: Spec, rows: int, seed: int = 1, seq: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (rows, spec.dims[0]) if seq is None else (rows, seq, spec.dims[0])
    return torch.randn(shape, generator=g, dtype=torch.float64)


def calibration(spec: Spec) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(spec.seed + 7)
    spread = torch.linspace(0.2, 3.0, spec.dims[0], dtype=torch.float64)
    return [torch.randn(4, spec.dims[0], generator=g, dtype=torch.float64) * spread for _ in range(2)]


def add(model_or_base, spec: Spec, config, name: str):
    """get_peft_model (given a plain base) or add_adapter, with calibration data where the config asks for it."""
    calib = calibration(spec) if getattr(config, "awsvd", False) else None
    if isinstance(model_or_base, nora.AdaptedModel):
        model_or_base.add_adapter(name, config, calibration_data=calib)
        return model_or_base
    return nora.get_peft_model(model_or_base, config, adapter_name=name, calibration_data=calib)


def perturb(model: nora.AdaptedModel, name: str, seed: int, scale: float = 0.3) -> None:
    """Move every tensor of adapter `name` off its init (trainable or not)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers().values():
            if name in layer.adapters:
                for p in layer.adapters[name].parameters():
                    p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def assert_near(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """|got − want| ≤ tol · (1 + max|want|) elementwise."""
    scale = 1.0 + float(want.abs().max()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=0.0, atol=tol * scale)


# ---- strategies ------------------------------------------------------------------------------------------------


@st.composite
def specs(draw, max_layers: int = 2) -> Spec:
    n = draw(st.integers(1, max_layers))
    dims = tuple(draw(st.lists(st.integers(2, 24), min_size=n + 1, max_size=n + 1)))
    kinds = tuple(draw(st.lists(st.sampled_from(KINDS), min_size=n, max_size=n)))
    targets = tuple(sorted(draw(st.sets(st.integers(0, n - 1), min_size=1))))
    return Spec(kinds, dims, targets, draw(st.integers(0, 2**16)))


# Every method and notable option, as (method, fixed options): pytest enumerates these, so each is run whatever
# hypothesis draws (left alone it favours the first of a sampled_from); hypothesis draws the rest.
VARIANTS = {
    "lora": ("lora", {}),
    "lora-rslora": ("lora", {"use_rslora": True}),
    "pissa": ("pissa", {}),
    "dora": ("dora", {}),
    **{f"lora-xs-{p}": ("lora-xs", {"placement": p}) for p in PLACEMENTS},
    **{
        f"nora-{i}-{p}": ("nora", {"inner": i, "placement": p, "awsvd": False})
        for i in ("serial", "out")
        for p in PLACEMENTS
    },
    "nora-serial-awsvd": ("nora", {"inner": "serial", "awsvd": True}),
    "nora-out-awsvd": ("nora", {"inner": "out", "awsvd": True}),
    "nora-rslora-randn": ("nora", {"use_rslora": True, "inner_init": "randn"}),
    "svfit-rank": ("svfit", {"energy_rank": False}),
    "svfit-energy": ("svfit", {"energy_rank": True, "energy_measure": "squared"}),
    "svfit-energy-sum": ("svfit", {"energy_rank": True, "energy_measure": "sum"}),
}
# One per method (options drawn) for the multi-adapter properties.
PER_METHOD = {
    "lora": ("lora", {}),
    "pissa": ("pissa", {}),
    "dora": ("dora", {}),
    "lora-xs": ("lora-xs", {}),
    "nora-serial": ("nora", {"inner": "serial"}),
    "nora-out": ("nora", {"inner": "out"}),
    "svfit": ("svfit", {}),
}


@st.composite
def configs(draw, spec: Spec, variant: tuple[str, dict] | None = None, exact: bool = False):
    """A config of `variant` (else any method), its other options drawn, a rank valid on every target layer."""
    method, fixed = variant or draw(st.sampled_from(list(PER_METHOD.values())))

    def pick(name: str, strategy):
        return fixed[name] if name in fixed else draw(strategy)

    m = spec.min_dk
    common: dict = {"target_modules": spec.names, "svd_dtype": "float64"}
    if exact:
        common["svd"] = "exact"
    else:  # the randomized solver with little oversampling is approximate: only self-consistency is tested
        common.update(
            svd=draw(st.sampled_from(["randomized", "exact"])),
            niter=draw(st.integers(0, 3)),
            oversample=draw(st.integers(0, 8)),
            seed=draw(st.integers(0, 9)),
        )
    if method != "svfit":
        common["alpha"] = draw(st.sampled_from([3.0, None, 0.5, 16.0]))
        common["use_rslora"] = pick("use_rslora", st.booleans())
    r = draw(st.one_of(st.integers(1, m), st.floats(0.05, 1.0)))
    r_min = max(1, int(r * m)) if isinstance(r, float) else r
    if method == "lora":
        return nora.LoraConfig(r=r, **common)
    if method == "dora":
        return nora.DoraConfig(r=r, **common)
    if method == "pissa":
        return nora.PissaConfig(r=r, **common)
    if method == "lora-xs":
        return nora.LoraXSConfig(
            r=r,
            placement=pick("placement", st.sampled_from(PLACEMENTS)),
            core_init=pick("core_init", st.sampled_from(["normal", "zeros"])),
            **common,
        )
    if method == "nora":
        return nora.NoraConfig(
            r=r,
            inner_r=draw(st.integers(1, r_min)),
            inner=pick("inner", st.sampled_from(["serial", "out"])),
            inner_init=pick("inner_init", st.sampled_from(["kaiming", "randn"])),
            placement=pick("placement", st.sampled_from(PLACEMENTS)),
            awsvd=pick("awsvd", st.booleans()),
            awsvd_power=draw(st.sampled_from([0.5, 1.0, 2.0])),
            **common,
        )
    assert method == "svfit"
    if not pick("energy_rank", st.booleans()):
        return nora.SVFitConfig(r=r, **common)
    return nora.SVFitConfig(
        r=None,
        energy=draw(st.floats(0.3, 1.0)),
        energy_measure=pick("energy_measure", st.sampled_from(["squared", "sum"])),
        **common,
    )


@st.composite
def adapter_sets(draw, spec: Spec, variant: tuple[str, dict], max_others: int = 2):
    """A first adapter of `variant`, usually a sibling on its basis (same config up to alpha), then up to
    `max_others` adapters of any method."""
    first = draw(configs(spec, variant))
    out = [first]
    if draw(st.integers(0, 3)) > 0:
        out.append(dataclasses.replace(first, alpha=draw(st.sampled_from([5.0, 1.0]))))
    for _ in range(draw(st.integers(0, max_others))):
        out.append(draw(configs(spec)))
    return out


# ---- the METHODS.md formulas, by hand (numpy, float64) ---------------------------------------------------------


def ref_rank(cfg, W: np.ndarray) -> int:
    d, k = W.shape
    if cfg.method == "svfit" and cfg.r is None:
        S = np.linalg.svd(W, compute_uv=False)
        mass = S**2 if cfg.energy_measure == "squared" else S
        return int(np.argmax(np.cumsum(mass) / mass.sum() >= cfg.energy - 1e-12)) + 1
    return max(1, int(cfg.r * min(d, k))) if isinstance(cfg.r, float) else cfg.r


def ref_scale(cfg, r: int) -> float:
    if cfg.method == "svfit":
        return 1.0
    alpha = cfg.alpha if cfg.alpha is not None else r
    return alpha / math.sqrt(r) if cfg.use_rslora else alpha / r


def ref_delta(cfg, W0: np.ndarray, p: dict[str, np.ndarray], a: np.ndarray | None) -> np.ndarray:
    """ΔW = W_effective − W0 for one layer, from the adapter's tensors `p` and the AwSVD scales `a`."""
    r = ref_rank(cfg, W0)
    s = ref_scale(cfg, r)
    if cfg.method in ("lora", "dora"):
        V = W0 + s * p["lora_B"] @ p["lora_A"]
        if cfg.method == "lora":
            return V - W0
        return p["magnitude"][:, None] * V / np.linalg.norm(V, axis=1, keepdims=True) - W0
    U, S, Vt = ref_svd(W0 if a is None else W0 * a[None, :], r)
    if cfg.method == "pissa":
        B0, A0 = ref_place(U, S, Vt, "sqrt")
        return s * (p["lora_B"] @ p["lora_A"] - B0 @ A0)  # W_base = W0 − s·B0·A0, plus s·B·A
    if cfg.method == "svfit":
        return U @ np.diag(p["sigma"] - S) @ Vt  # W_e + U σ Vᵀ − W0
    Bo, Ao = ref_place(U, S, Vt, cfg.placement)
    if a is not None:
        Ao = Ao / a[None, :]
    if cfg.method == "lora-xs":
        return s * Bo @ p["core"] @ Ao
    inner = p["inner_B"] @ p["inner_A"]
    return s * (Bo @ inner @ Ao if cfg.inner == "serial" else inner @ Bo @ Ao)


def ref_awsvd_scales(spec: Spec, cfg) -> dict[int, np.ndarray]:
    """a_j = mean_tokens |x_j| ^ p (clamped), kept in float32, from the plain base's inputs to each layer."""
    base = build(spec)
    seen: dict[int, list[np.ndarray]] = {i: [] for i in range(len(spec.kinds))}
    with torch.no_grad():
        for x in calibration(spec):
            h = x
            for i, layer in enumerate(base.layers):
                h = h if i == 0 else torch.tanh(h)
                seen[i].append(h.numpy())
                h = layer(h)
    out = {}
    for i, xs in seen.items():
        mean = np.mean(np.abs(np.concatenate(xs)), axis=0)
        out[i] = np.maximum(mean**cfg.awsvd_power, cfg.awsvd_eps).astype(np.float32).astype(np.float64)
    return out


# ---- (0) each method's forward and merge against its formula ---------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@_props(5)
@given(data=st.data(), spec=specs())
def test_forward_and_merge_match_the_formula(variant, data, spec):
    method = VARIANTS[variant][0]
    cfg = data.draw(configs(spec, VARIANTS[variant], exact=True))
    model = add(build(spec), spec, cfg, "a")
    perturb(model, "a", seed=spec.seed)
    scales = ref_awsvd_scales(spec, cfg) if getattr(cfg, "awsvd", False) else {}
    x = inputs(spec, 5)
    deltas = {}
    for i, name in zip(spec.targets, spec.names, strict=True):
        layer = model.layers()[name]
        core = layer.adapters["a"]
        W0 = layer.base_weight().detach().numpy().copy()
        assert core.r == ref_rank(cfg, W0)
        basis = layer.basis_of(core)
        if i in scales:  # the calibrated scales are the spec's (then the reference uses its own)
            np.testing.assert_allclose(basis.scales.numpy(), scales[i], rtol=1e-6)
        p = {k: v.detach().numpy() for k, v in core.params.items()}
        dW = ref_delta(cfg, W0, p, scales.get(i))
        assert np.abs(dW).max() > 1e-4, "the perturbed adapter must change the weight"
        deltas[name] = dW
        # the layer's own forward (2-D and 3-D inputs) equals x (W0 + ΔW)ᵀ + b
        b = 0.0 if layer.bias is None else layer.bias.detach().numpy()
        h = torch.randn(5, W0.shape[1], generator=torch.Generator().manual_seed(i), dtype=torch.float64).numpy()
        want = h @ (W0 + dW).T + b
        got = layer(torch.from_numpy(h)).detach().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * (1 + np.abs(want).max()))
        got3 = layer(torch.from_numpy(h).reshape(5, 1, -1)).detach().numpy()
        np.testing.assert_allclose(got3[:, 0], got, rtol=1e-12, atol=1e-12 * (1 + np.abs(want).max()))
        if method != "dora":  # the layer's ΔW (its dense chain product)
            np.testing.assert_allclose(
                layer.delta_weight("a").detach().numpy(), dW, rtol=0, atol=1e-9 * (1 + np.abs(dW).max())
            )
    y = model(x).detach()
    model.merge()
    for name, dW in deltas.items():
        layer = model.layers()[name]
        W0 = oriented(build(spec).get_submodule(name)).detach().numpy()
        merged = layer.base_weight().detach().numpy()
        np.testing.assert_allclose(merged - W0, dW, rtol=0, atol=1e-9 * (1 + np.abs(dW).max()))
    assert_near(model(x).detach(), y, 1e-10)


# ---- (1) merge → unmerge ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", PER_METHOD)
@_props(6)
@given(data=st.data(), spec=specs())
def test_merge_unmerge_restores_the_base(variant, data, spec):
    cfgs = data.draw(adapter_sets(spec, PER_METHOD[variant]))
    names = [f"a{i}" for i in range(len(cfgs))]
    model = None
    for name, cfg in zip(names, cfgs, strict=True):
        model = add(model or build(spec), spec, cfg, name)
        perturb(model, name, seed=spec.seed + int(name[1:]))
    assert model is not None
    active = data.draw(st.permutations(names).flatmap(lambda p: st.integers(1, len(p)).map(lambda n: p[:n])))
    model.set_adapter(active)
    x = inputs(spec, 4, seq=data.draw(st.integers(1, 3)))
    originals = {n: oriented(l.base_layer).detach().clone() for n, l in model.layers().items()}
    with torch.no_grad():
        with model.disable_adapter():
            y_base = model(x)
        y = model(x)
    assert (y - y_base).abs().max() > 1e-6, "the perturbed adapters must change the output"

    model.merge()
    changed = max((oriented(l.base_layer) - originals[n]).abs().max().item() for n, l in model.layers().items())
    assert changed > 1e-6
    # A DoRA adapter merged after another one renormalises that one's update too (its norm is of the weight it
    # is merged into), while the unmerged forward normalises W0 + its own update only: the two differ by design.
    dora_after_other = any(cfgs[names.index(n)].method == "dora" for n in active[1:])
    with torch.no_grad():
        if not dora_after_other:
            assert_near(model(x), y, 1e-10)
        model.unmerge()
        for n, layer in model.layers().items():
            assert_near(oriented(layer.base_layer), originals[n], 1e-12)
        assert_near(model(x), y, 1e-10)
        with model.disable_adapter():
            assert_near(model(x), y_base, 1e-12)
    if not dora_after_other:
        plain = model.merge_and_unload()
        assert not any(isinstance(m, nora.AdapterLayer) for m in plain.modules())
        with torch.no_grad():
            assert_near(plain(x), y, 1e-10)


# ---- (2) export to a standard PEFT LoRA adapter ----------------------------------------------------------------


@pytest.mark.parametrize("variant", PER_METHOD)
@_props(5)
@given(data=st.data(), spec=specs())
def test_export_lora_reproduces_the_update_in_peft(variant, data, spec):
    method = PER_METHOD[variant][0]
    cfg = data.draw(configs(spec, PER_METHOD[variant]))
    model = add(build(spec), spec, cfg, "default")
    perturb(model, "default", seed=spec.seed)
    x = inputs(spec, 4, seq=2)
    with torch.no_grad():
        y = model(x)
        y_base = build(spec)(x)
    with tempfile.TemporaryDirectory() as tmp:
        model.export_lora(Path(tmp) / "peft")
        tensors = {k: v.double() for k, v in load_file(Path(tmp) / "peft" / "adapter_model.safetensors").items()}
        peft_model = PeftModel.from_pretrained(build(spec), str(Path(tmp) / "peft")).eval()
        with torch.no_grad():
            got = peft_model(x)
    # ΔW itself: B·A (scale folded in, lora_alpha = r) from the file, against the adapter's own update
    for name, layer in model.layers().items():
        core = layer.adapters["default"]
        A = tensors[f"base_model.model.{name}.lora_A.weight"]
        B = tensors[f"base_model.model.{name}.lora_B.weight"]
        bound = {"pissa": 2 * core.r, "nora": getattr(cfg, "inner_r", 0)}.get(method, core.r)
        assert A.shape[0] <= bound  # exact and low-rank: the core's rank (PiSSA's two terms stack)
        if method == "dora":
            lora = core.scale * core["lora_B"] @ core["lora_A"]
            torch.testing.assert_close(
                tensors[f"base_model.model.{name}.lora_magnitude_vector"],
                core["magnitude"].detach(),
                rtol=1e-6,
                atol=1e-7,
            )
        else:
            lora = layer.delta_weight("default")
        assert_near(B @ A, lora.detach(), 1e-6)  # stored in float32
    assert (y - y_base).abs().max() > 1e-5
    torch.testing.assert_close(got, y, rtol=1e-5, atol=1e-5 * (1 + float(y.abs().max())))


# ---- (3) save → load -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", PER_METHOD)
@_props(4)
@given(data=st.data(), spec=specs())
def test_save_then_load_gives_identical_outputs(variant, data, spec):
    cfgs = data.draw(adapter_sets(spec, PER_METHOD[variant], max_others=1))
    names = ["default"] + [f"extra{i}" for i in range(1, len(cfgs))]
    model = None
    for i, (name, cfg) in enumerate(zip(names, cfgs, strict=True)):
        model = add(model or build(spec), spec, cfg, name)
        perturb(model, name, seed=spec.seed + i)
    assert model is not None
    x = inputs(spec, 3, seq=2)
    want = {}
    with torch.no_grad():
        for name in names:
            model.set_adapter(name)
            want[name] = model(x)
    trainable = data.draw(st.booleans())
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        BASIS_CACHE.clear()  # the bases are recomputed from the fresh base's weights
        fresh = nora.AdaptedModel.from_pretrained(build(spec), tmp, is_trainable=trainable)
        # the same files again as inference-only adapters (resident slots for NoRA-serial, LoRA-XS, SVFit)
        for name in names:
            fresh.load_adapter(Path(tmp) / ("" if name == "default" else name), "r_" + name)
        for name in names[1:]:
            fresh.load_adapter(Path(tmp) / name, name, is_trainable=trainable)
    for n, p in fresh.named_parameters():
        assert p.requires_grad == (trainable and ".adapters.default." in n), n
    rows = ["r_" + n for n in names] + [nora.BASE] + names
    xr = inputs(spec, len(rows), seed=spec.seed, seq=2)
    with torch.no_grad():
        mixed = fresh(xr, adapter_names=rows)
        for i, name in enumerate(rows):
            if name == nora.BASE:
                with model.disable_adapter():
                    alone = model(xr[i : i + 1])
            else:
                model.set_adapter(name.removeprefix("r_"))
                alone = model(xr[i : i + 1])
            assert_near(mixed[i : i + 1], alone, 1e-12)
        for name in names:
            for loaded in (name, "r_" + name):  # a module adapter; a resident one turned into modules
                fresh.set_adapter(loaded)
                got = fresh(x)
                assert torch.equal(got, want[name]), (loaded, (got - want[name]).abs().max())


# ---- (4) the chain's chosen order against the naive one --------------------------------------------------------


@st.composite
def chains(draw, p0: int, pn: int, gen: torch.Generator) -> list[torch.Tensor]:
    """M_1 … M_n (n ≤ 5) from p0 to pn; a square factor may be a 1-D diagonal; any may be a Parameter."""
    n = draw(st.integers(1, 5))
    dims = [p0]
    for _ in range(n - 1):
        dims.append(draw(st.one_of(st.just(dims[-1]), st.just(pn), st.integers(1, 24))))  # squares: diagonals
    dims.append(pn)
    out = []
    for a, b in zip(dims, dims[1:], strict=False):
        diag = a == b and draw(st.booleans())
        t = torch.randn((a,) if diag else (a, b), generator=gen, dtype=torch.float64)
        out.append(nn.Parameter(t) if draw(st.booleans()) else t)
    return out


def naive_dense(chain: list[torch.Tensor]) -> torch.Tensor:
    dense = torch.eye(chain[0].shape[0], dtype=torch.float64)
    for m in chain:
        dense = dense @ (torch.diag(m) if m.dim() == 1 else m)
    return dense


@st.composite
def term_lists(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    p0, pn = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    n = draw(st.integers(1, 3))
    coefs = draw(st.lists(st.sampled_from([1.0, -1.0, 0.37, 2.5]), min_size=n, max_size=n))
    terms = [(c, draw(chains(p0, pn, gen))) for c in coefs]
    lead = tuple(draw(st.lists(st.integers(1, 7), max_size=2)))
    x = torch.randn(*lead, pn, generator=gen, dtype=torch.float64)
    return terms, x


@_props(100)
@given(case=term_lists())
def test_chain_order_equals_the_naive_order(case):
    terms, x = case
    dense = {id(ch): naive_dense(ch) for _, ch in terms}
    for _, chain in terms:  # one chain: forward and dense product
        want = x @ dense[id(chain)].T
        got = chain_apply(chain, x)
        assert got.shape == want.shape
        assert_near(got, want.detach(), 1e-11)
        assert_near(chain_product(chain).detach(), dense[id(chain)].detach(), 1e-11)
    delta = sum(c * dense[id(ch)] for c, ch in terms)
    as_terms = [Term(c, ch) for c, ch in terms]
    assert_near(terms_product(as_terms).detach(), delta.detach(), 1e-11)
    assert_near(terms_apply(as_terms, x).detach(), (x @ delta.T).detach(), 1e-11)
    out = torch.randn(*x.shape[:-1], delta.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    got = terms_add(out, as_terms, x)
    want = out + x @ delta.T
    assert_near(got.detach(), want.detach(), 1e-11)
    # gradients through the chosen (fused) order equal those through the naive one
    params = [m for _, ch in terms for m in ch if isinstance(m, nn.Parameter)]
    if params:
        w = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
        g_fast = torch.autograd.grad((got * w).sum(), params, allow_unused=True)
        g_naive = torch.autograd.grad((want * w).sum(), params, allow_unused=True)
        for a, b in zip(g_fast, g_naive, strict=True):
            assert_near(a, b, 1e-10)
    # the exact low-rank split: B·A = ΔW, each chain cut at its narrowest inner dimension
    B, A = terms_lora_pair([Term(c, [m.detach() for m in ch]) for c, ch in terms])
    assert_near(B @ A, delta.detach(), 1e-11)
    widths = [min(m.shape[-1] for m in ch[:-1]) if len(ch) > 1 else ch[0].shape[-1] for _, ch in terms]
    assert A.shape[0] == B.shape[1] == sum(widths)


# ---- (5) mixed batches -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("variant", PER_METHOD)
@_props(4)
@given(data=st.data(), spec=specs())
def test_mixed_batch_equals_each_row_alone(variant, grad, data, spec):
    cfgs = data.draw(adapter_sets(spec, PER_METHOD[variant]))
    names = [f"a{i}" for i in range(len(cfgs))]
    model = None
    for name, cfg in zip(names, cfgs, strict=True):
        model = add(model or build(spec), spec, cfg, name)
        perturb(model, name, seed=spec.seed + 11 * int(name[1:]))
    assert model is not None
    rows = data.draw(st.permutations([*names, nora.BASE]))  # every adapter and the base, then repeats
    rows += data.draw(st.lists(st.sampled_from([*names, nora.BASE]), max_size=3))
    expand = data.draw(st.integers(1, 2))  # generate() repeats each row (beams)
    x = inputs(spec, len(rows) * expand, seed=spec.seed, seq=data.draw(st.integers(1, 3)))
    with torch.set_grad_enabled(grad):  # no grad: the shared-basis stacked path; grad: one adapter at a time
        mixed = model(x, adapter_names=rows)
    with torch.no_grad():
        for i, name in enumerate(rows):
            part = x[i * expand : (i + 1) * expand]
            if name == nora.BASE:
                with model.disable_adapter():
                    alone = model(part)
            else:
                model.set_adapter(name)
                alone = model(part)
            assert_near(mixed[i * expand : (i + 1) * expand].detach(), alone, 1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init_then_perturbed(method):
    """What the properties rely on: each method is the base at init, and `perturb` moves it off."""
    spec = Spec(("linear",), (6, 5), (0,), 3)
    cfg = {
        "lora": nora.LoraConfig(r=2, target_modules=spec.names),
        "pissa": nora.PissaConfig(r=2, target_modules=spec.names),
        "dora": nora.DoraConfig(r=2, target_modules=spec.names),
        "lora-xs": nora.LoraXSConfig(r=2, core_init="zeros", target_modules=spec.names),
        "nora": nora.NoraConfig(r=3, inner_r=1, target_modules=spec.names),
        "svfit": nora.SVFitConfig(r=2, target_modules=spec.names),
    }[method]
    model = add(build(spec), spec, cfg, "a")
    x = inputs(spec, 3)
    with torch.no_grad():
        before = model(x)
        torch.testing.assert_close(before, build(spec)(x))  # identity at init
        perturb(model, "a", seed=0)
        assert (model(x) - before).abs().max() > 1e-3
