"""The layer kinds nora adapts, one line each; the first whose `matches` holds takes a module."""

from __future__ import annotations

from torch import nn

from .conv1d import Conv1DKind
from .conv2d import Conv2dKind
from .experts import ExpertSliceKind
from .kind import LayerKind
from .linear import LinearKind

KINDS: list[LayerKind] = [
    LinearKind(),
    Conv1DKind(),
    Conv2dKind(),
    ExpertSliceKind(),
]


def kind_of(module: nn.Module) -> LayerKind | None:
    return next((kind for kind in KINDS if kind.matches(module)), None)


def is_adaptable(module: nn.Module) -> bool:
    """A module of a known kind that takes an adapter (a grouped Conv2d is of a kind, and takes none)."""
    kind = kind_of(module)
    return kind is not None and kind.refusal(module) is None
