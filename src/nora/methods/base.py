"""What a method is: how it initialises from W0, what its core is, which tensors train.

A method never touches injection, merging plumbing, saving or devices: the layer does that for all of them from
the method's `terms` (see chain.py). Only DoRA, whose output is not linear in its parameters, overrides the
forward and the merge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..chain import Term, terms_add, terms_apply, terms_product
from ..config import AdapterConfig

if TYPE_CHECKING:
    from ..basis import OuterBasis


class AdapterCore(nn.Module):
    """One named adapter inside one layer: its trainable tensors and the key of the outer basis it uses."""

    def __init__(
        self, method: Method, config: AdapterConfig, params: dict[str, torch.Tensor], r: int, basis_key: str | None
    ) -> None:
        super().__init__()
        self.method = method
        self.config = config
        self.r = r
        self.scale = method.scale(config, r)
        self.basis_key = basis_key
        # Parameters sit directly on this module (no ParameterDict or Dropout submodules): a model may hold
        # thousands of adapters × every layer, and each module object costs memory and traversal time.
        for k, v in params.items():
            self.register_parameter(k, nn.Parameter(v))

    @property
    def params(self) -> dict[str, nn.Parameter]:
        return dict(self._parameters)  # type: ignore[arg-type]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._parameters[key]  # type: ignore[return-value]

    def dropout(self, x: torch.Tensor) -> torch.Tensor:
        p = self.config.dropout
        return nn.functional.dropout(x, p, self.training) if p > 0 else x


class Method:
    name: ClassVar[str]
    config_cls: ClassVar[type[AdapterConfig]]
    uses_basis: ClassVar[bool] = True  # False: no frozen outer factors (LoRA, DoRA)

    def rank(self, config: AdapterConfig, W: torch.Tensor) -> int:
        return config.resolve_rank(*W.shape)

    def placement(self, config: AdapterConfig) -> str:
        return config.placement

    def scale(self, config: AdapterConfig, r: int) -> float:
        return config.scale(r)

    def init_params(
        self, config: AdapterConfig, W: torch.Tensor, basis: OuterBasis | None, r: int, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def terms(self, core: AdapterCore, basis: OuterBasis | None) -> list[Term]:
        """ΔW as a sum of scaled chains (scale included)."""
        raise NotImplementedError

    def delta(
        self, core: AdapterCore, basis: OuterBasis | None, x: torch.Tensor, base_out: torch.Tensor, layer
    ) -> torch.Tensor:
        """What the adapter adds to the base layer's output for input x."""
        return terms_apply(self.terms(core, basis), core.dropout(x))

    def add_to(
        self, out: torch.Tensor, core: AdapterCore, basis: OuterBasis | None, x: torch.Tensor, layer
    ) -> torch.Tensor:
        """The layer's output with this adapter's update added (the training and single-adapter path)."""
        return terms_add(out, self.terms(core, basis), core.dropout(x))

    # ---- mixed batches over a shared basis (methods whose core sits between the frozen B_o and A_o) ----
    def stack_parts(self, core: AdapterCore, basis: OuterBasis | None) -> list[torch.Tensor] | None:
        """The per-adapter tensors of the core (scale folded in) to stack across adapters; None: not stackable."""
        return None

    def apply_stacked(self, parts: list[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        """Each row's core on h (rows × tokens × r), given `parts` gathered per row."""
        raise NotImplementedError

    def merge(self, core: AdapterCore, basis: OuterBasis | None, W: torch.Tensor):
        """Return (merged weight, what unmerge needs)."""
        return W + terms_product(self.terms(core, basis)).to(W.dtype), None

    def unmerge(self, core: AdapterCore, basis: OuterBasis | None, W: torch.Tensor, cache) -> torch.Tensor:
        return W - terms_product(self.terms(core, basis)).to(W.dtype)


def kaiming_(t: torch.Tensor) -> torch.Tensor:
    """The Linear-layer default (and PEFT's LoRA A init): Kaiming-uniform with a = sqrt(5)."""
    nn.init.kaiming_uniform_(t, a=5**0.5)
    return t
