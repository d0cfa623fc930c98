"""Resident adapters: inference-only adapters loaded from files into slots of per-model AdapterBanks.

A bank holds the adapters of one layout (method, config up to the scale, layers, ranks and bases): each is one
row of a stacked buffer per layer (slots.py), no module per layer. The first file of a layout is checked in full
and fixes where each layer's tensors lie in such a file; a later file whose safetensors header is byte-for-byte
the same (same names, shapes, dtypes and offsets) is copied into its slot straight from its bytes, one copy per
layer. Any other file takes the checked path.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
from torch import nn

from .config import AdapterConfig
from .errors import AdapterError
from .file_check import check_layers
from .io import AdapterFile, check_keys, check_shape
from .layers import AdapterLayer
from .methods import AdapterCore, Method, get_method
from .planning import plan_bases, release_bases
from .slots import AdapterBank, core_fields, make_layout

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16", torch.float16: "F16"}


def can_be_resident(method: Method, config: AdapterConfig) -> bool:
    """The method says so, and nothing is trained whole (modules_to_save live as modules)."""
    return method.resident(config) and not config.modules_to_save


class ResidentAdapters:
    """The banks of one model, and which bank holds each resident adapter."""

    def __init__(
        self,
        model: nn.Module,
        layers: Callable[[], dict[str, AdapterLayer]],
        wrap: Callable[[list[str]], dict[str, AdapterLayer]],
    ) -> None:
        self.model = model
        self.layers = layers  # the model's wrapped layers
        self.wrap = wrap  # wraps the named modules (where not yet wrapped), returning their layers
        self.banks: dict[str, AdapterBank] = {}  # by layout key
        self.of: dict[str, AdapterBank] = {}  # adapter name → its bank
        self.reserved = 0

    def __contains__(self, name: str) -> bool:
        return name in self.of

    def reserve(self, count: int) -> None:
        self.reserved = count
        for bank in self.banks.values():
            bank.reserve(count)

    def load(self, name: str, file: AdapterFile, where) -> bool:
        """Load `file` as `name` into a slot of the bank of its layout (made on first use); False where the
        adapter cannot be resident."""
        config = file.config
        method = get_method(config.method)
        if not can_be_resident(method, config):
            return False
        key = bank_key(config, file.meta)
        bank = self.banks.get(key)
        if bank is None:
            bank = self._new_bank(key, method, file, where)
        else:
            layers = self.layers()
            merged = sorted({a for n in bank.stacks for a in layers[n].merged_adapters})
            if merged:
                raise AdapterError(
                    f"adapters {merged} are merged into the weights; unmerge() before adding another, so it "
                    "applies to the original weights."
                )
        slot = bank.allocate(name, config)
        try:
            fill_slot(bank, slot, file, where)
        except BaseException:
            bank.remove(name)
            if not bank:
                self._drop_bank(bank)
            raise
        self.of[name] = bank
        return True

    def _new_bank(self, key: str, method: Method, file: AdapterFile, where) -> AdapterBank:
        """The bank for `file`'s layout, its bases made (from the layers' own, the basis cache, or an SVD) and
        every check of a module load passed."""
        config, tensors = file.config, file.tensors()
        layer_names, ranks, keys, sources = check_layers(self.model, config, file.meta, tensors, where)
        scales = {n: tensors[f"{n}.awsvd_scale"] for n in layer_names if f"{n}.awsvd_scale" in tensors}
        layers = self.wrap(layer_names)
        bank = AdapterBank(key, method, config, max(8, self.reserved))
        header = file.header() or {}
        plans, made = plan_bases(config, method, layers, scales, ranks, keys, sources)
        try:
            expected = {f"{n}.awsvd_scale" for n in scales}
            for n, layer in layers.items():
                plan = plans[n]
                shapes = method.param_shapes(config, layer.base_weight().detach(), layer.bases[plan.basis_key], plan.r)
                for pname, shape in shapes.items():
                    tname = f"{n}.{pname}"
                    expected.add(tname)
                    if tname in tensors:
                        check_shape(shape, tensors[tname], tname, where)
                # each layer's tensors in the file's order, so that a file's bytes map onto rows in few pieces
                order = sorted(shapes, key=lambda p: _offset(header, f"{n}.{p}"))
                layout = make_layout({p: shapes[p] for p in order})
                bank.stacks[n] = bank.new_stack(
                    plan.basis_key, plan.r, plan.key, layout, layer.param_dtype(), layer.base_weight().device
                )
            check_keys(expected, tensors, where)
        except BaseException:
            release_bases(made)
            raise
        bank.expected_keys = frozenset(expected)
        bank.param_order = list(shapes)
        set_file_layout(bank, file)
        for n, stack in bank.stacks.items():
            layers[n].add_bank(bank.id, stack)
        self.banks[key] = bank
        return bank

    def remove(self, name: str) -> None:
        bank = self.of.pop(name)
        bank.remove(name)
        if not bank:
            self._drop_bank(bank)

    def _drop_bank(self, bank: AdapterBank) -> None:
        layers = self.layers()
        for n in bank.stacks:
            if n in layers:
                layers[n].drop_bank(bank.id)
        self.banks.pop(bank.key, None)

    @torch.no_grad()
    def materialize(self, name: str) -> None:
        """Turn resident adapter `name` into modules (bit-identical tensors, frozen), freeing its slot."""
        bank = self.of.get(name)
        if bank is None:
            return
        layers = self.layers()
        for n in bank.stacks:
            core: AdapterCore = bank.core(n, name)
            layers[n].adapters[name] = core.train(layers[n].training)
        self.remove(name)

    def forget(self) -> None:
        self.banks.clear()
        self.of.clear()


def bank_key(config: AdapterConfig, meta: dict) -> str:
    """Adapters with equal keys share a bank: same method and core settings, same layers, ranks and bases."""
    return json.dumps([core_fields(config), meta["layers"]], sort_keys=True, default=str)


def _offset(header: dict, key: str) -> int:
    entry = header.get(key)
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    return offsets[0] if isinstance(offsets, list) and offsets and isinstance(offsets[0], int) else 0


def set_file_layout(bank: AdapterBank, file: AdapterFile) -> None:
    """Record how to copy `bank`'s rows straight from a file laid out as `file` (the first of its layout): each
    layer's tensors adjacent, in its stack's column order, in the stacks' dtype. All rows, scales included, are
    then gathered from the file's bytes in one indexing op and written with one copy per layer."""
    header, head = file.header(), file.header_bytes()
    stacks = list(bank.stacks.items())
    if header is None or head is None or not stacks:
        return
    dtype = stacks[0][1].data.dtype
    size, start_of_data = dtype.itemsize, 8 + len(head)
    if any(s.data.dtype != dtype for _, s in stacks) or start_of_data % size or (len(file.raw) - start_of_data) % size:
        return
    ranks = sorted({s.r for _, s in stacks})
    pieces = []
    for lname, stack in stacks:
        entries = [header.get(f"{lname}.{pname}") for pname, _, _ in stack.layout]
        if any(not isinstance(e, dict) or e.get("dtype") != _SAFETENSORS_DTYPES.get(dtype) for e in entries):
            return
        offsets = [e["data_offsets"] for e in entries]
        if any(a[1] != b[0] for a, b in zip(offsets, offsets[1:], strict=False)) or offsets[0][0] % size:
            return
        first, end = offsets[0][0] // size, offsets[-1][1] // size
        if end - first != stack.data.shape[1] - 1:
            return
        # staged vector: the scales (one per rank), then the file's data region
        pieces += [torch.tensor([ranks.index(stack.r)]), torch.arange(first, end) + len(ranks)]
    bank.file_layout = {
        "header": head,
        "size": len(file.raw),
        "ranks": ranks,
        "index": torch.cat(pieces),
        "widths": [stack.data.shape[1] for _, stack in stacks],
    }


