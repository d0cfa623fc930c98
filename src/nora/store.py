"""Resident adapter stores: the per-adapter cores of one basis, stacked on the device.

A batch that mixes many adapters projects every row through the shared A_o once, gathers each row's core from
a stack, and projects back through the shared B_o once. Two kinds of store feed that path:

* `CoreStack` (per layer) mirrors adapters that live as modules (`AdapterLayer.adapters`, trainable or not).
  Slots are filled lazily from the adapters' own tensors and re-synced only when those tensors changed
  (tracked by autograd's version counters), so adding or removing one adapter never touches the others.
* `AdapterBank` (per model) *is* the storage of inference-only adapters loaded from files: no module per
  adapter per layer, only one row of a `BankStack` buffer in every layer, at the same slot in all of them.
  Loading one is a handful of copies into that slot; removing one moves the last slot into the hole. Neither
  depends on how many adapters are resident (the buffers grow by doubling: amortised O(1)).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch
from torch import nn

from .methods import AdapterCore

if TYPE_CHECKING:
    from .config import AdapterConfig
    from .methods import Method


class CoreStack:
    def __init__(self) -> None:
        self.slots: dict[str, int] = {}
        self.names: list[str] = []
        self.tensors: list[torch.Tensor] = []
        self.versions: dict[str, tuple[int, ...]] = {}

    def __len__(self) -> int:
        return len(self.names)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def _write(self, slot: int, parts: list[torch.Tensor]) -> None:
        if not self.tensors:
            self.tensors = [torch.empty(4, *p.shape, dtype=p.dtype, device=p.device) for p in parts]
        if slot >= self.tensors[0].shape[0]:  # grow by doubling: amortised O(1) per added adapter
            self.tensors = [torch.cat([t, torch.empty_like(t)]) for t in self.tensors]
        for t, p in zip(self.tensors, parts, strict=True):
            t[slot].copy_(p)

    @torch.no_grad()
    def sync(self, names: list[str], cores: dict[str, AdapterCore], parts_of) -> None:
        """Give each of `names` a slot holding its current tensors (written only if new or changed)."""
        for name in names:
            core = cores[name]
            version = tuple(p._version for p in core.params.values())
            if self.versions.get(name) == version and name in self.slots:
                continue
            if name not in self.slots:
                self.slots[name] = len(self.names)
                self.names.append(name)
            self._write(self.slots[name], parts_of(core))
            self.versions[name] = version

    def remove(self, name: str) -> None:
        """Free a slot by moving the last adapter into it (one slot copy, others untouched)."""
        slot = self.slots.pop(name, None)
        if slot is None:
            return
        self.versions.pop(name, None)
        last = self.names.pop()
        if last != name:
            for t in self.tensors:
                t[slot].copy_(t[len(self.names)])
            self.names[slot] = last
            self.slots[last] = slot

    def gather(self, slot_index: torch.Tensor) -> list[torch.Tensor]:
        return [t.index_select(0, slot_index) for t in self.tensors]


class StackedCore:
    """What a method's `stack_parts` reads of a core (`core[name]`, `core.scale`, `core.config`), over tensors
    that may carry a leading rows dimension. The scale is 1 here: the bank applies each row's own scale to the
    core's output, since a method's scale is the coefficient of its (single, linear) term."""

    scale = 1.0

    def __init__(self, params: dict[str, torch.Tensor], config: AdapterConfig) -> None:
        self._params = params
        self.config = config

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._params[key]

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self._params


Layout = list[tuple[str, int, tuple[int, ...]]]  # (tensor name, first column, shape) within a BankStack row


class BankStack(nn.Module):
    """One layer's share of an AdapterBank. Row `slot` of `data` is one adapter: its scale in column 0, then
    its tensors flattened in `layout` order. A non-persistent buffer: it follows .to() and dtype casts, and
    stays out of state dicts (the adapter files hold the tensors)."""

    def __init__(
        self,
        bank: AdapterBank,
        basis_key: str,
        r: int,
        fingerprint: str,
        layout: Layout,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.bank = bank
        self.bank_id = bank.id
        self.method = bank.method
        self.config = bank.config
        self.basis_key = basis_key
        self.r = r
        self.fingerprint = fingerprint
        self.layout = layout
        width = 1 + sum(_numel(shape) for _, _, shape in layout)
        self.register_buffer("data", torch.empty(bank.capacity, width, dtype=dtype, device=device), persistent=False)

    def slot_of(self, name: str) -> int | None:
        return self.bank.slots.get(name)

    def config_of(self, name: str) -> AdapterConfig:
        return self.bank.configs[name]

    def bank_names(self) -> list[str]:
        return self.bank.names

    def tensors_at(self, slot: int) -> dict[str, torch.Tensor]:
        """The adapter in `slot`, as views of its row (clone before keeping them)."""
        row = self.data[slot]
        return {n: row[start : start + _numel(shape)].view(shape) for n, start, shape in self.layout}

    def rows(self, slots: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The tensors (each rows × shape) and the scales (rows) of the adapters in `slots`."""
        data = self.data.index_select(0, slots)
        params = {n: data[:, start : start + _numel(shape)].unflatten(1, shape) for n, start, shape in self.layout}
        return params, data[:, 0]

    def grow(self, capacity: int) -> None:
        data = torch.empty(capacity, self.data.shape[1], dtype=self.data.dtype, device=self.data.device)
        data[: self.data.shape[0]].copy_(self.data)
        self.data = data

    def extra_repr(self) -> str:
        return f"method={self.method.name}, r={self.r}, slots={self.data.shape[0]}"


