"""nn.Linear (and its subclasses, bitsandbytes' quantized Linear among them): y = W x + b, W stored d × k."""

from __future__ import annotations

import torch
from torch import nn

from .kind import MatrixKind


class LinearKind(MatrixKind):
    name = "linear"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight
