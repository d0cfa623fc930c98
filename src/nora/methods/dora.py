"""DoRA: LoRA plus a trained per-output-row magnitude m, initialised to ‖W0‖ per row.

y = m ⊙ (W0 + s·B·A) x / ‖W0 + s·B·A‖_row + b        (the norm is detached, as in the paper)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..chain import terms_apply, terms_product
from ..config import AdapterConfig
from .base import AdapterCore
from .lora import LoRA


@dataclass
class DoraConfig(AdapterConfig):
    method = "dora"


class DoRA(LoRA):
    name = "dora"
    config_cls = DoraConfig

    def init_params(self, config, W, basis, r, dtype):
        params = super().init_params(config, W, basis, r, dtype)
        params["magnitude"] = W.detach().to(dtype).norm(dim=1)
        return params

    def _factor(self, core: AdapterCore, W: torch.Tensor) -> torch.Tensor:
        """m / ‖W0 + ΔW‖_row, the per-row factor, with the norm detached."""
        full = W.to(core["lora_A"].dtype) + terms_product(self.terms(core, None))
        return core["magnitude"] / full.norm(dim=1).detach()

    def delta(self, core, basis, x, base_out, layer):
        factor = self._factor(core, layer.base_weight()).to(x.dtype)
        bias = layer.base_layer.bias
        base_nobias = base_out if bias is None else base_out - bias
        lora = terms_apply(self.terms(core, None), core.dropout(x))
        return (factor - 1) * base_nobias + factor * lora

    def add_to(self, out, core, basis, x, layer):
        return out + self.delta(core, basis, x, out, layer).to(out.dtype)

    def merge(self, core, basis, W):
        factor = self._factor(core, W)
        merged = factor.unsqueeze(1) * (W.to(factor.dtype) + terms_product(self.terms(core, None)))
        return merged.to(W.dtype), factor.detach()

    def unmerge(self, core, basis, W, cache):
        original = W.to(cache.dtype) / cache.unsqueeze(1) - terms_product(self.terms(core, None))
        return original.to(W.dtype)
