"""How an adapter changes its layer: the linear update W0 + ΔW (every method's, from its terms), or the declared
`Variant` of a method whose output is not linear in its tensors (DoRA). The layer asks `update_of(method)` and
never which method it holds."""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from ..chain import terms_product
from ..methods import AdapterCore, Method, Variant

if TYPE_CHECKING:
    from .adapter import AdapterLayer


class Update(ABC):
    # Whether rows of a mixed batch may be evaluated together from stacked cores (the update is linear in them).
    stackable: bool

    @abstractmethod
    def forward(self, layer: AdapterLayer, core: AdapterCore, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The layer's output `out` with `core` applied; `x` has the adapter's dropout applied."""

    @abstractmethod
    def merge(self, layer: AdapterLayer, core: AdapterCore, W: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(W with `core` folded in, what unmerge needs); differentiable, so a layer may run on it."""

    @abstractmethod
    def unmerge(self, layer: AdapterLayer, core: AdapterCore, W: torch.Tensor, cache: Any) -> torch.Tensor: ...


class LinearUpdate(Update):
    stackable = True

    def forward(self, layer, core, x, out):
        return layer.kind.add(layer.base_layer, out, layer.terms(core), x)

    def merge(self, layer, core, W):
        return W + terms_product(layer.terms(core)).to(W.dtype), None

    def unmerge(self, layer, core, W, cache):
        return W - terms_product(layer.terms(core)).to(W.dtype)


class VariantUpdate(Update):
    """A method's own forward and merge; it works channel-last, as on a Linear's output, whatever the kind."""

    stackable = False

    def __init__(self, variant: Variant) -> None:
        self.variant = variant

    def forward(self, layer, core, x, out):
        kind = layer.kind
        apply = partial(kind.apply, layer.base_layer)
        last = self.variant.forward(core.method, core, x, kind.to_last(out), layer.base_weight(), layer.bias, apply)
        return kind.from_last(last)

    def merge(self, layer, core, W):
        return self.variant.merge(core.method, core, W)

    def unmerge(self, layer, core, W, cache):
        return self.variant.unmerge(core.method, core, W, cache)


LINEAR = LinearUpdate()


def update_of(method: Method) -> Update:
    return LINEAR if method.variant is None else VariantUpdate(method.variant)
