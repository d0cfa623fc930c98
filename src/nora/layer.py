"""AdapterLayer: wraps one nn.Linear (or transformers' Conv1D, or an nn.Conv2d) and holds any number of named
adapters. A Conv2d's update lives on its out × (in·kh·kw) kernel matrix and is applied as a convolution.

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

from . import quant
from .basis import OuterBasis, SVDRequest, basis_fingerprint, compute_factors, make_basis, svd_key
from .chain import Term, scaled, terms_add, terms_apply, terms_apply_rows, terms_product
from .config import AdapterConfig
from .errors import AdapterError
from .methods import AdapterCore, Method
from .slots import ModuleMirror, RowPlan, SlotStack, current_plan
from .svd import fingerprint, weight_digest

BASE = "__base__"


@dataclass
class AdapterPlan:
    r: int
    key: str  # the fingerprint written to the adapter file
    basis_key: str | None = None  # key in AdapterLayer.bases
    request: SVDRequest | None = None  # the SVD still to compute
    scales: torch.Tensor | None = None
    weight: torch.Tensor | None = None  # the W0 of the basis, where not the layer's own


def conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_adaptable(module: nn.Module) -> bool:
    conv = conv1d_type()
    return (
        isinstance(module, nn.Linear)
        or (conv is not None and isinstance(module, conv))
        or (isinstance(module, nn.Conv2d) and module.groups == 1)
    )


def is_grouped_conv(module: nn.Module) -> bool:
    """A grouped or depthwise Conv2d: its weight is `groups` separate blocks, not one out × (in·kh·kw) matrix, so
    a low-rank update of "the" weight is not defined; nora leaves such layers alone."""
    return isinstance(module, nn.Conv2d) and module.groups > 1


def oriented_weight(module: nn.Module) -> torch.Tensor:
    """A Linear's or Conv1D's weight as d × k (out × in); a Conv2d's as out × (in·kh·kw), a view of the kernel; a
    quantized layer's dequantized (a new tensor, not a view)."""
    if isinstance(module, AdapterLayer):
        return module.base_weight()
    if quant.is_quantized(module):
        return quant.dequantized(module)
    conv = conv1d_type()
    if conv is not None and isinstance(module, conv):
        return module.weight.T
    if isinstance(module, nn.Conv2d):
        return module.weight.view(module.weight.shape[0], -1)
    return module.weight


def has_own_forward(conv: nn.Conv2d) -> bool:
    """A Conv2d subclass whose forward is its own (e.g. EfficientNet's static "same" padding), not nn.Conv2d's."""
    return type(conv).forward is not nn.Conv2d.forward


def conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The input patches a Conv2d multiplies its kernel matrix with: (N, L, in·kh·kw), in the kernel's order."""
    if has_own_forward(conv):
        raise AdapterError(
            f"{type(conv).__name__} has a forward of its own (e.g. its own padding), so the patches its kernel sees "
            "are not known here: AwSVD calibration is not available for it (use awsvd=False)."
        )
    if conv.padding_mode != "zeros":
        x = nn.functional.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    else:
        padding = conv.padding
    if isinstance(padding, str):
        raise AdapterError(f"a Conv2d with padding={padding!r}: calibrate with padding given as numbers.")
    cols = nn.functional.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    return cols.transpose(1, 2)


def _split_last(term: Term) -> tuple[torch.Tensor, Term | None]:
    """The chain's input-side factor (what a convolution applies to patches), and the term without it (None when
    nothing is left: the factor was ΔW itself)."""
    if term.right:
        rest = Term(term.coef, term.core, term.left, term.right[:-1])
        return term.right[-1], rest
    if len(term.chain) == 1:
        return term.core[-1], None
    return term.core[-1], Term(term.coef, term.core[:-1], term.left, [])


def _param_dtype(w: torch.dtype) -> torch.dtype:
    """Adapter tensors train in float32 under half-precision weights (as PEFT's autocast_adapter_dtype)."""
    return w if w in (torch.float32, torch.float64) else torch.float32


