"""Adapter configurations: one dataclass per method over one common base, serialised as adapter_config.json."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import AdapterError
from .registry import get_method
from .svd import PLACEMENTS, SVDSettings


class RankError(AdapterError):
    """A rank the user gave that one layer cannot take (the layer's name is added where it is known)."""


@dataclass
class AdapterConfig:
    """Fields every method shares. `r` is the adapter (or outer) rank: an int, or a fraction of min(d, k).

    Each method's config class holds its one set of defaults, which `nora train`, YAML files and every task use too.
    A rank left at its default is lowered on a layer narrower than it (to min(d, k), with one warning per model that
    names the narrowest layers); a rank you give is exact, and a layer it does not fit is an error naming the layer,
    unless you also give clamp_rank=True. clamp_rank=False refuses to lower even a default rank."""

    method: ClassVar[str] = ""
    _given: ClassVar[frozenset[str]] = frozenset()  # per instance: the fields its caller gave (see __new__)
    rank_rule: ClassVar[bool] = False  # whether r=None chooses each layer's rank by a rule of the method's own

    r: int | float = 8
    alpha: float | None = None
    use_rslora: bool = False
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    # Fused MoE expert parameters (nora.inject.expert_targets): None = every one under target_modules="all-linear",
    # none otherwise; "all-experts"; or names as PEFT's target_parameters ("mlp.experts.gate_up_proj").
    target_parameters: str | list[str] | None = None
    svd: str = "auto"  # "auto" | "exact" | "randomized": see nora.svd.SVDSettings
    niter: int = 8
    oversample: int = 16
    seed: int = 0
    svd_dtype: str = "float32"
    placement: str = "sqrt"
    basis_cache_dir: str | None = None
    base_model_name_or_path: str | None = None
    clamp_rank: bool | None = None  # None: True when r is left at its default, else False (see the class doc)

    def __new__(cls, *args: Any, **kwargs: Any) -> AdapterConfig:
        # Remember which fields the caller gave: a rank left at its default may be lowered to fit a layer, a rank
        # given may not (dataclasses.replace and from_dict give every field, so their ranks are exact).
        config = super().__new__(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        config._given = frozenset(names[: len(args)]).union(kwargs)
        return config

    def __post_init__(self) -> None:
        if self.clamp_rank is None:
            self.clamp_rank = not self.is_given("r")
        if self.placement not in PLACEMENTS:
            raise AdapterError(f"placement={self.placement!r} is not one of {PLACEMENTS}.")
        by_rule = self.r is None and self.rank_rule  # SVFit: r=None, the energy rule
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

    def is_given(self, field: str) -> bool:
        """Whether the caller gave `field` (else it holds the class default)."""
        return field in self._given

    @property
    def svd_settings(self) -> SVDSettings:
        return SVDSettings(self.svd, self.niter, self.oversample, self.seed, self.svd_dtype)

    def resolve_rank(self, d: int, k: int) -> int:
        """The rank r of a d × k layer: a fraction of min(d, k), or r itself, lowered to min(d, k) where allowed."""
        r = max(1, int(self.r * min(d, k))) if isinstance(self.r, float) else self.r
        return self.fit_rank("r", r, min(d, k), "min(d, k)", "or a fraction such as r=0.5")

    def fit_rank(self, field: str, value: int, limit: int, what: str, other: str = "") -> int:
        """Rank field `field`'s `value` on a layer that takes at most `limit` (`what` says why): itself where it
        fits; else `limit` where the field may be lowered (left at its default, or clamp_rank=True given); else a
        RankError naming the fix."""
        if value <= limit:
            return value
        if self.clamp_rank if self.is_given("clamp_rank") else not self.is_given(field):
            return limit
        flag = RANK_FLAGS.get(field)
        spellings = f"--{flag} for nora train, {flag.replace('-', '_')}: in YAML" if flag else "--adapter-option"
        raise RankError(
            f"rank {field}={value} is larger than {what}={limit} here. Give a rank that fits ({field} ≤ {limit}: "
            f"{field}= in Python, {spellings}){', ' + other if other else ''}, or clamp_rank=True (nora train "
            "--clamp-rank) to lower it on each layer it does not fit."
        )

    def scale(self, r: int) -> float:
        alpha = self.alpha if self.alpha is not None else float(r)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["method"] = self.method
        if d["target_parameters"] is None:  # the files of models without experts stay as they were
            del d["target_parameters"]
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> AdapterConfig:
        d = dict(d)
        cls = get_method(d.pop("method", None)).config_cls
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


RANK_FLAGS = {"r": "rank", "inner_r": "inner-rank"}  # the nora train option that sets each rank field


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
