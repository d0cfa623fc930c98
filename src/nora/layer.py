"""AdapterLayer: wraps one nn.Linear (or transformers' Conv1D) and holds any number of named adapters.

Outer bases are kept apart from adapters (`bases` keyed by fingerprint, `adapters` by name), so adapters of the
same method and rank share one basis. The base weight is never rewritten except by an explicit merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .basis import OuterBasis, SVDRequest, basis_fingerprint, compute_factors, make_basis, svd_key
from .config import AdapterConfig
from .errors import AdapterError
from .methods import AdapterCore, Method
from .store import CoreStack
from .svd import fingerprint, weight_digest

BASE = "__base__"


@dataclass
class AdapterPlan:
    r: int
    key: str  # the fingerprint written to the adapter file
    basis_key: str | None = None  # key in AdapterLayer.bases
    request: SVDRequest | None = None  # the SVD still to compute
    scales: torch.Tensor | None = None


def conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_adaptable(module: nn.Module) -> bool:
    conv = conv1d_type()
    return isinstance(module, nn.Linear) or (conv is not None and isinstance(module, conv))


def oriented_weight(module: nn.Module) -> torch.Tensor:
    """A Linear's or Conv1D's weight as d × k (out × in)."""
    if isinstance(module, AdapterLayer):
        return module.base_weight()
    conv = conv1d_type()
    return module.weight.T if conv is not None and isinstance(module, conv) else module.weight


def _param_dtype(w: torch.dtype) -> torch.dtype:
    """Adapter tensors train in float32 under half-precision weights (as PEFT's autocast_adapter_dtype)."""
    return w if w in (torch.float32, torch.float64) else torch.float32


class AdapterLayer(nn.Module):
    def __init__(self, base_layer: nn.Module, name: str = "") -> None:
        super().__init__()
        if not is_adaptable(base_layer):
            raise AdapterError(f"{name}: {type(base_layer).__name__} is not an nn.Linear or Conv1D.")
        self.base_layer = base_layer
        self.train(base_layer.training)
        self.module_name = name
        conv = conv1d_type()
        self.transposed = conv is not None and isinstance(base_layer, conv)
        self.bases = nn.ModuleDict()
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._merge_cache: dict[str, object] = {}
        self.row_adapters: list[str] | None = None
        self.stacks: dict[tuple, CoreStack] = {}  # the resident store, per (basis, method, core shapes)
        self.disabled = False
        self.weight_digest = weight_digest(self.base_weight())

    # ---- the wrapped weight, always seen as d × k (out × in) -------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def base_weight(self) -> torch.Tensor:
        return oriented_weight(self.base_layer)

    @property
    def shape(self) -> tuple[int, int]:
        d, k = self.base_weight().shape
        return d, k

    # ---- adapters --------------------------------------------------------------------------------------------
    def plan(
        self, config: AdapterConfig, method: Method, scales: torch.Tensor | None = None, r: int | None = None
    ) -> AdapterPlan:
        """Resolve the rank and fingerprint of a new adapter, and the SVD it needs (None if none is missing).
        `r` overrides the config's rank rule (on load, where the file knows it)."""
        if self.merged_adapters:
            raise AdapterError(
                f"{self.module_name}: adapters {self.merged_adapters} are merged into the weight; unmerge() "
                "before adding another, so its SVD is taken of the original weight."
            )
        W = self.base_weight().detach()
        d, k = W.shape
        r = method.rank(config, W) if r is None else r
        if r > min(d, k):
            raise AdapterError(
                f"{self.module_name}: rank r={r} is larger than min(d, k)={min(d, k)} for this {d}×{k} weight. "
                "Use a smaller r, a fraction such as r=0.5, or leave this module out of target_modules."
            )
        if not method.uses_basis:
            return AdapterPlan(r, fingerprint(method=method.name, r=r, shape=[d, k], digest=self.weight_digest))
        settings = config.svd_settings
        key = basis_fingerprint(method.name, r, method.placement(config), settings, (d, k), self.weight_digest, scales)
        request = None
        if "b" + key not in self.bases:
            request = SVDRequest(
                svd_key(r, settings, (d, k), self.weight_digest, scales), W, r, scales, self.module_name
            )
        return AdapterPlan(r, key, "b" + key, request, scales)

    def add_adapter(
        self,
        name: str,
        config: AdapterConfig,
        method: Method,
        plan: AdapterPlan | None = None,
        factors: dict[str, torch.Tensor] | None = None,
    ) -> AdapterCore:
        """Add an adapter following `plan` (made here if not given); `factors` are its precomputed SVD."""
        plan = plan or self.plan(config, method)
        W = self.base_weight().detach()
        if plan.basis_key is not None and plan.basis_key not in self.bases:
            if factors is None:
                assert plan.request is not None
                factors = compute_factors([plan.request], config.svd_settings, config.basis_cache_dir)[plan.request.key]
            self.bases[plan.basis_key] = make_basis(W, factors, method.placement(config), plan.key, plan.scales)
        basis = self.bases[plan.basis_key] if plan.basis_key else None
        params = method.init_params(config, W, basis, plan.r, _param_dtype(W.dtype))
        core = AdapterCore(method, config, params, plan.r, plan.basis_key)
        core.train(self.training)  # follow the model's mode: a model in eval() must not start dropping out
        core.fingerprint = plan.key
        self.adapters[name] = core
        return core

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise AdapterError(f"adapter {name!r} is merged; unmerge() before deleting it.")
        core = self.adapters[name]
        del self.adapters[name]
        for stack in self.stacks.values():
            stack.remove(name)
        if core.basis_key and all(c.basis_key != core.basis_key for c in self.adapters.values()):
            del self.bases[core.basis_key]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def basis_of(self, core: AdapterCore) -> OuterBasis | None:
        return self.bases[core.basis_key] if core.basis_key else None

    def delta(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        core = self.adapters[name]
        return core.method.delta(core, self.basis_of(core), x, base_out, self)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW (d × k) of one adapter, for a method whose update is linear (all but DoRA)."""
        from .chain import terms_product

        core = self.adapters[name]
        return terms_product(core.method.terms(core, self.basis_of(core)))

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return out
        if self.row_adapters is not None:
            return self._mixed_forward(x, out, self.row_adapters)
        for name in self.active_adapters:
            if name in self.adapters and name not in self.merged_adapters:
                core = self.adapters[name]
                out = core.method.add_to(out, core, self.basis_of(core), x, self)
        return out

    def _mixed_forward(self, x: torch.Tensor, out: torch.Tensor, rows: list[str]) -> torch.Tensor:
        if self.merged_adapters:
            raise AdapterError("adapter_names= needs unmerged adapters; call unmerge() first.")
        if x.shape[0] % len(rows):
            raise AdapterError(f"adapter_names has {len(rows)} entries for a batch of {x.shape[0]} rows.")
        expand = x.shape[0] // len(rows)  # generate() with beams / several sequences repeats each row
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(rows):
            if name != BASE and name in self.adapters:
                groups.setdefault(name, []).extend(range(i * expand, (i + 1) * expand))
        shared: dict[tuple, list[str]] = {}
        for name, idx in groups.items():
            core = self.adapters[name]
            parts = None if torch.is_grad_enabled() else core.method.stack_parts(core, self.basis_of(core))
            if parts is None:
                index = torch.tensor(idx, device=x.device)
                delta = self.delta(name, x.index_select(0, index), out.index_select(0, index))
                out = out.index_add(0, index, delta.to(out.dtype))
            else:
                key = (core.basis_key, core.method.name, tuple(tuple(p.shape) for p in parts))
                shared.setdefault(key, []).append(name)
        for key, names in shared.items():
            out = self._shared_basis_rows(key, names, groups, x, out)
        return out

    def _shared_basis_rows(self, key: tuple, names: list[str], groups, x, out) -> torch.Tensor:
        """Rows of several adapters on one basis: A_o once, each row's core gathered from the store, B_o once."""
        basis = self.bases[key[0]]
        method = self.adapters[names[0]].method
        stack = self.stacks.setdefault(key, CoreStack())
        stack.sync(names, self.adapters, lambda core: [p.to(basis.A.dtype) for p in method.stack_parts(core, basis)])
        row_idx = [i for n in names for i in groups[n]]
        slots = [stack.slots[n] for n in names for _ in groups[n]]
        index = torch.tensor(row_idx, device=x.device)
        xs = x.index_select(0, index)
        h = xs.reshape(xs.shape[0], -1, xs.shape[-1]) @ basis.A.to(x.dtype).T
        h = method.apply_stacked(stack.gather(torch.tensor(slots, device=x.device)), h)
        delta = (h @ basis.B.to(h.dtype).T).reshape(*xs.shape[:-1], -1)
        return out.index_add(0, index, delta.to(out.dtype))

    # ---- merging ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: list[str]) -> None:
        for name in names:
            if name in self.merged_adapters or name not in self.adapters:
                continue
            core = self.adapters[name]
            W = self.base_weight()
            merged, cache = core.method.merge(core, self.basis_of(core), W)
            W.copy_(merged)
            self._merge_cache[name] = cache
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            core = self.adapters[name]
            W = self.base_weight()
            W.copy_(core.method.unmerge(core, self.basis_of(core), W, self._merge_cache.pop(name)))

    def extra_repr(self) -> str:
        d, k = self.shape
        return f"d={d}, k={k}, adapters={list(self.adapters)}, active={self.active_adapters}"
