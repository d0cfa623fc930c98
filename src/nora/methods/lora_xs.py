"""LoRA-XS: a trainable r×r matrix R between frozen B_o = U_r and A_o = Σ_r V_rᵀ."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..chain import Term
from ..config import AdapterConfig
from ..errors import AdapterError
from .base import Core, Method, middle_fit

if TYPE_CHECKING:
    from ..basis import OuterBasis


@dataclass
class LoraXSConfig(AdapterConfig):
    method = "lora-xs"
    r: int | float = 64
    placement: str = "in"
    core_init: str = "normal"  # "normal": N(0, 1e-5) as in the paper's code; "zeros": exact identity

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.core_init not in ("normal", "zeros"):
            raise AdapterError(f"core_init={self.core_init!r}: use 'normal' or 'zeros'.")


class LoRAXS(Method):
    config_cls = LoraXSConfig
    default_lr = 2e-3

    def init_params(
        self, config: LoraXSConfig, W: torch.Tensor, basis: OuterBasis | None, r: int, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        R = torch.zeros(r, r, dtype=dtype, device=W.device)
        if config.core_init == "normal":
            R.normal_(0.0, 1e-5)
        return {"core": R}

    def param_shapes(
        self, config: LoraXSConfig, W: torch.Tensor, basis: OuterBasis | None, r: int
    ) -> dict[str, tuple[int, ...]]:
        return {"core": (r, r)}

    def terms(self, core: Core, basis: OuterBasis | None) -> list[Term]:
        return [Term(core.scale, [core["core"]], left=[basis.B], right=[basis.A])]

    def fit(self, core, basis: OuterBasis | None, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"core": middle_fit(basis.B.double(), basis.A.double(), target) / core.scale}