class AdapterBank:
    """Inference-only adapters of one layout (method, config up to the scale, layers, ranks, bases) on one
    model. Adapter `name` sits in slot `slots[name]` of every layer's `BankStack`."""

    _ids = itertools.count()

    def __init__(self, key: str, method: Method, config: AdapterConfig, capacity: int = 8) -> None:
        self.id = next(self._ids)
        self.key = key
        self.method = method
        self.config = config  # the first adapter's: the fields stack_parts reads are equal across the bank
        self.capacity = capacity
        self.slots: dict[str, int] = {}
        self.names: list[str] = []
        self.configs: dict[str, AdapterConfig] = {}  # each adapter's own (its alpha sets its scale)
        self.stacks: dict[str, BankStack] = {}  # layer name → its stack
        self.param_order: list[str] = []  # the method's tensor names, in the order its modules register them
        self.expected_keys: frozenset[str] = frozenset()  # the tensor names an adapter file of this layout holds
        self.file_layout: dict | None = None  # how to copy rows straight from a file of this layout (io.py)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.slots

    def new_stack(self, basis_key, r, fingerprint, layout, dtype, device) -> BankStack:
        return BankStack(self, basis_key, r, fingerprint, layout, dtype, device)

    def reserve(self, capacity: int) -> None:
        """Allocate slots for `capacity` adapters now, so no later load pays for a doubling (a copy of every
        resident adapter). Never shrinks."""
        if capacity > self.capacity:
            self.capacity = capacity
            for stack in self.stacks.values():
                stack.grow(capacity)

    def allocate(self, name: str, config: AdapterConfig) -> int:
        """A slot for `name`, growing every stack by doubling when all are taken."""
        slot = len(self.names)
        if slot >= self.capacity:
            self.reserve(2 * self.capacity)
        self.slots[name] = slot
        self.names.append(name)
        self.configs[name] = config
        return slot

    @torch.no_grad()
    def remove(self, name: str) -> None:
        """Free `name`'s slot by moving the last adapter into it (one row copy per layer, others untouched)."""
        slot = self.slots.pop(name)
        del self.configs[name]
        last = self.names.pop()
        if last != name:
            for stack in self.stacks.values():
                stack.data[slot].copy_(stack.data[len(self.names)])
            self.names[slot] = last
            self.slots[last] = slot

    @property
    def slot_bytes(self) -> int:
        """Bytes one resident adapter takes (its row in every layer)."""
        return sum(s.data.shape[1] * s.data.element_size() for s in self.stacks.values())

    @property
    def nbytes(self) -> int:
        """Bytes allocated, spare slots included."""
        return sum(s.data.numel() * s.data.element_size() for s in self.stacks.values())


class RowPlan:
    """Which adapter each row of a mixed batch uses, resolved once per forward for every layer: rows of
    module adapters by name, rows of resident adapters as (row index, slot) tensors per bank."""

    def __init__(self, names: list[str], resident: dict[str, AdapterBank], base: str) -> None:
        self.names = names
        self.module_rows = any(n != base and n not in resident for n in names)
        self._groups: dict[int, tuple[list[int], list[int]]] = {}
        for i, name in enumerate(names):
            bank = resident.get(name)
            if bank is not None:
                rows, slots = self._groups.setdefault(bank.id, ([], []))
                rows.append(i)
                slots.append(bank.slots[name])
        self._tensors: dict[tuple, tuple[torch.Tensor | None, torch.Tensor]] = {}

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


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
