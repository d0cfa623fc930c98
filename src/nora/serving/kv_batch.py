"""A running batch's key/value cache and attention mask, reshaped as rows join and leave.

Rows are left-padded to a common length; the mask marks the padding. New rows are prefilled on their own and
joined by padding whichever side is shorter on the left; finished rows are dropped; padding columns that no
row needs any more are trimmed from the front, so the cache never grows past the longest live row.
Joining and trimming need plain full-attention layers (transformers' `DynamicLayer`); caches with sliding-window
or recurrent layers still batch, but a new batch starts only when the previous one has finished.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def reshapeable(cache: DynamicCache) -> bool:
    """True when every layer is a plain growing key/value cache, whose rows and columns can be edited."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


Snapshot = list[tuple[DynamicLayer, bool, torch.Tensor | None, torch.Tensor | None]]


def snapshot(cache: DynamicCache) -> Snapshot:
    """What `restore` needs to undo a forward pass or a row selection on a reshapeable cache: its layers replace
    their key/value tensors (by concatenation or indexing), never write into them, so keeping references is enough."""
    return [(layer, layer.is_initialized, getattr(layer, "keys", None), getattr(layer, "values", None))
            for layer in cache.layers]  # fmt: skip


def restore(cache: DynamicCache, saved: Snapshot) -> None:
    for layer, initialized, keys, values in saved:
        layer.is_initialized, layer.keys, layer.values = initialized, keys, values


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def join(cache: DynamicCache, mask: torch.Tensor, new_cache: DynamicCache, new_mask: torch.Tensor) -> torch.Tensor:
    """Append `new_cache`'s rows to `cache` (in place); returns the joined attention mask (rows × columns).
    Nothing changes if it fails."""
    extra_old = max(new_mask.shape[1] - mask.shape[1], 0)
    extra_new = max(mask.shape[1] - new_mask.shape[1], 0)
    joined_mask = torch.cat([_pad_left(mask, extra_old, 1), _pad_left(new_mask, extra_new, 1)])
    joined = [
        (
            torch.cat([_pad_left(old.keys, extra_old, -2), _pad_left(new.keys, extra_new, -2)]),
            torch.cat([_pad_left(old.values, extra_old, -2), _pad_left(new.values, extra_new, -2)]),
        )
        for old, new in zip(cache.layers, new_cache.layers, strict=True)
        if new.is_initialized
    ]
    layers = [layer for layer, new in zip(cache.layers, new_cache.layers, strict=True) if new.is_initialized]
    for layer, (keys, values) in zip(layers, joined, strict=True):
        layer.keys, layer.values = keys, values
    return joined_mask


def keep_rows(cache: DynamicCache, mask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Keep only `rows` (in place), then trim the padding columns no kept row uses; returns the new mask."""
    index = torch.tensor(rows, device=mask.device)
    cache.batch_select_indices(index)
    mask = mask.index_select(0, index)
    if not reshapeable(cache):
        return mask
    unused = int((mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns that are padding in every row
    if unused:
        for layer in cache.layers:
            if layer.is_initialized:
                layer.keys = layer.keys[..., unused:, :]
                layer.values = layer.values[..., unused:, :]
        mask = mask[:, unused:]
    return mask