@torch.no_grad()
def fill_slot(bank: AdapterBank, slot: int, file: AdapterFile, where) -> None:
    """Write the adapter in `file` to `slot` of every layer of `bank`, with its scale."""
    config = file.config
    scales = {r: bank.method.scale(config, r) for r in {s.r for s in bank.stacks.values()}}
    known = bank.file_layout
    if known is not None and len(file.raw) == known["size"] and file.header_bytes() == known["header"]:
        dtype = next(iter(bank.stacks.values())).data.dtype
        flat = torch.frombuffer(file.raw, dtype=dtype, offset=8 + len(known["header"]))
        staged = torch.cat([torch.tensor([scales[r] for r in known["ranks"]], dtype=dtype), flat])
        rows = staged.index_select(0, known["index"])
        on_device: dict[torch.device, list[torch.Tensor]] = {}
        for i, stack in enumerate(bank.stacks.values()):
            device = stack.data.device
            if device not in on_device:
                on_device[device] = list(rows.to(device).split(known["widths"]))
            stack.data[slot].copy_(on_device[device][i])
        return
    tensors = file.tensors()
    check_keys(bank.expected_keys, tensors, where)
    for lname, stack in bank.stacks.items():
        own = {}
        for pname, _, shape in stack.layout:
            key = f"{lname}.{pname}"
            check_shape(shape, tensors[key], key, where)
            own[pname] = tensors[key]
        stack.write(slot, own, scales[stack.r])
