"""AdapterLayer: wraps one weight of a known layer kind (registry.KINDS: nn.Linear, transformers' Conv1D, nn.Conv2d,
one expert of a fused MoE expert stack, …) and holds any number of named adapters; it asks its kind how the weight
reads as a d × k matrix and how factors apply to the input, and the method's update (updates.py) how an adapter
changes the output and the weight.

Outer bases are kept apart from adapters (`bases` keyed by fingerprint, `adapters` by name), so adapters of the
same method and rank share one basis. Inference-only adapters loaded from files live in `banks` instead: one row
of a stacked buffer per adapter, no module each (see slots.py). The base weight is never rewritten except by an
explicit merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import quant
from ..basis import OuterBasis, SVDRequest, basis_fingerprint, compute_factors, make_basis, svd_key
from ..chain import Term, terms_product
from ..config import AdapterConfig
from ..errors import AdapterError
from ..methods import AdapterCore, Method
from ..slots import ModuleMirror, RowPlan, SlotStack, current_plan
from ..svd import fingerprint, weight_digest
from .kind import LayerKind
from .registry import kind_of
from .updates import update_of

BASE = "__base__"


@dataclass
class AdapterPlan:
    r: int
    key: str  # the fingerprint written to the adapter file
    basis_key: str | None = None  # key in AdapterLayer.bases
    request: SVDRequest | None = None  # the SVD still to compute
    scales: torch.Tensor | None = None
    weight: torch.Tensor | None = None  # the W0 of the basis, where not the layer's own


def oriented_weight(module: nn.Module) -> torch.Tensor:
    """A layer's weight as d × k (out × in), as its kind sees it (a view of the stored weight); a quantized layer's
    dequantized (a new tensor, not a view)."""
    if isinstance(module, AdapterLayer):
        return module.base_weight()
    if quant.is_quantized(module):
        return quant.dequantized(module)
    kind = kind_of(module)
    if kind is None:
        raise AdapterError(f"{type(module).__name__} is of no layer kind nora adapts.")
    return kind.weight(module)


def _param_dtype(w: torch.dtype) -> torch.dtype:
    """Adapter tensors train in float32 under half-precision weights (as PEFT's autocast_adapter_dtype)."""
    return w if w in (torch.float32, torch.float64) else torch.float32


class AdapterLayer(nn.Module):
    def __init__(self, base_layer: nn.Module, name: str = "") -> None:
        super().__init__()
        kind = kind_of(base_layer)
        if kind is None:
            raise AdapterError(f"{name}: {type(base_layer).__name__} is of no layer kind nora adapts.")
        refusal = kind.refusal(base_layer)
        if refusal is not None:
            raise AdapterError(f"{name}: {refusal}")
        self.kind: LayerKind = kind
        self.base_layer = base_layer
        self.module_name = name
        self.bases = nn.ModuleDict()
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._merge_cache: dict[str, Any] = {}
        self.mirrors: dict[tuple, ModuleMirror] = {}  # module adapters' tensors, stacked per layout for mixed batches
        self.banks = nn.ModuleDict()  # resident inference-only adapters: one SlotStack per AdapterBank
        self.disabled = False
        self.quant = quant.scheme_of(base_layer)  # None for a float layer
        if self.quant is not None:
            quant.keep_standard_layout(base_layer)
        W = self.base_weight()
        self._shape = (int(W.shape[0]), int(W.shape[1]))
        self.weight_digest = weight_digest(W)
        self.train(base_layer.training)

    # ---- the wrapped weight, always seen as d × k (out × in) -------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def base_weight(self) -> torch.Tensor:
        if quant.is_quantized(self.base_layer):
            return quant.dequantized(self.base_layer)
        return self.kind.weight(self.base_layer)

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    # ---- adapters --------------------------------------------------------------------------------------------
    def plan(
        self,
        config: AdapterConfig,
        method: Method,
        scales: torch.Tensor | None = None,
        r: int | None = None,
        key: str | None = None,
        weight: torch.Tensor | None = None,
    ) -> AdapterPlan:
        """Resolve the rank and fingerprint of a new adapter, and the SVD it needs (None if none is missing).
        `r` and `key` override the config's rank rule and the fingerprint (on load, where the file gives them
        and state.check_layers has checked them); `weight` is the W0 its basis comes from where that is not this
        layer's (an adapter trained on the quantized form of these weights: deq(Q(W0)))."""
        if self.merged_adapters:
            raise AdapterError(
                f"{self.module_name}: adapters {self.merged_adapters} are merged into the weight; unmerge() "
                "before adding another, so its SVD is taken of the original weight."
            )
        W = (self.base_weight() if weight is None else weight).detach()
        digest = self.weight_digest if weight is None else weight_digest(W)
        d, k = W.shape
        r = method.rank(config, W) if r is None else r
        if r > min(d, k):
            raise AdapterError(
                f"{self.module_name}: rank r={r} is larger than min(d, k)={min(d, k)} for this {d}×{k} weight. "
                "Use a smaller r, a fraction such as r=0.5, or leave this module out of target_modules."
            )
        if not method.uses_basis:
            return AdapterPlan(r, key or fingerprint(method=method.name, r=r, shape=[d, k], digest=digest))
        settings = config.svd_settings
        key = key or basis_fingerprint(method.name, r, method.placement(config), settings, (d, k), digest, scales)
        request = None
        if "b" + key not in self.bases:
            request = SVDRequest(svd_key(r, settings, (d, k), digest, scales), W, r, scales, self.module_name)
        return AdapterPlan(r, key, "b" + key, request, scales, None if weight is None else W)

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
        self.ensure_basis(plan, config, method, factors)
        basis = self.bases[plan.basis_key] if plan.basis_key else None
        params = method.init_params(config, W, basis, plan.r, _param_dtype(W.dtype))
        core = AdapterCore(method, config, params, plan.r, plan.basis_key)
        core.train(self.training)  # follow the model's mode: a model in eval() must not start dropping out
        core.fingerprint = plan.key
        self.adapters[name] = core
        return core

    def ensure_basis(
        self, plan: AdapterPlan, config: AdapterConfig, method: Method, factors: dict[str, torch.Tensor] | None = None
    ) -> bool:
        """Make the basis `plan` needs unless this layer holds it (from `factors`, else solving or reading the
        basis cache); True when it was made here."""
        if plan.basis_key is None or plan.basis_key in self.bases:
            return False
        if factors is None:
            assert plan.request is not None
            factors = compute_factors([plan.request], config.svd_settings, config.basis_cache_dir)[plan.request.key]
        W = (self.base_weight() if plan.weight is None else plan.weight).detach()
        self.bases[plan.basis_key] = make_basis(W, factors, method.placement(config), plan.key, plan.scales)
        self.bases[plan.basis_key].train(self.training)
        return True

    def param_dtype(self) -> torch.dtype:
        return _param_dtype(self.base_weight().dtype)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise AdapterError(f"adapter {name!r} is merged; unmerge() before deleting it.")
        core = self.adapters[name]
        del self.adapters[name]
        for mirror in self.mirrors.values():
            mirror.remove(name)
        self.release_basis(core.basis_key)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def release_basis(self, key: str | None) -> None:
        """Drop basis `key` once no adapter, module or resident, uses it."""
        if key is None or key not in self.bases:
            return
        if any(c.basis_key == key for c in self.adapters.values()):
            return
        if any(b.basis_key == key for b in self.banks.values()):
            return
        del self.bases[key]

    def add_bank(self, bank_id: int, stack: SlotStack) -> None:
        self.banks[f"bank{bank_id}"] = stack.train(self.training)

    def drop_bank(self, bank_id: int) -> None:
        stack = self.banks.pop(f"bank{bank_id}")
        self.release_basis(stack.basis_key)

    def basis_of(self, core: AdapterCore) -> OuterBasis | None:
        return self.bases[core.basis_key] if core.basis_key else None

    def terms(self, core: AdapterCore) -> list[Term]:
        return core.method.terms(core, self.basis_of(core))

    def core(self, name: str) -> AdapterCore:
        """The adapter `name` on this layer: its module, or a frozen copy of a resident adapter's slot."""
        if name in self.adapters:
            return self.adapters[name]
        for stack in self.banks.values():
            if stack.bank is not None and name in stack.bank:
                return stack.bank.core(self.module_name, name)
        raise KeyError(name)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW (d × k) of adapter `name`, for a method whose update is linear (all but DoRA)."""
        return terms_product(self.terms(self.core(name)))

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return out
        plan = current_plan(self)
        if plan is not None:
            return self._mixed_forward(x, out, plan)
        for name in self.active_adapters:
            if name in self.adapters and name not in self.merged_adapters:
                out = self._with_adapter(self.adapters[name], x, out)
        return out

    def _with_adapter(self, core: AdapterCore, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The output with one adapter applied: the training and single-adapter path."""
        return update_of(core.method).forward(self, core, core.dropout(x), out)

    def _mixed_forward(self, x: torch.Tensor, out: torch.Tensor, plan: RowPlan) -> torch.Tensor:
        if self.merged_adapters:
            raise AdapterError("adapter_names= needs unmerged adapters; call unmerge() first.")
        if x.shape[0] % len(plan.names):
            raise AdapterError(f"adapter_names has {len(plan.names)} entries for a batch of {x.shape[0]} rows.")
        expand = x.shape[0] // len(plan.names)  # generate() with beams / several sequences repeats each row
        for stack in self.banks.values():
            selected = plan.select(stack.bank.id, x.device, expand)
            if selected is not None:
                out = self._stacked_rows(stack, *selected, x, out)
        if not plan.module_rows:
            return out
        mirrored: dict[tuple, list[str]] = {}
        groups = {n: rows for n, rows in plan.module_groups(expand).items() if n in self.adapters}
        for name, rows in groups.items():
            core = self.adapters[name]
            stackable = self.kind.mirrors and update_of(core.method).stackable
            if torch.is_grad_enabled() or not stackable:  # each on its own rows
                index = torch.tensor(rows, device=x.device)
                applied = self._with_adapter(core, x.index_select(0, index), out.index_select(0, index))
                out = out.index_copy(0, index, applied.to(out.dtype))
            else:
                mirrored.setdefault(ModuleMirror.key(core), []).append(name)
        for key, names in mirrored.items():
            mirror = self.mirrors.get(key)
            if mirror is None:
                core = self.adapters[names[0]]
                mirror = self.mirrors[key] = ModuleMirror(core, self.param_dtype(), self.base_weight().device)
            mirror.sync(names, self.adapters)
            index = torch.tensor([i for n in names for i in groups[n]], device=x.device)
            slots = torch.tensor([mirror.slots[n] for n in names for _ in groups[n]], device=x.device)
            out = self._stacked_rows(mirror.stack, index, slots, x, out)
        return out

    def _stacked_rows(
        self, stack: SlotStack, index: torch.Tensor | None, slots: torch.Tensor, x: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        """Rows whose adapters sit in `stack`: each row's core gathered from its slot, the method's terms
        evaluated on all of them at once. `index` None: every row of the batch, in order."""
        xs = x if index is None else x.index_select(0, index)
        basis = self.bases[stack.basis_key] if stack.basis_key else None
        terms = stack.method.terms(stack.view(slots), basis)
        delta = self.kind.from_last(self.kind.apply(self.base_layer, terms, xs, rows=True)).to(out.dtype)
        return out + delta if index is None else out.index_add(0, index, delta)

    # ---- merging ---------------------------------------------------------------------------------------------
    def adapted_weight(self, core: AdapterCore, W: torch.Tensor) -> torch.Tensor:
        """`W` with `core` folded in, differentiably (a layer whose forward runs on its weight trains through it)."""
        return update_of(core.method).merge(self, core, W)[0]

    @torch.no_grad()
    def merged_weight(self, core: AdapterCore, W: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """(`W`, by default the layer's weight, with `core` folded in; what unmerging it needs); the layer itself is
        left unchanged."""
        return update_of(core.method).merge(self, core, self.base_weight() if W is None else W)

    @torch.no_grad()
    def merge(self, names: list[str]) -> None:
        if self.quant is not None and any(n in self.adapters and n not in self.merged_adapters for n in names):
            raise AdapterError(
                f"{self.module_name}: a {quant.describe(self.quant)} weight cannot hold W0 + ΔW exactly, so a merge "
                "that unmerge() undoes is not possible on it. merge_and_unload() folds the adapter in by "
                "dequantizing, adding ΔW and requantizing (stating the rounding), or with dequantize=True into float "
                "layers holding the exact merged weight."
            )
        for name in names:
            if name in self.merged_adapters or name not in self.adapters:
                continue
            merged, self._merge_cache[name] = self.merged_weight(self.adapters[name])
            self.base_weight().copy_(merged)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            core = self.adapters[name]
            W = self.base_weight()
            W.copy_(update_of(core.method).unmerge(self, core, W, self._merge_cache.pop(name, None)))

    @torch.no_grad()
    def fold(self, names: list[str], dequantize: torch.dtype | None) -> tuple[nn.Module, float, float]:
        """A quantized layer with adapters `names` folded in: dequantize → add each ΔW → requantize in place (or,
        given a `dequantize` dtype, a new float nn.Linear of it). Returns (the layer, ‖rounding‖², ‖ΔW‖²)."""
        W = self.base_weight().float()
        merged = W.clone()
        for name in names:
            merged = self.merged_weight(self.adapters[name], merged)[0].float()
        if dequantize is not None:
            return quant.float_linear(self.base_layer, merged, dequantize), 0.0, float((merged - W).square().sum())
        quant.requantize(self.base_layer, merged)
        stored = quant.dequantized(self.base_layer).float()
        return self.base_layer, float((stored - merged).square().sum()), float((merged - W).square().sum())

    def extra_repr(self) -> str:
        d, k = self.shape
        return f"d={d}, k={k}, adapters={list(self.adapters)}, banks={len(self.banks)}, active={self.active_adapters}"
