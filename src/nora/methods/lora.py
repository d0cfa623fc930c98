"""LoRA: ΔW = s·B·A with B (d×r) = 0 and A (r×k) Kaiming-uniform, both trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..chain import Term
from ..config import AdapterConfig
from .base import Core, Method, kaiming_, low_rank_split

if TYPE_CHECKING:
    from ..basis import OuterBasis


@dataclass
class LoraConfig(AdapterConfig):
    method = "lora"
    r: int | float = 16
    alpha: float | None = 32.0


class LoRA(Method):
    config_cls = LoraConfig
    default_lr = 5e-4
    uses_basis = False

    def init_params(
        self, config: LoraConfig, W: torch.Tensor, basis: OuterBasis | None, r: int, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        d, k = W.shape
        return {
            "lora_A": kaiming_(torch.empty(r, k, dtype=dtype, device=W.device)),
            "lora_B": torch.zeros(d, r, dtype=dtype, device=W.device),
        }

    def param_shapes(
        self, config: LoraConfig, W: torch.Tensor, basis: OuterBasis | None, r: int
    ) -> dict[str, tuple[int, ...]]:
        d, k = W.shape
        return {"lora_A": (r, k), "lora_B": (d, r)}

    def terms(self, core: Core, basis: OuterBasis | None) -> list[Term]:
        return [Term(core.scale, [core["lora_B"], core["lora_A"]])]

    def fit(self, core, basis: OuterBasis | None, target: torch.Tensor) -> dict[str, torch.Tensor]:
        B, A = low_rank_split(target / core.scale, core.r)
        return {"lora_B": B, "lora_A": A}
