"""PiSSA: B = U_r Σ^½ and A = Σ^½ V_rᵀ both train over the residual W0 − s·B0·A0.

The base weight is never rewritten: the layer adds s·(B·A − B0·A0), which equals the residual form exactly in
real arithmetic, keeps W0 shared with other adapters, and unloads to the untouched original.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AdapterConfig
from .base import AdapterCore, Method


@dataclass
class PissaConfig(AdapterConfig):
    method = "pissa"


class PiSSA(Method):
    name = "pissa"
    config_cls = PissaConfig

    def placement(self, config):
        return "sqrt"

    def init_params(self, config, W, basis, r, dtype):
        return {"lora_A": basis.A.to(dtype).clone(), "lora_B": basis.B.to(dtype).clone()}

    def terms(self, core: AdapterCore, basis):
        s = core.scale
        return [(s, [core["lora_B"], core["lora_A"]]), (-s, [basis.B, basis.A])]
