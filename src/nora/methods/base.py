"""The Method contract: what one adapter method must say, and what it may.

A method describes its update once, as a list of `Term`s (chain.py): the frozen outer factors (`left`, `right`:
buffers of the layer's `OuterBasis`) around the adapter's own `core` tensors, times a coefficient (its scale). The
layer derives everything else from those terms: the training forward, the single-adapter forward, the mixed batch
(each row's core gathered from a slot store), merge, unmerge, and the exact LoRA pair of `export_lora`. A method
never touches injection, devices, files or merging plumbing.

Required (abstract):
    config_cls                     the AdapterConfig subclass holding its fields (and their defaults: the Python
                                   API, `nora train` and YAML all use those); its `method` is the method's name
    default_lr                     what `nora train --method NAME` uses when the user gives no learning rate
    init_params(config, W, basis, r, dtype)   the trainable tensors, made from W0 and the basis
    terms(core, basis)             ΔW. Written with broadcasting only: given a core whose tensors carry a leading
                                   slot axis and whose scale is a vector (a `CoreView` of a store), it must return
                                   the same terms with that axis on each core element and on the coefficient.

Optional (defaults here):
    param_shapes(config, W, basis, r)   the shapes of init_params's tensors, in its order, without making them
                                   (what a resident load checks a file against); the default runs init_params
    uses_basis                     False: no frozen outer factors (LoRA, DoRA)
    adapts_layers                  True; False for a method that trains modules_to_save alone (head-only)
    rank / placement / scale       the per-layer rank, singular-value placement, and coefficient s
    rank_text(config, r)           a layer's ranks as the rank-lowering warning names them ("r=27")
    calibration(config)            (power, eps) when the method wants activation-aware SVD scales, else None
    resident(config)               whether inference-only loads become slots of a resident bank (default: a
                                   linear method on a frozen basis, whose core is the narrow part between them)
    peft_options / peft_tensors    extra PEFT LoraConfig fields and tensors its `export_lora` output needs

Variant (the one non-linear hook): a method whose output is not linear in its tensors (DoRA) sets `variant` to a
`Variant`, which then owns the layer's forward, merge and unmerge for that method; such adapters serve mixed
batches by grouping rows per adapter instead of from a slot store.

Adding a method is one file defining a Method subclass (and its config) plus one `register(...)` line
(nora.registry; nora.methods registers nora's own).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from ..chain import Term
from ..config import AdapterConfig
from ..errors import AdapterError
from ..registry import METHODS

if TYPE_CHECKING:
    from ..basis import OuterBasis


class Core(Protocol):
    """What `terms` reads of an adapter: its tensors by name, its coefficient, its config."""

    config: AdapterConfig

    @property
    def scale(self) -> float | torch.Tensor: ...

    def __getitem__(self, key: str) -> torch.Tensor: ...


@dataclass
class CoreView:
    """A core read from a slot store: every tensor (and the scale) with a leading slot axis."""

    tensors: dict[str, torch.Tensor]
    scale: float | torch.Tensor
    config: AdapterConfig

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]


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
        self.fingerprint = ""
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


class Variant(ABC):
    """The forward and merge of a method whose output is not linear in its tensors (the layer calls these instead
    of evaluating the terms). `W` is the base weight (d × k), `bias` the base layer's bias."""

    @abstractmethod
    def forward(
        self,
        method: Method,
        core: AdapterCore,
        x: torch.Tensor,
        base_out: torch.Tensor,
        W: torch.Tensor,
        bias: torch.Tensor | None,
        apply: Callable[[list[Term], torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The layer's output with this adapter applied, given the base layer's output; `x` is the layer's input
        with the adapter's dropout already applied (the base output saw it without). `apply(terms, x)` applies a
        matrix (as terms) the way the layer applies its weight: a matmul, or a Conv2d's convolution; outputs, and
        `base_out`, are channel-last."""

    @abstractmethod
    def merge(self, method: Method, core: AdapterCore, W: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(the merged weight, what unmerge needs)."""

    @abstractmethod
    def unmerge(self, method: Method, core: AdapterCore, W: torch.Tensor, cache: Any) -> torch.Tensor:
        """The weight before `merge`."""


class Method(ABC):
    name: ClassVar[str]  # the registry name: its config class's `method`, unless the class gives its own
    config_cls: ClassVar[type[AdapterConfig]]
    default_lr: ClassVar[float]
    uses_basis: ClassVar[bool] = True
    adapts_layers: ClassVar[bool] = True
    variant: ClassVar[Variant | None] = None
    peft_options: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "config_cls" in cls.__dict__ and "name" not in cls.__dict__:  # the name is spelt once, in the config
            cls.name = cls.config_cls.method

    @abstractmethod
    def init_params(
        self, config: AdapterConfig, W: torch.Tensor, basis: OuterBasis | None, r: int, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def terms(self, core: Core, basis: OuterBasis | None) -> list[Term]: ...

    def param_shapes(
        self, config: AdapterConfig, W: torch.Tensor, basis: OuterBasis | None, r: int
    ) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor `init_params` makes, in its order. Override it to spare the initialisation."""
        return {k: tuple(t.shape) for k, t in self.init_params(config, W, basis, r, torch.float32).items()}

    def rank(self, config: AdapterConfig, W: torch.Tensor) -> int:
        return config.resolve_rank(*W.shape)

    def rank_text(self, config: AdapterConfig, r: int) -> str:
        return f"r={r}"

    def placement(self, config: AdapterConfig) -> str:
        return config.placement

    def scale(self, config: AdapterConfig, r: int) -> float:
        return config.scale(r)

    def calibration(self, config: AdapterConfig) -> tuple[float, float] | None:
        return None

    def resident(self, config: AdapterConfig) -> bool:
        return self.uses_basis and self.variant is None

    def peft_tensors(self, core: AdapterCore) -> dict[str, torch.Tensor]:
        """Tensors besides lora_A / lora_B that a PEFT LoRA export of this layer holds, by PEFT's name suffix."""
        return {}

    @property
    def has_fit(self) -> bool:
        """Whether this method overrides `fit` (LoftQ-style initialisation is possible)."""
        return type(self).fit is not Method.fit

    def fit(self, core: AdapterCore, basis: OuterBasis | None, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Trainable tensors whose ΔW is the least-squares fit of `target` (d × k, float64) within this method's
        form: the quantization-aware initialisation of nora.loftq. A method without one refuses."""
        fitting = [name for name, method in METHODS.items() if method.has_fit]
        raise AdapterError(
            f"{self.name} has no least-squares fit of a target update, so LoftQ-style initialisation is not available "
            f"for it; use one of {', '.join(fitting)}."
        )


def low_rank_split(M: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B·A the best rank-q approximation of M, the singular values split as √S on each side."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    root = S[:q].sqrt()
    return U[:, :q] * root, root[:, None] * Vh[:q]


def middle_fit(left: torch.Tensor, right: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The M minimising ‖left·M·right − target‖ (least squares): left⁺ · target · right⁺."""
    return torch.linalg.pinv(left) @ target @ torch.linalg.pinv(right)


def kaiming_(t: torch.Tensor) -> torch.Tensor:
    """The Linear-layer default (and PEFT's LoRA A init): Kaiming-uniform with a = sqrt(5)."""
    nn.init.kaiming_uniform_(t, a=5**0.5)
    return t
