"""transformers' Conv1D (GPT-2): a Linear whose weight is stored transposed, k × d."""

from __future__ import annotations

import torch
from torch import nn

from .kind import MatrixKind


def conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


class Conv1DKind(MatrixKind):
    name = "conv1d"
    fan_in_fan_out = True

    def matches(self, module: nn.Module) -> bool:
        conv = conv1d_type()
        return conv is not None and isinstance(module, conv)

    def weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight.T
