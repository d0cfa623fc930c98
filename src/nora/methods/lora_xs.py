"""LoRA-XS: a trainable r×r matrix R between frozen B_o = U_r and A_o = Σ_r V_rᵀ."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import AdapterConfig
from ..errors import AdapterError
from .base import AdapterCore, Method


@dataclass
class LoraXSConfig(AdapterConfig):
    method = "lora-xs"
    placement: str = "in"
    core_init: str = "normal"  # "normal": N(0, 1e-5) as in the paper's code; "zeros": exact identity

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.core_init not in ("normal", "zeros"):
            raise AdapterError(f"core_init={self.core_init!r}: use 'normal' or 'zeros'.")


class LoRAXS(Method):
    name = "lora-xs"
    config_cls = LoraXSConfig

    def init_params(self, config, W, basis, r, dtype):
        R = torch.zeros(r, r, dtype=dtype, device=W.device)
        if config.core_init == "normal":
            R.normal_(0.0, 1e-5)
        return {"core": R}

    def terms(self, core: AdapterCore, basis):
        return [(core.scale, [basis.B, core["core"], basis.A])]

    def stack_parts(self, core, basis):
        return [core["core"] * core.scale]

    def apply_stacked(self, parts, h):
        return torch.bmm(h, parts[0].to(h.dtype).transpose(1, 2))
