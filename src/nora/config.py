"""Adapter configurations: one dataclass per method over one common base, serialised as adapter_config.json."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import AdapterError
from .svd import PLACEMENTS, SVDSettings


@dataclass
class AdapterConfig:
    """Fields every method shares. `r` is the adapter (or outer) rank: an int, or a fraction of min(d, k)."""

    method: ClassVar[str] = ""

    r: int | float = 8
    alpha: float | None = None
    use_rslora: bool = False
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    svd: str = "randomized"
    niter: int = 8
    oversample: int = 16
    seed: int = 0
    svd_dtype: str = "float32"
    placement: str = "sqrt"
    basis_cache_dir: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise AdapterError(f"placement={self.placement!r} is not one of {PLACEMENTS}.")
        if isinstance(self.r, float) and not 0.0 < self.r <= 1.0:
            raise AdapterError(f"r={self.r} as a fraction must lie in (0, 1]; give an int for an absolute rank.")
        if isinstance(self.r, int) and self.r < 1:
            raise AdapterError(f"r={self.r} must be a positive rank.")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"dropout={self.dropout} must lie in [0, 1).")
        _ = self.svd_settings  # validates the solver fields

    @property
    def svd_settings(self) -> SVDSettings:
        return SVDSettings(self.svd, self.niter, self.oversample, self.seed, self.svd_dtype)

    def resolve_rank(self, d: int, k: int) -> int:
        return max(1, int(self.r * min(d, k))) if isinstance(self.r, float) else self.r

    def scale(self, r: int) -> float:
        alpha = self.alpha if self.alpha is not None else float(r)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["method"] = self.method
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> AdapterConfig:
        from .methods import get_method

        d = dict(d)
        cls = get_method(d.pop("method", None)).config_cls
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise AdapterError(
                f"adapter_config.json has fields {unknown} that {cls.__name__} does not know; the file was "
                "written by another nora version or edited by hand."
            )
        return cls(**d)
