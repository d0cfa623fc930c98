"""NoRA, nested low-rank adaptation (arXiv 2408.10280): a trainable inner LoRA nested in a frozen outer SVD.

    serial (default):  ΔW = s · B_o · (B_i A_i) · A_o      B_i (r×r'), A_i (r'×r)
    out (paper "W_b"): ΔW = s · (B_i A_i) · B_o · A_o      B_i (d×r'), A_i (r'×d)

B_o, A_o are the rank-r (activation-aware) SVD factors of W0 with the chosen singular-value placement; s = alpha/r
with r the outer rank. inner_init="kaiming" (A_i Kaiming, B_i = 0) is an exact identity at init; "randn" leaves
both inner matrices standard-normal as the authors' code does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..chain import Term
from ..config import AdapterConfig
from ..errors import AdapterError
from .base import Core, Method, kaiming_

if TYPE_CHECKING:
    from ..basis import OuterBasis


@dataclass
class NoraConfig(AdapterConfig):
    method = "nora"
    r: int | float = 128
    inner_r: int = 8
    inner: str = "serial"  # "serial" | "out"
    inner_init: str = "kaiming"  # "kaiming" | "randn"
    awsvd: bool = False
    awsvd_power: float = 1.0
    awsvd_eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inner not in ("serial", "out"):
            raise AdapterError(f"inner={self.inner!r}: use 'serial' (C = B_i A_i) or 'out' (the paper's W_b).")
        if self.inner_init not in ("kaiming", "randn"):
            raise AdapterError(f"inner_init={self.inner_init!r}: use 'kaiming' (identity at init) or 'randn'.")
        if self.inner_r < 1:
            raise AdapterError(f"inner_r={self.inner_r} must be a positive rank.")
        if isinstance(self.r, int) and self.inner_r > self.r:
            raise AdapterError(
                f"inner_r={self.inner_r} is larger than the outer rank r={self.r}; the inner LoRA must be "
                "narrower than the outer factorisation (NoRA uses r' < r)."
            )


class NoRA(Method):
    name = "nora"
    config_cls = NoraConfig
    default_lr = 2e-3
    # s = alpha/r stays 1 (alpha = r), and the outer rank moderate: large outer ranks at this lr diverge
    default_adapter = {"r": 128, "inner_r": 8}

    def rank(self, config: NoraConfig, W: torch.Tensor) -> int:
        r = config.resolve_rank(*W.shape)
        if config.inner_r > r:
            raise AdapterError(
                f"inner_r={config.inner_r} is larger than the outer rank r={r}; the inner LoRA must be "
                "narrower than the outer factorisation (NoRA uses r' < r)."
            )
        return r

    def init_params(
        self, config: NoraConfig, W: torch.Tensor, basis: OuterBasis | None, r: int, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        width = r if config.inner == "serial" else W.shape[0]
        A_i = torch.empty(config.inner_r, width, dtype=dtype, device=W.device)
        B_i = torch.empty(width, config.inner_r, dtype=dtype, device=W.device)
        if config.inner_init == "kaiming":
            kaiming_(A_i)
            B_i.zero_()
        else:
            A_i.normal_()
            B_i.normal_()
        return {"inner_A": A_i, "inner_B": B_i}

    def terms(self, core: Core, basis: OuterBasis | None) -> list[Term]:
        B_i, A_i = core["inner_B"], core["inner_A"]
        if core.config.inner == "serial":
            return [Term(core.scale, [B_i, A_i], left=[basis.B], right=[basis.A])]
        return [Term(core.scale, [B_i, A_i], right=[basis.B, basis.A])]

    def resident(self, config: NoraConfig) -> bool:
        return config.inner == "serial"  # an "out" core is d-wide, as large as a LoRA: modules, as LoRA's are

    def calibration(self, config: NoraConfig) -> tuple[float, float] | None:
        return (config.awsvd_power, config.awsvd_eps) if config.awsvd else None
