"""Plan → SVD → basis: what adding an adapter to layers needs before its tensors exist, done once for module
adapters (model.py) and resident ones (resident.py): each layer's rank and fingerprint, the missing SVDs solved
together (or read from the basis cache), and the outer bases made on their layers."""

from __future__ import annotations

import warnings

import torch

from .basis import compute_factors
from .config import AdapterConfig, RankError
from .errors import AdapterError
from .layers import AdapterLayer, AdapterPlan
from .methods import Method


def plan_bases(
    config: AdapterConfig,
    method: Method,
    layers: dict[str, AdapterLayer],
    scales: dict[str, torch.Tensor],
    ranks: dict[str, int],
    keys: dict[str, str],
    sources: dict[str, torch.Tensor],
) -> tuple[dict[str, AdapterPlan], list[tuple[AdapterLayer, str]]]:
    """Each layer's plan, with the basis it needs present on the layer. A layer's rank comes from `ranks` (a file's,
    checked already) or from the config's rank rule, which lowers a default rank on a narrower layer (one warning,
    `_warn_lowered`) and refuses a rank given there. Returns the plans and the (layer, basis key) made here, which
    the caller gives back with `release_bases` if what it does next fails."""
    plans = {}
    for n, layer in layers.items():
        try:
            plans[n] = layer.plan(config, method, scales.get(n), ranks.get(n), keys.get(n), sources.get(n))
        except RankError as e:
            d, k = layer.shape
            raise AdapterError(f"{n} ({d}×{k} weight): {e}") from None
    _warn_lowered(config, method, layers, {n: p for n, p in plans.items() if n not in ranks})
    requests = [p.request for p in plans.values() if p.request is not None]
    factors = compute_factors(requests, config.svd_settings, config.basis_cache_dir, f"{method.name} SVD")
    made: list[tuple[AdapterLayer, str]] = []
    try:
        for n, layer in layers.items():
            request = plans[n].request
            if layer.ensure_basis(plans[n], config, method, factors.get(request.key) if request else None):
                made.append((layer, plans[n].basis_key))
    except BaseException:
        release_bases(made)
        raise
    return plans, made


def release_bases(made: list[tuple[AdapterLayer, str]]) -> None:
    """Drop the bases `plan_bases` made that no adapter uses (after a failure)."""
    for layer, basis_key in made:
        layer.release_basis(basis_key)


def _warn_lowered(config: AdapterConfig, method: Method, layers: dict[str, AdapterLayer], plans: dict) -> None:
    """One warning for the layers that took a lower rank than the config's r, naming the narrowest and their ranks."""
    if not isinstance(config.r, int) or isinstance(config.r, bool):  # a fraction of min(d, k), or a rank rule
        return
    order = {n: i for i, n in enumerate(plans)}
    lowered = sorted((n for n, p in plans.items() if p.r < config.r), key=lambda n: (plans[n].r, order[n]))
    if not lowered:
        return
    shapes = {n: "×".join(map(str, layers[n].shape)) for n in lowered[:3]}
    narrowest = "; ".join(f"{n} ({shapes[n]}): {method.rank_text(config, plans[n].r)}" for n in lowered[:3])
    rest = sorted({plans[n].r for n in lowered[3:]})
    if rest:
        narrowest += f"; the other {len(lowered) - 3} take r={rest[0]}" + (f"…{rest[-1]}" if len(rest) > 1 else "")
    given = config.is_given("r")
    warnings.warn(
        f"{type(config).__name__}: {'' if given else 'the default '}rank r={config.r} is wider than {len(lowered)} "
        f"of {len(plans)} adapted layers, so each of those takes its min(d, k). The narrowest: {narrowest}. "
        + ("(clamp_rank=True lowered it.)" if given else "Give r= (nora train --rank) to choose the rank yourself."),
        stacklevel=6,  # get_peft_model's caller
    )
