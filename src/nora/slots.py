"""Slot stores: many adapters' tensors stacked on the device, one row (slot) per adapter.

A batch that mixes adapters gathers each row's core from its slot and evaluates the method's own terms on the
gathered tensors (chain.terms_apply_rows): the frozen outer factors run once over all rows. One store type,
`SlotStack` (one layer, one layout), serves both kinds of adapter, under a `SlotTable` that gives names their slots:

* `ModuleMirror` (per layer) mirrors adapters that live as modules (trainable or not). Slots are filled lazily
  from the adapters' own tensors and re-synced only when those tensors changed (autograd's version counters).
* `AdapterBank` (per model) *is* the storage of inference-only adapters loaded from files: no module per adapter
  per layer, only a row in one stack per layer, at the same slot in every layer. Loading one is a handful of copies
  into that slot; removing one moves the last slot into the hole. Neither depends on how many are resident (the
  stacks grow by doubling: amortised O(1)).

A `RowPlan` says which adapter each row of one forward uses; `rows_context` hands it to the layers for that
forward.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from .config import AdapterConfig
from .methods import AdapterCore, CoreView, Method

Layout = list[tuple[str, int, tuple[int, ...]]]  # (tensor name, first column, shape) within a row

# Config fields that change only an adapter's scale or bookkeeping: adapters differing in them share a store.
SCALE_ONLY = (
    "alpha",
    "use_rslora",
    "dropout",
    "target_modules",
    "exclude_modules",
    "base_model_name_or_path",
    "basis_cache_dir",
    "clamp_rank",
)


def core_fields(config: AdapterConfig) -> tuple:
    """The config fields a method's terms may read (all but SCALE_ONLY): equal across one store."""
    fields = config.to_dict()
    return tuple(sorted((k, repr(v)) for k, v in fields.items() if k not in SCALE_ONLY))


def make_layout(shapes: dict[str, tuple[int, ...]]) -> Layout:
    """Columns of each tensor in a row, in the given order, after the scale in column 0."""
    layout, column = [], 1
    for name, shape in shapes.items():
        layout.append((name, column, tuple(shape)))
        column += _numel(shape)
    return layout


