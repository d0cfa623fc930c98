"""NoRA, nested low-rank adaptation (arXiv 2408.10280): a trainable inner core nested in a frozen outer SVD.

    serial (default):  ΔW = s · B_o · C · A_o      C (r×r)
    out (paper "W_b"): ΔW = s · C · B_o · A_o      C (d×d)

    inner_core="lora" (default):  C = B_i A_i               B_i (·×r'), A_i (r'×·)
    inner_core="diag" (the authors' released code):  C = R_A diag(λ) R_B    R_A (·×r'), λ (r'), R_B (r'×·)

B_o, A_o are the rank-r (activation-aware) SVD factors of W0 with the chosen singular-value placement; s = alpha/r
with r the outer rank (alpha/√r with use_rslora). The inner rank r' is inner_r, or by default a quarter of each
layer's r (at least 1), so it follows r where a narrower layer lowers it. inner_init="kaiming" (A_i Kaiming,
B_i = 0) is an exact identity at init; "randn" leaves both inner matrices standard-normal as the authors' code
does; the diag core takes "orthogonal" (R_A, R_B orthogonal, λ = lambda_init: 0.1 in the authors' code, 0.0 for
an identity at init).
`NoraConfig.authors()` is the whole released-code form (METHODS.md).

The defaults come from the GLUE suite (BENCHMARKS.md, 3 seeds): r = 128 and r' = r/4 = 32 on placement "none"
(orthonormal outer factors) was level with LoRA on SST-2, MRPC and CoLA at 44 % of its parameters; r' = 8 on "sqrt"
(the earlier default) trailed on all three, and r' = 32 on "sqrt" collapsed on CoLA at this lr. s = alpha/r stays 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..chain import Term
from ..config import AdapterConfig
from ..errors import AdapterError
from .base import Core, Method, kaiming_, low_rank_split, middle_fit

if TYPE_CHECKING:
    from ..basis import OuterBasis


@dataclass
class NoraConfig(AdapterConfig):
    method = "nora"
    r: int | float = 128
    inner_r: int | None = None  # None: a quarter of each layer's outer rank r, at least 1
    placement: str = "none"
    inner: str = "serial"  # "serial" | "out"
    inner_core: str = "lora"  # "lora": B_i A_i | "diag": R_A diag(λ) R_B (the authors' released code)
    inner_init: str | None = None  # lora: "kaiming" (default) | "randn"; diag: "orthogonal"; None: the default
    lambda_init: float = 0.1  # the diag core's λ at init (0.0: an exact identity at init)
    awsvd: bool = False
    awsvd_power: float = 1.0
    awsvd_eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inner not in ("serial", "out"):
            raise AdapterError(f"inner={self.inner!r}: use 'serial' (C = B_i A_i) or 'out' (the paper's W_b).")
        inits = _INITS.get(self.inner_core)
        if inits is None:
            raise AdapterError(f"inner_core={self.inner_core!r}: use 'lora' (B_i A_i) or 'diag' (R_A diag(λ) R_B).")
        if self.inner_init is None:
            self.inner_init = inits[0]
        if self.inner_init not in inits:
            raise AdapterError(
                f"inner_init={self.inner_init!r} does not initialise a {self.inner_core!r} core: use one of {inits}."
            )
        if self.inner_r is None:
            return
        if self.inner_r < 1:
            raise AdapterError(f"inner_r={self.inner_r} must be a positive rank (or None: a quarter of r).")
        if isinstance(self.r, int) and self.inner_r > self.r:
            raise AdapterError(
                f"inner_r={self.inner_r} is larger than the outer rank r={self.r}; the inner LoRA must be "
                "narrower than the outer factorisation (NoRA uses r' < r): give a smaller inner_r (--inner-rank), "
                "or leave it unset for r/4."
            )

    @classmethod
    def authors(cls, r: int | float = 0.8, inner_r: int = 7, **overrides) -> NoraConfig:
        """NoRA as the authors' released code does it (lliai/LoRA-Zoo, nora/loralib/layers.py): outer B_o = U_r Σ_r
        and A_o = V_rᵀ from a randomized SVD (10 power iterations, seed 42), the core R_A diag(λ) R_B
        orthogonal-initialised with λ = 0.1, scale alpha/√r, input dropout 0.25, alpha 1 and r = 0.8·min(d, k) as
        in their CLIP runs; inner_r is their hard-coded λ length. Any field can be overridden."""
        fields = dict(
            r=r, inner_r=inner_r, inner_core="diag", inner_init="orthogonal", lambda_init=0.1, use_rslora=True,
            alpha=1.0, dropout=0.25, placement="out", svd="randomized", niter=10, seed=42,
        )  # fmt: skip
        return cls(**{**fields, **overrides})


_INITS = {"lora": ("kaiming", "randn"), "diag": ("orthogonal",)}  # the first is each core's default


class NoRA(Method):
    config_cls = NoraConfig
    default_lr = 2e-3  # from the GLUE suite, with the defaults of NoraConfig (the module's docstring)

    def rank(self, config: NoraConfig, W: torch.Tensor) -> int:
        r = config.resolve_rank(*W.shape)
        if config.inner_r is not None:  # an inner rank given must fit inside this layer's outer rank
            config.fit_rank("inner_r", config.inner_r, r, "the outer rank r",
                            "or leave inner_r unset for a quarter of each layer's r")  # fmt: skip
        return r

    def inner_rank(self, config: NoraConfig, r: int) -> int:
        """r' on a layer of outer rank r: inner_r (lowered to r where clamp_rank allowed it), or r/4."""
        return max(1, r // 4) if config.inner_r is None else min(config.inner_r, r)

    def rank_text(self, config: NoraConfig, r: int) -> str:
        return f"r={r}, r'={self.inner_rank(config, r)}"

    def _inner_shape(self, config: NoraConfig, W: torch.Tensor, r: int) -> tuple[int, int]:
        """(the inner core's width: r, or d for "out"; its rank r')."""
        return (r if config.inner == "serial" else W.shape[0]), self.inner_rank(config, r)

    def init_params(
        self, config: NoraConfig, W: torch.Tensor, basis: OuterBasis | None, r: int, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        width, q = self._inner_shape(config, W, r)
        if config.inner_core == "diag":
            R_A = nn.init.orthogonal_(torch.empty(width, q, dtype=dtype, device=W.device))
            R_B = nn.init.orthogonal_(torch.empty(q, width, dtype=dtype, device=W.device))
            lam = torch.full((q,), config.lambda_init, dtype=dtype, device=W.device)
            return {"inner_RA": R_A, "inner_lambda": lam, "inner_RB": R_B}
        A_i = torch.empty(q, width, dtype=dtype, device=W.device)
        B_i = torch.empty(width, q, dtype=dtype, device=W.device)
        if config.inner_init == "kaiming":
            kaiming_(A_i)
            B_i.zero_()
        else:
            A_i.normal_()
            B_i.normal_()
        return {"inner_A": A_i, "inner_B": B_i}

    def param_shapes(
        self, config: NoraConfig, W: torch.Tensor, basis: OuterBasis | None, r: int
    ) -> dict[str, tuple[int, ...]]:
        width, q = self._inner_shape(config, W, r)
        if config.inner_core == "diag":
            return {"inner_RA": (width, q), "inner_lambda": (q,), "inner_RB": (q, width)}
        return {"inner_A": (q, width), "inner_B": (width, q)}

    def terms(self, core: Core, basis: OuterBasis | None) -> list[Term]:
        if core.config.inner_core == "diag":
            inner = [core["inner_RA"], core["inner_lambda"], core["inner_RB"]]
        else:
            inner = [core["inner_B"], core["inner_A"]]
        if core.config.inner == "serial":
            return [Term(core.scale, inner, left=[basis.B], right=[basis.A])]
        return [Term(core.scale, inner, right=[basis.B, basis.A])]

    def fit(self, core, basis: OuterBasis | None, target: torch.Tensor) -> dict[str, torch.Tensor]:
        L, R = basis.B.double(), basis.A.double()
        serial = core.config.inner == "serial"  # else "out": ΔW = s·(inner)·B_o·A_o
        middle = (middle_fit(L, R, target) if serial else target @ torch.linalg.pinv(L @ R)) / core.scale
        q = self.inner_rank(core.config, core.r)
        if core.config.inner_core == "diag":
            U, S, Vh = torch.linalg.svd(middle, full_matrices=False)
            return {"inner_RA": U[:, :q], "inner_lambda": S[:q], "inner_RB": Vh[:q]}
        B, A = low_rank_split(middle, q)
        return {"inner_B": B, "inner_A": A}

    def resident(self, config: NoraConfig) -> bool:
        return config.inner == "serial"  # an "out" core is d-wide, as large as a LoRA: modules, as LoRA's are

    def calibration(self, config: NoraConfig) -> tuple[float, float] | None:
        return (config.awsvd_power, config.awsvd_eps) if config.awsvd else None