class AdapterLayer(nn.Module):
    def __init__(self, base_layer: nn.Module, name: str = "") -> None:
        super().__init__()
        if is_grouped_conv(base_layer):
            raise AdapterError(
                f"{name}: a Conv2d with groups={base_layer.groups} (grouped or depthwise) takes no adapter: its weight "
                "is separate blocks, not one matrix, so a low-rank update of it is not exact. Leave it out of "
                "target_modules (or add it to exclude_modules)."
            )
        if not is_adaptable(base_layer):
            raise AdapterError(f"{name}: {type(base_layer).__name__} is not an nn.Linear, Conv1D or Conv2d.")
        self.base_layer = base_layer
        self.module_name = name
        conv = conv1d_type()
        self.transposed = conv is not None and isinstance(base_layer, conv)
        self.is_conv = isinstance(base_layer, nn.Conv2d)
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
        return oriented_weight(self.base_layer)

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
        and file_check.check_layers has checked them); `weight` is the W0 its basis comes from where that is not this
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
        variant = core.method.variant
        if self.is_conv:
            if variant is not None:  # the variant works channel-last, as on a Linear's output
                last = variant.forward(
                    core.method, core, core.dropout(x), out.movedim(1, -1), self.base_weight(), self.bias,
                    self.conv_apply,
                )  # fmt: skip
                return last.movedim(-1, 1)
            return out + self.conv_apply(self.terms(core), core.dropout(x)).movedim(-1, 1).to(out.dtype)
        if variant is not None:
            return variant.forward(core.method, core, core.dropout(x), out, self.base_weight(), self.bias, terms_apply)
        return terms_add(out, self.terms(core), core.dropout(x))

    def conv_apply(self, terms: list[Term], x: torch.Tensor) -> torch.Tensor:
        """ΔW applied as this Conv2d applies its kernel, channel-last (N, H', W', out): each chain's input-side
        factor runs as a convolution with the layer's stride, padding and dilation (its rows a kernel of the layer's
        shape), the rest of the chain as a matrix chain over the channels. Exact: a convolution is its kernel matrix
        times the input patches."""
        return self._conv_terms(terms, x, rows=False)

    def _conv_terms(self, terms: list[Term], x: torch.Tensor, rows: bool) -> torch.Tensor:
        """conv_apply, or with `rows` terms_apply_rows's per-row cores (a mixed batch: the input-side factor, then
        shared by every row, is one convolution)."""
        total = None
        for term in terms:
            if rows and not term.right:
                raise AdapterError(f"{self.module_name}: a per-row adapter on a Conv2d needs a frozen input factor.")
            first, rest = _split_last(term)
            h = self._convolve(x, first).movedim(1, -1)
            if rest is None:  # the factor was ΔW itself
                coef = term.coef
                y = h * coef.reshape(-1, 1, 1, 1).to(h.dtype) if isinstance(coef, torch.Tensor) else scaled(h, coef)
            else:
                y = terms_apply_rows([rest], h) if rows else terms_apply([rest], h)
            total = y if total is None else total + y
        assert total is not None
        return total

    def _convolve(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """x convolved as this layer convolves it, with the kernel whose flattened rows are `rows` (q × in·kh·kw)
        and no bias: (N, q, H', W'). A Conv2d subclass with a forward of its own (e.g. static "same" padding, as
        EfficientNet's) runs that forward with the kernel swapped in."""
        conv = self.base_layer
        kernel = rows.to(x.dtype).reshape(rows.shape[0], *conv.weight.shape[1:])
        if not has_own_forward(conv):
            return conv._conv_forward(x, kernel, None)
        swapped = {"weight": kernel}
        if conv.bias is not None:
            swapped["bias"] = kernel.new_zeros(rows.shape[0])
        return torch.func.functional_call(conv, swapped, (x,))

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
            if torch.is_grad_enabled() or core.method.variant is not None or self.is_conv:  # each on its own rows
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
        delta = self._conv_terms(terms, xs, rows=True).movedim(-1, 1) if self.is_conv else terms_apply_rows(terms, xs)
        delta = delta.to(out.dtype)
        return out + delta if index is None else out.index_add(0, index, delta)

    # ---- merging ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merged_weight(self, core: AdapterCore) -> tuple[torch.Tensor, Any]:
        """(the weight with `core` folded in, what unmerging it needs); the layer itself is left unchanged."""
        W = self.base_weight()
        variant = core.method.variant
        if variant is not None:
            return variant.merge(core.method, core, W)
        return W + terms_product(self.terms(core)).to(W.dtype), None

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
            variant = core.method.variant
            if variant is not None:
                W.copy_(variant.unmerge(core.method, core, W, self._merge_cache.pop(name)))
            else:
                W.copy_(W - terms_product(self.terms(core)).to(W.dtype))

    @torch.no_grad()
    def fold(self, names: list[str], dequantize: torch.dtype | None) -> tuple[nn.Module, float, float]:
        """A quantized layer with adapters `names` folded in: dequantize → add each ΔW → requantize in place (or,
        given a `dequantize` dtype, a new float nn.Linear of it). Returns (the layer, ‖rounding‖², ‖ΔW‖²)."""
        W = self.base_weight().float()
        merged = W.clone()
        for name in names:
            core = self.adapters[name]
            if core.method.variant is not None:
                merged = core.method.variant.merge(core.method, core, merged)[0].float()
            else:
                merged += terms_product(self.terms(core)).float()
        if dequantize is not None:
            return quant.float_linear(self.base_layer, merged, dequantize), 0.0, float((merged - W).square().sum())
        quant.requantize(self.base_layer, merged)
        stored = quant.dequantized(self.base_layer).float()
        return self.base_layer, float((stored - merged).square().sum()), float((merged - W).square().sum())

    def extra_repr(self) -> str:
        d, k = self.shape
        return f"d={d}, k={k}, adapters={list(self.adapters)}, banks={len(self.banks)}, active={self.active_adapters}"
