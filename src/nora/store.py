"""Resident adapter store: the per-adapter cores of one layer and one shared basis, stacked on the device.

A batch that mixes many adapters projects every row through the shared A_o once, gathers each row's core from
the stack, and projects back through the shared B_o once. Slots are filled lazily from the adapters' own
tensors and re-synced only when those tensors changed (tracked by autograd's version counters), so adding or
removing one adapter never touches the others.
"""

from __future__ import annotations

import torch

from .methods import AdapterCore


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
