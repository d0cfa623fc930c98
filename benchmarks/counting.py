"""Exact byte counts of a training step on any device, shared by the benchmarks.

SavedBytes: what autograd saves for backward (`saved_tensors_hooks`), each storage once, optionally leaving out a
model's own weights and charging each new storage to a named bucket (a decoder layer, the head).
LiveBytes: every storage an op creates (a `TorchDispatchMode`), alive or freed; its peak over a step and what is
still alive at a point (after the forward: whatever backward will need, checkpoint caches included).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def storage_keys(tensors: Iterable[torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


class SavedBytes:
    """Bytes autograd keeps for backward, counted once per storage; storages in `exclude` are left out."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self.excluded = storage_keys(exclude)
        self.seen: set[int] = set()
        self.total = 0
        self.bucket = "other"
        self.by_bucket: dict[str, int] = defaultdict(int)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in self.seen and key not in self.excluded:
            self.seen.add(key)
            self.total += t.untyped_storage().nbytes()
            self.by_bucket[self.bucket] += t.untyped_storage().nbytes()
        return t

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, _unpack)


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


class LiveBytes(TorchDispatchMode):
    """Storages created by the ops run under it (each once), with the peak of their live total after every op.

    Storages in `exclude` (the model's weights, which exist before and after) are never counted."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.excluded = storage_keys(exclude)
        self.live: dict[int, tuple[StorageWeakRef, int, str]] = {}
        self.bucket = "other"
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if _real(t)}
        for key in [k for k, (ref, _, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for t in tree_leaves(out):
            if _real(t):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                # an output on an input's storage is an in-place result or a view: nothing new was allocated
                if key and key not in self.live and key not in self.excluded and key not in inputs:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes(), self.bucket)
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out

    def alive_by_bucket(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for ref, nbytes, bucket in self.live.values():
            if not ref.expired():
                out[bucket] += nbytes
        return dict(out)


def _real(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type != "meta"
