"""The mixed-batch evaluator: every linear method's own terms, given a core whose tensors and scale carry a leading
rows axis (a CoreView of a slot store), evaluate per row to exactly what that row's adapter gives alone."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nora
from nora.chain import terms_apply, terms_apply_rows
from nora.layer import AdapterLayer
from nora.methods import METHODS, CoreView

CONFIGS = {
    "lora": lambda r, alpha: nora.LoraConfig(r=r, alpha=alpha),
    "pissa": lambda r, alpha: nora.PissaConfig(r=r, alpha=alpha),
    "lora-xs": lambda r, alpha: nora.LoraXSConfig(r=r, alpha=alpha),
    "nora": lambda r, alpha: nora.NoraConfig(r=r, inner_r=max(1, r // 2), alpha=alpha),
    "nora-out": lambda r, alpha: nora.NoraConfig(r=r, inner_r=max(1, r // 2), alpha=alpha, inner="out"),
    "nora-diag": lambda r, alpha: nora.NoraConfig.authors(r=r, inner_r=max(1, r // 2), alpha=alpha),
    "nora-diag-out": lambda r, alpha: nora.NoraConfig.authors(r=r, inner_r=max(1, r // 2), alpha=alpha, inner="out"),
    "svfit": lambda r, alpha: nora.SVFitConfig(r=r),
}


def test_every_linear_method_is_covered():
    linear = {name for name, m in METHODS.items() if m.variant is None and m.adapts_layers}
    assert linear <= {c.split("-")[0] if c.startswith("nora") else c for c in CONFIGS}, "add it to CONFIGS"


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(sorted(CONFIGS)),
    d=st.integers(2, 12),
    k=st.integers(2, 12),
    rows=st.integers(1, 5),
    tokens=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
@torch.no_grad()
def test_rows_of_a_stacked_core_equal_each_adapter_alone(kind, d, k, rows, tokens, seed, data):
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(k, d, dtype=torch.float64)
    base.weight.copy_(torch.randn(d, k, generator=gen, dtype=torch.float64))
    layer = AdapterLayer(base, "layer")
    r = data.draw(st.integers(1, min(d, k)))
    cores = []
    for i in range(rows):
        config = CONFIGS[kind](r, float(data.draw(st.sampled_from([1, 2, 8]))))
        core = layer.add_adapter(f"a{i}", config, METHODS[config.method])
        for p in core.params.values():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        cores.append(core)
    method, basis = cores[0].method, layer.basis_of(cores[0])
    view = CoreView(
        {n: torch.stack([c[n] for c in cores]) for n in cores[0].params},
        torch.tensor([c.scale for c in cores], dtype=torch.float64),
        cores[0].config,
    )
    x = torch.randn(rows, tokens, k, generator=gen, dtype=torch.float64)
    got = terms_apply_rows(method.terms(view, basis), x)
    for i, core in enumerate(cores):
        want = terms_apply(method.terms(core, basis), x[i])
        torch.testing.assert_close(got[i], want, rtol=1e-10, atol=1e-10)
