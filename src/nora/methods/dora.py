"""DoRA: LoRA plus a trained per-output-row magnitude m, initialised to ‖W0‖ per row.

y = m ⊙ (W0 + s·B·A) x / ‖W0 + s·B·A‖_row + b        (the norm is detached, as in the paper)

Not linear in its tensors, so its forward and merge are a declared `Variant`; its ΔW terms are LoRA's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..chain import Term, terms_product
from ..config import AdapterConfig
from .base import AdapterCore, Method, Variant
from .lora import LoRA

if TYPE_CHECKING:
    from ..basis import OuterBasis


@dataclass
class DoraConfig(AdapterConfig):
    method = "dora"
    r: int | float = 16
    alpha: float | None = 32.0


class DoraVariant(Variant):
    def _factor(self, method, core: AdapterCore, W: torch.Tensor) -> torch.Tensor:
        """m / ‖W0 + ΔW‖_row, the per-row factor, with the norm detached."""
        full = W.to(core["lora_A"].dtype) + terms_product(method.terms(core, None))
        return core["magnitude"] / full.norm(dim=1).detach()

    def forward(self, method, core, x, base_out, W, bias, apply):
        factor = self._factor(method, core, W).to(base_out.dtype)
        if core.training and core.config.dropout > 0:  # as PEFT: the rescaled base term sees the dropped-out x too
            base_nobias = apply([Term(1.0, [W.to(x.dtype)])], x)
        else:
            base_nobias = base_out if bias is None else base_out - bias
        lora = apply(method.terms(core, None), x)  # x arrives with the adapter's dropout applied
        return base_out + ((factor - 1) * base_nobias + factor * lora).to(base_out.dtype)

    def merge(self, method, core, W):
        factor = self._factor(method, core, W)
        merged = factor.unsqueeze(1) * (W.to(factor.dtype) + terms_product(method.terms(core, None)))
        return merged.to(W.dtype), factor.detach()

    def unmerge(self, method, core, W, cache):
        original = W.to(cache.dtype) / cache.unsqueeze(1) - terms_product(method.terms(core, None))
        return original.to(W.dtype)


class DoRA(LoRA):
    config_cls = DoraConfig
    variant = DoraVariant()
    peft_options = {"use_dora": True}

    def init_params(
        self, config: DoraConfig, W: torch.Tensor, basis: OuterBasis | None, r: int, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        params = super().init_params(config, W, basis, r, dtype)
        params["magnitude"] = W.detach().to(dtype).norm(dim=1)
        return params

    def param_shapes(
        self, config: DoraConfig, W: torch.Tensor, basis: OuterBasis | None, r: int
    ) -> dict[str, tuple[int, ...]]:
        return {**super().param_shapes(config, W, basis, r), "magnitude": (W.shape[0],)}

    def peft_tensors(self, core: AdapterCore) -> dict[str, torch.Tensor]:
        return {"lora_magnitude_vector": core["magnitude"]}

    fit = Method.fit  # its output is not W0 + ΔW for a linear ΔW: no least-squares fit of a target update
