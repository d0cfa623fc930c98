"""Head-only: no layer adapter at all; only `modules_to_save` (a classification head) trains, in full. The baseline
every adapter table needs: what the head alone reaches on the frozen encoder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..chain import Term
from ..config import AdapterConfig
from ..errors import AdapterError
from .base import Core, Method

if TYPE_CHECKING:
    from ..basis import OuterBasis


@dataclass
class HeadOnlyConfig(AdapterConfig):
    method = "head-only"
    target_modules: str | list[str] = field(default_factory=list)
    placement: str = "none"

    def __post_init__(self) -> None:
        if self.target_modules != []:
            raise AdapterError(
                f"head-only adapts no layer: target_modules must be empty, not {self.target_modules!r} "
                "(pick a layer method such as lora or nora to adapt layers)."
            )
        if not self.modules_to_save:
            raise AdapterError(
                "head-only trains modules_to_save alone, and none are given: name the head (e.g. "
                "modules_to_save=['classifier']; nora train --task seq-cls / regression sets it)."
            )
        super().__post_init__()


class HeadOnly(Method):
    config_cls = HeadOnlyConfig
    default_lr = 2e-3
    uses_basis = False
    adapts_layers = False

    def init_params(
        self, config: HeadOnlyConfig, W: torch.Tensor, basis: OuterBasis | None, r: int, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        return {}

    def terms(self, core: Core, basis: OuterBasis | None) -> list[Term]:
        return []  # ΔW = 0 on every layer: there are no layers
