"""Adapter configurations: one dataclass per method over one common base, serialised as adapter_config.json."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
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
    svd: str = "auto"  # "auto" | "exact" | "randomized": see nora.svd.SVDSettings
    niter: int = 8
    oversample: int = 16
    seed: int = 0
    svd_dtype: str = "float32"
    placement: str = "sqrt"
    basis_cache_dir: str | None = None
    base_model_name_or_path: str | None = None
    clamp_rank: bool = False  # a layer narrower than r takes r = min(d, k) (with a warning) instead of refusing

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise AdapterError(f"placement={self.placement!r} is not one of {PLACEMENTS}.")
        by_rule = self.r is None and self.__dataclass_fields__["r"].default is None  # SVFit: r=None, energy rule
        if not by_rule and (isinstance(self.r, bool) or not isinstance(self.r, int | float)):
            raise AdapterError(f"r={self.r!r} must be a number: a rank ≥ 1, or a fraction in (0, 1] of min(d, k).")
        if isinstance(self.r, float) and self.r > 1 and self.r.is_integer():
            self.r = int(self.r)
        if not by_rule and (not self.r > 0 or (isinstance(self.r, float) and self.r > 1)):
            raise AdapterError(
                f"r={self.r} is not a rank: give a whole number ≥ 1 (e.g. r=8), or a fraction in (0, 1] of each "
                "layer's min(d, k) (e.g. r=0.25)."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"dropout={self.dropout} must lie in [0, 1).")
        _ = self.svd_settings  # validates the solver fields

    @property
    def svd_settings(self) -> SVDSettings:
        return SVDSettings(self.svd, self.niter, self.oversample, self.seed, self.svd_dtype)

    def resolve_rank(self, d: int, k: int) -> int:
        r = max(1, int(self.r * min(d, k))) if isinstance(self.r, float) else self.r
        return min(r, d, k) if self.clamp_rank else r

    def scale(self, r: int) -> float:
        alpha = self.alpha if self.alpha is not None else float(r)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["method"] = self.method
        return d

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "method" in cls.__dict__ and cls.method:  # a subclass that names its own method
            CONFIGS[cls.method] = cls

    @staticmethod
    def from_dict(d: dict[str, Any]) -> AdapterConfig:
        d = dict(d)
        cls = config_class(d.pop("method", None))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise AdapterError(
                f"adapter_config.json has fields {unknown} that {cls.__name__} does not know; the file was "
                "written by another nora version or edited by hand."
            )
        hints, declared = typing.get_type_hints(cls), {f.name: f.type for f in dataclasses.fields(cls)}
        wrong = [f"{k}={repr(v)[:40]} (not {declared[k]})" for k, v in sorted(d.items()) if not fits_type(v, hints[k])]
        if wrong:
            raise AdapterError(
                f"adapter_config.json gives {cls.__name__} values of the wrong type: {'; '.join(wrong[:5])}. The file "
                "was edited or damaged: fix these fields, or save the adapter again."
            )
        cache = d.get("basis_cache_dir")
        if cache is not None and ("\x00" in cache or not cache.isprintable()):
            raise AdapterError(
                f"adapter_config.json: basis_cache_dir={cache!r} is no usable path (it holds control characters or "
                "invalid Unicode); fix the field, or set it to null."
            )
        return cls(**d)


CONFIGS: dict[str, type[AdapterConfig]] = {}  # method name → its config class (each subclass registers itself)


def config_class(method: object) -> type[AdapterConfig]:
    if not isinstance(method, str) or method not in CONFIGS:  # a file's "method" may be any JSON value
        raise AdapterError(
            f"unknown adapter method {method!r}; nora knows {sorted(CONFIGS)}. If this file came from another "
            "tool (e.g. a PEFT LoRA adapter), load it with that tool."
        )
    return CONFIGS[method]


def fits_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value has the type of a config field (bool is no int; floats are finite; ints ≤ 2**63)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits_type(value, h) for h in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(fits_type(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and -1e308 < value < 1e308  # no NaN
    if hint is str:
        return isinstance(value, str)
    return isinstance(value, hint) if isinstance(hint, type) else True