class SlotStack(nn.Module):
    """One layer's share of a store. Row `slot` of `data` is one adapter: its scale in column 0, then its tensors
    flattened in `layout` order. A non-persistent buffer: it follows .to() and dtype casts, and stays out of state
    dicts (the adapter files, or the modules, hold the tensors)."""

    def __init__(
        self,
        method: Method,
        config: AdapterConfig,
        basis_key: str | None,
        r: int,
        fingerprint: str,
        layout: Layout,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.method = method
        self.config = config  # the first adapter's: the fields the terms read are equal across the store
        self.basis_key = basis_key
        self.r = r
        self.fingerprint = fingerprint
        self.layout = layout
        self.bank: AdapterBank | None = None  # the AdapterBank whose slots these are (None: a ModuleMirror's)
        width = 1 + sum(_numel(shape) for _, _, shape in layout)
        self.register_buffer("data", torch.empty(capacity, width, dtype=dtype, device=device), persistent=False)

    def tensors_at(self, slot: int) -> dict[str, torch.Tensor]:
        """The adapter in `slot`, as views of its row (clone before keeping them)."""
        row = self.data[slot]
        return {n: row[start : start + _numel(shape)].view(shape) for n, start, shape in self.layout}

    def write(self, slot: int, tensors: dict[str, torch.Tensor], scale: float) -> None:
        row = self.data[slot]
        for name, start, shape in self.layout:
            row[start : start + _numel(shape)].view(shape).copy_(tensors[name])
        row[0] = scale

    def view(self, slots: torch.Tensor) -> CoreView:
        """The cores in `slots` (one per row), as the method's terms read them."""
        data = self.data.index_select(0, slots)
        tensors = {n: data[:, start : start + _numel(shape)].unflatten(1, shape) for n, start, shape in self.layout}
        return CoreView(tensors, data[:, 0], self.config)

    def grow(self, capacity: int) -> None:
        data = torch.empty(capacity, self.data.shape[1], dtype=self.data.dtype, device=self.data.device)
        data[: self.data.shape[0]].copy_(self.data)
        self.data = data

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def extra_repr(self) -> str:
        return f"method={self.method.name}, r={self.r}, slots={self.data.shape[0]}"


class SlotTable:
    """Names ↔ slots, shared by the stacks in `stacks` (the same slot in each)."""

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self.slots: dict[str, int] = {}
        self.names: list[str] = []
        self.stacks: dict[str, SlotStack] = {}

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.slots

    def reserve(self, capacity: int) -> None:
        """Allocate slots for `capacity` adapters now, so no later add pays for a doubling (a copy of every
        adapter already held). Never shrinks."""
        if capacity > self.capacity:
            self.capacity = capacity
            for stack in self.stacks.values():
                stack.grow(capacity)

    def allocate(self, name: str) -> int:
        """A slot for `name`, growing every stack by doubling when all are taken."""
        slot = len(self.names)
        if slot >= self.capacity:
            self.reserve(2 * self.capacity)
        self.slots[name] = slot
        self.names.append(name)
        return slot

    @torch.no_grad()
    def remove(self, name: str) -> None:
        """Free `name`'s slot by moving the last adapter into it (one row copy per stack, others untouched)."""
        slot = self.slots.pop(name)
        last = self.names.pop()
        if last != name:
            for stack in self.stacks.values():
                stack.data[slot].copy_(stack.data[len(self.names)])
            self.names[slot] = last
            self.slots[last] = slot

    @property
    def slot_bytes(self) -> int:
        """Bytes one adapter takes (its row in every stack)."""
        return sum(s.data.shape[1] * s.data.element_size() for s in self.stacks.values())

    @property
    def nbytes(self) -> int:
        """Bytes allocated, spare slots included."""
        return sum(s.nbytes for s in self.stacks.values())


class ModuleMirror(SlotTable):
    """One layer's module adapters of one layout, copied into a stack for mixed batches."""

    def __init__(self, core: AdapterCore, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        shapes = {n: tuple(p.shape) for n, p in core.params.items()}
        self.stack = SlotStack(
            core.method, core.config, core.basis_key, core.r, core.fingerprint, make_layout(shapes), 8, dtype, device
        )
        self.stacks = {"": self.stack}
        self.versions: dict[str, tuple[int, ...]] = {}

    @staticmethod
    def key(core: AdapterCore) -> tuple:
        """The layout a core mirrors into; computed once per core (a mixed forward asks for it every layer)."""
        key = core.__dict__.get("_mirror_key")
        if key is None:
            shapes = tuple((n, tuple(p.shape)) for n, p in core.params.items())
            key = core.__dict__["_mirror_key"] = (core.basis_key, core.method.name, core_fields(core.config), shapes)
        return key

    @torch.no_grad()
    def sync(self, names: list[str], cores: dict[str, AdapterCore]) -> None:
        """Give each of `names` a slot holding its current tensors (written only if new or changed)."""
        for name in names:
            core = cores[name]
            version = tuple(p._version for p in core.params.values())
            if self.versions.get(name) == version and name in self.slots:
                continue
            slot = self.slots[name] if name in self.slots else self.allocate(name)
            self.stack.write(slot, core.params, core.scale)
            self.versions[name] = version

    def remove(self, name: str) -> None:
        if name in self.slots:
            self.versions.pop(name, None)
            super().remove(name)


class AdapterBank(SlotTable):
    """Inference-only adapters of one layout (method, config up to the scale, layers, ranks, bases) on one model.
    Adapter `name` sits in slot `slots[name]` of every layer's stack (`stacks`: layer name → its stack)."""

    _ids = itertools.count()

    def __init__(self, key: str, method: Method, config: AdapterConfig, capacity: int = 8) -> None:
        super().__init__(capacity)
        self.id = next(self._ids)
        self.key = key
        self.method = method
        self.config = config
        self.configs: dict[str, AdapterConfig] = {}  # each adapter's own (its alpha sets its scale)
        self.param_order: list[str] = []  # the method's tensor names, in the order its modules register them
        self.expected_keys: frozenset[str] = frozenset()  # the tensor names an adapter file of this layout holds
        self.file_layout: dict | None = None  # how to copy rows straight from a file of this layout (resident.py)

    def new_stack(self, basis_key, r, fingerprint, layout, dtype, device) -> SlotStack:
        stack = SlotStack(self.method, self.config, basis_key, r, fingerprint, layout, self.capacity, dtype, device)
        stack.bank = self
        return stack

    def allocate(self, name: str, config: AdapterConfig | None = None) -> int:  # type: ignore[override]
        slot = super().allocate(name)
        self.configs[name] = config or self.config
        return slot

    def remove(self, name: str) -> None:
        del self.configs[name]
        super().remove(name)

    def core(self, layer_name: str, name: str) -> AdapterCore:
        """A frozen module copy of resident adapter `name` on one layer (bit-identical tensors)."""
        stack = self.stacks[layer_name]
        tensors = stack.tensors_at(self.slots[name])
        params = {p: tensors[p].clone() for p in self.param_order}
        core = AdapterCore(self.method, self.configs[name], params, stack.r, stack.basis_key)
        core.fingerprint = stack.fingerprint
        return core.requires_grad_(False).train(False)


class RowPlan:
    """Which adapter each row of a mixed batch uses, resolved once per forward for every layer: rows of module
    adapters by name, rows of resident adapters as (row index, slot) tensors per bank."""

    def __init__(self, names: list[str], resident: dict[str, AdapterBank], base: str, layers: list) -> None:
        self.names = names
        self.layer_ids = frozenset(id(layer) for layer in layers)
        self.module_rows = any(n != base and n not in resident for n in names)
        self._base = base
        self._resident = resident
        self._groups: dict[int, tuple[list[int], list[int]]] = {}
        for i, name in enumerate(names):
            bank = resident.get(name)
            if bank is not None:
                rows, slots = self._groups.setdefault(bank.id, ([], []))
                rows.append(i)
                slots.append(bank.slots[name])
        self._tensors: dict[tuple, tuple[torch.Tensor | None, torch.Tensor]] = {}

    def covers(self, layer: nn.Module) -> bool:
        return id(layer) in self.layer_ids

    def select(self, bank_id: int, device: torch.device, expand: int):
        """(row index or None for "every row, in order", slot of each selected row) on `device`, for a batch
        whose rows repeat `expand` times (beams); None when no row uses the bank."""
        group = self._groups.get(bank_id)
        if group is None:
            return None
        key = (bank_id, device, expand)
        if key not in self._tensors:
            rows, slots = group
            index = None
            if len(rows) != len(self.names):
                index = torch.tensor([i * expand + j for i in rows for j in range(expand)], device=device)
            slot = torch.tensor([s for s in slots for _ in range(expand)], device=device)
            self._tensors[key] = (index, slot)
        return self._tensors[key]

    def module_groups(self, expand: int) -> dict[str, list[int]]:
        """Rows (expanded) of each module adapter."""
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            if name != self._base and name not in self._resident:
                groups.setdefault(name, []).extend(range(i * expand, (i + 1) * expand))
        return groups


_ROW_PLAN: ContextVar[RowPlan | None] = ContextVar("nora_row_plan", default=None)


@contextmanager
def rows_context(plan: RowPlan) -> Iterator[None]:
    """Hand `plan` to the layers it covers for the forwards run inside this block."""
    token = _ROW_PLAN.set(plan)
    try:
        yield
    finally:
        _ROW_PLAN.reset(token)


def active_plan() -> RowPlan | None:
    """The plan of the mixed batch being run, if any (modules trained whole read it: they are not layers)."""
    return _ROW_PLAN.get()


def current_plan(layer: nn.Module) -> RowPlan | None:
    plan = _ROW_PLAN.get()
    return plan if plan is not None and plan.covers(layer) else None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
