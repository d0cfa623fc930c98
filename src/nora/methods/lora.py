"""LoRA: ΔW = s·B·A with B (d×r) = 0 and A (r×k) Kaiming-uniform, both trained."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import AdapterConfig
from .base import AdapterCore, Method, kaiming_


@dataclass
class LoraConfig(AdapterConfig):
    method = "lora"


class LoRA(Method):
    name = "lora"
    config_cls = LoraConfig
    uses_basis = False

    def init_params(self, config, W, basis, r, dtype):
        d, k = W.shape
        return {
            "lora_A": kaiming_(torch.empty(r, k, dtype=dtype, device=W.device)),
            "lora_B": torch.zeros(d, r, dtype=dtype, device=W.device),
        }

    def terms(self, core: AdapterCore, basis):
        return [(core.scale, [core["lora_B"], core["lora_A"]])]
