"""Server-side aggregation of N clients' adapters into the global one, by a named rule (rules.py), with the
aggregation error ‖Σ p_i ΔW_i − ΔW_global‖_F of every layer measured through the method's own ΔW (nora.chain).

The server is an AdaptedModel holding the global adapter on the shared base: it gives each layer's frozen basis, the
weights' digest every client's basis fingerprint must match, and the global adapter's config and ranks. Every
check runs before any tensor is combined.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..chain import terms_product
from ..config import AdapterConfig
from ..errors import AdapterError
from ..io import SAVE_PREFIX, write_adapter
from ..methods import CoreView, get_method
from ..model import AdaptedModel
from ..state import adapter_payload
from ..svd import choose_solver
from .clients import ClientUpdate
from .rules import DEFAULT_RULE, RULES, ClientLayer, LayerJob, Rule, sliced_basis, weighted

# Fields a client's config may hold apart from the server's: its ranks (heterogeneous ranks are checked per layer
# against the nested basis) and what does not enter ΔW.
_FREE_FIELDS = {"r", "inner_r", "energy", "clamp_rank", "dropout", "base_model_name_or_path", "basis_cache_dir"}


@dataclass
class AggregationResult:
    """The global adapter (`state` + `payload`, as nora saves one), the rule used, whether the global ΔW is exactly
    Σ p_i ΔW_i on every layer, each layer's measured error ‖Σ p_i ΔW_i − ΔW_global‖_F, and the bytes each client's
    update holds under this rule (update_bytes)."""

    state: dict[str, torch.Tensor]
    payload: dict[str, Any]
    rule: str
    exact: bool
    errors: dict[str, float]
    bytes: dict[str, int]
    note: str = ""

    @property
    def config(self) -> AdapterConfig:
        return AdapterConfig.from_dict({k: v for k, v in self.payload.items() if k != "nora"})

    def save(self, directory: str | os.PathLike) -> None:
        """Write the global adapter as an ordinary nora adapter directory (AdaptedModel.load_adapter reads it)."""
        write_adapter(self.state, self.payload, directory)


def rules_for(method: str) -> list[str]:
    """The rule names `method` can aggregate by (none: the method has no federated rule)."""
    return list(RULES.get(method, {}))


def resolve_rule(method: str, rule: str | None) -> Rule:
    """The rule for `method`: the one named, or the method's exact default; refused, naming the choices, where the
    method has none (LoRA, PiSSA, DoRA, NoRA need the user's choice) or the name is not one of them."""
    choices = RULES.get(method)
    if not choices:
        raise AdapterError(f"method {method!r} has no federated aggregation rule; nora aggregates {sorted(RULES)}.")
    if rule is None:
        if method not in DEFAULT_RULE:
            raise AdapterError(
                f"a {method} adapter cannot be aggregated exactly without a choice of rule: give rule= one of "
                f"{sorted(choices)} ({_describe(choices)})."
            )
        rule = DEFAULT_RULE[method]
    if rule not in choices:
        raise AdapterError(f"rule {rule!r} does not aggregate {method} adapters; use one of {sorted(choices)}.")
    return choices[rule]


def _describe(choices: dict[str, Rule]) -> str:
    return "; ".join(f"{n}: {'exact' if r.exact else 'inexact'}{', ' + r.note if r.note else ''}"
                     for n, r in choices.items())  # fmt: skip


def update_bytes(tensors: dict[str, torch.Tensor], rule: Rule | str, method: str | None = None) -> int:
    """Bytes a client sends for one update under `rule`: its trainable tensors and modules_to_save, less the factors
    the rule keeps frozen and shared (and the AwSVD scales, which the basis fingerprint already pins)."""
    if isinstance(rule, str):
        if method is None:
            raise AdapterError("update_bytes: give method= with a rule named by a string.")
        rule = resolve_rule(method, rule)
    return sum(t.numel() * t.element_size() for key, t in tensors.items() if is_sent(key, rule))


def is_sent(key: str, rule: Rule) -> bool:
    """Whether a client sends tensor `key` under `rule` (and the server sends it back): all but the factors the
    rule keeps frozen and shared, and the AwSVD scales."""
    if key.startswith(SAVE_PREFIX):
        return True
    pname = key.rsplit(".", 1)[-1]
    return pname != "awsvd_scale" and pname not in rule.frozen


def aggregate(
    server: AdaptedModel,
    clients: Sequence[ClientUpdate],
    weights: Sequence[float],
    rule: str | None = None,
    adapter_name: str = "default",
) -> AggregationResult:
    """The global adapter from `clients` weighted by `weights` (e.g. example counts; normalised to sum to 1).

    `server` holds the global adapter `adapter_name` on the clients' base model. `rule` is required for LoRA,
    PiSSA, DoRA and NoRA (rules.py says which rule is exact); LoRA-XS and SVFit default to their exact "mean".
    """
    config = server.peft_config.get(adapter_name)
    if config is None:
        raise AdapterError(f"the server model has no adapter {adapter_name!r}; it holds {sorted(server.peft_config)}.")
    method = get_method(config.method)
    chosen = resolve_rule(method.name, rule)
    p = _normalised(clients, weights)
    server_state, server_payload = adapter_payload(server, adapter_name)
    layers = {n: layer for n, layer in server.layers().items() if n in server_payload["nora"]["layers"]}
    jobs = [_job(lname, layer, adapter_name, method, config, chosen, clients, p) for lname, layer in
            layers.items()]  # fmt: skip
    _check_extra_keys(clients, jobs, server_state)
    if chosen.name == "flora":
        _check_stacked_rank(jobs)
    # every client is checked: now combine
    state, meta = dict(server_state), server_payload["nora"]
    errors, truncated, ranks = {}, False, {}
    for job in jobs:
        combined = chosen.combine(job)
        layer = layers[job.lname]
        dtype = layer.param_dtype()
        for pname in [k for k in state if k.rsplit(".", 1)[0] == job.lname and not k.endswith(".awsvd_scale")]:
            del state[pname]
        state.update({f"{job.lname}.{k}": v.to(dtype).contiguous() for k, v in combined.tensors.items()})
        if combined.r != job.R:
            meta["layers"][job.lname]["r"] = combined.r
            meta["layers"][job.lname]["fingerprint"] = layer.plan(config, method, r=combined.r).key
        ranks[job.lname] = combined.r
        truncated |= combined.truncated
        errors[job.lname] = _error(job, combined)
    for key in [k for k in server_state if k.startswith(SAVE_PREFIX)]:
        state[key] = sum(pi * c.tensors[key].double() for pi, c in zip(p, clients, strict=True)).to(
            server_state[key].dtype
        )
    payload = {**_config_with_ranks(config, ranks, jobs).to_dict(), "nora": meta}
    note = chosen.note + (" (truncated on some layer: the error is what the re-factor dropped)" if truncated else "")
    return AggregationResult(
        state, payload, chosen.name, chosen.exact and not truncated, errors,
        {c.name: update_bytes(c.tensors, chosen) for c in clients}, note,
    )  # fmt: skip


def _normalised(clients: Sequence[ClientUpdate], weights: Sequence[float]) -> list[float]:
    if not clients:
        raise AdapterError("no client updates to aggregate: give at least one client.")
    if len(weights) != len(clients):
        raise AdapterError(f"{len(weights)} weights for {len(clients)} clients: give one weight per client.")
    names = [c.name for c in clients]
    if len(set(names)) != len(names):
        raise AdapterError(f"client names repeat ({names}): give each client its own name, so errors can name it.")
    for c, w in zip(clients, weights, strict=True):
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w <= 0:
            raise AdapterError(
                f"client {c.name!r} has weight {w!r}: weights must be positive finite numbers (e.g. example counts); "
                "leave a client with no data out of the round."
            )
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def _job(lname, layer, adapter_name, method, config, rule, clients, p) -> LayerJob:
    core = layer.core(adapter_name)
    R, W = core.r, layer.base_weight().detach()
    basis = layer.basis_of(core)
    basis64 = None
    if basis is not None:
        basis64 = type(basis)(basis.B.double(), basis.A.double(), basis.S.double(), basis.key, basis.scales)
    parts = [_client_layer(c, lname, layer, method, config, rule, R, W, basis64) for c in clients]
    return LayerJob(lname, method, config, R, basis64, parts, p, W.double())


def _client_layer(client, lname, layer, method, config, rule, R, W, basis) -> ClientLayer:
    """The client's tensors of layer `lname`, checked: its config, layer, basis fingerprint, rank, shapes, values."""
    who = f"client {client.name!r}"
    if client.config.method != config.method:
        raise AdapterError(f"{who} sent a {client.config.method} adapter; this round aggregates {config.method}.")
    ours, theirs = config.to_dict(), client.config.to_dict()
    differ = sorted(k for k in set(ours) | set(theirs) if k not in _FREE_FIELDS and ours.get(k) != theirs.get(k))
    if differ:
        raise AdapterError(
            f"{who}'s adapter config differs from the global one in {differ} "
            f"({', '.join(f'{k}={theirs.get(k)!r} vs {ours.get(k)!r}' for k in differ[:3])}): train every client "
            "from the global adapter's config."
        )
    info = client.layers.get(lname)
    if info is None:
        raise AdapterError(f"{who} has no update for layer {lname!r}; every client must adapt the global layers.")
    r = info.get("r")
    if type(r) is not int or r < 1:
        raise AdapterError(f"{who}: layer {lname!r} records no rank r ({r!r}); its adapter metadata is damaged.")
    if list(info.get("shape", [])) != list(layer.shape):
        raise AdapterError(f"{who}: layer {lname!r} is {info.get('shape')} there but {list(layer.shape)} here.")
    scales = None if basis is None else basis.scales  # the server's: a client with other AwSVD scales is refused
    if info.get("fingerprint") != layer.plan(config, method, scales=scales, r=r).key:
        raise AdapterError(
            f"{who} was trained on another basis: layer {lname!r}'s fingerprint differs from the server's (another "
            "base model, or other SVD settings). It is refused: every client must adapt the server's base model."
        )
    if r != R:
        _check_rank(who, lname, layer, config, rule, r, R, W)
    shapes = method.param_shapes(client.config, W, None if basis is None else sliced_basis(basis, r), r)
    tensors = {}
    for pname, shape in shapes.items():
        t = client.tensors.get(f"{lname}.{pname}")
        if t is None:
            raise AdapterError(f"{who} lacks tensor {lname}.{pname}; its update is incomplete.")
        if tuple(t.shape) != tuple(shape):
            raise AdapterError(f"{who}: tensor {lname}.{pname} is {list(t.shape)}, expected {list(shape)} (r={r}).")
        if not torch.isfinite(t).all():
            raise AdapterError(f"{who}: tensor {lname}.{pname} holds NaN or inf; that client's training diverged.")
        tensors[pname] = t.detach().double()
    missing = [k for k in rule.frozen if k not in tensors]
    if missing:
        raise AdapterError(f"rule {rule.name!r} freezes {missing}, which this {config.method} adapter does not have.")
    return ClientLayer(client.name, tensors, r, client.config)


def _check_rank(who, lname, layer, config, rule, r, R, W) -> None:
    if not rule.heterogeneous:
        raise AdapterError(
            f"{who}: layer {lname!r} has rank {r} but the global adapter {R}; rule {rule.name!r} needs equal ranks."
        )
    if get_method(config.method).uses_basis:
        if r > R:
            raise AdapterError(
                f"{who}: layer {lname!r} has rank {r} above the global adapter's {R}: give the global adapter the "
                "largest client rank, so every client's basis nests inside it."
            )
        if getattr(config, "inner", "serial") != "serial":
            raise AdapterError(f"{who}: layer {lname!r} has rank {r}, not {R}; inner='out' needs equal ranks.")
        solvers = {choose_solver(tuple(W.shape), n, config.svd_settings) for n in (r, R)}
        if solvers != {"exact"}:
            raise AdapterError(
                f"{who}: layer {lname!r} has rank {r}, not {R}, and its SVD is randomized, so the rank-{r} basis is "
                "not the top of the rank-{R} one: use svd='exact' for heterogeneous ranks, or equal ranks."
            )


def _check_stacked_rank(jobs: list[LayerJob]) -> None:
    for job in jobs:
        rank, limit = sum(c.r for c in job.clients), min(job.W0.shape)
        if rank > limit:
            raise AdapterError(
                f"FLoRA stacking gives layer {job.lname!r} rank Σ r_i = {rank}, above its min(d, k) = {limit}: "
                "aggregate fewer clients per round, give them lower ranks, or use rule 'ffa' (exact, rank kept)."
            )


def _check_extra_keys(clients: Sequence[ClientUpdate], jobs: list[LayerJob], server_state) -> None:
    known = {f"{j.lname}.{k}" for j in jobs for c in j.clients for k in c.tensors}
    known |= {f"{j.lname}.awsvd_scale" for j in jobs} | {k for k in server_state if k.startswith(SAVE_PREFIX)}
    for c in clients:
        extra = sorted(set(c.tensors) - known)
        if extra:
            raise AdapterError(f"client {c.name!r} sent tensors the global adapter has no place for: {extra[:5]}.")
        for key in (k for k in server_state if k.startswith(SAVE_PREFIX)):
            t = c.tensors.get(key)
            if t is None or t.shape != server_state[key].shape or not torch.isfinite(t).all():
                raise AdapterError(f"client {c.name!r}: {key} is missing, of another shape, or not finite.")
        extra_layers = sorted(set(c.layers) - {j.lname for j in jobs})
        if extra_layers:
            raise AdapterError(f"client {c.name!r} adapts layers the global adapter does not: {extra_layers[:5]}.")


def delta_weight(job: LayerJob, tensors: dict[str, torch.Tensor], r: int, config: AdapterConfig) -> torch.Tensor:
    """ΔW of one layer's tensors, through the method's terms (or, for DoRA, its merge) in float64."""
    method = job.method
    core = CoreView(tensors, method.scale(config, r), config)
    basis = None if job.basis is None else sliced_basis(job.basis, r)
    if method.variant is None:
        return terms_product(method.terms(core, basis))
    return method.variant.merge(method, core, job.W0)[0] - job.W0


def _error(job: LayerJob, combined) -> float:
    target = sum(p * delta_weight(job, c.tensors, c.r, c.config) for p, c in weighted(job))
    glob = delta_weight(job, combined.tensors, combined.r, job.config)
    return float(torch.linalg.matrix_norm(target - glob))


def _config_with_ranks(config: AdapterConfig, ranks: dict[str, int], jobs: list[LayerJob]) -> AdapterConfig:
    """The global config; where a rule changed the ranks (FLoRA) and every layer shares the new one, r says it (the
    per-layer ranks in the metadata are what a load uses either way)."""
    changed = any(ranks[j.lname] != j.R for j in jobs)
    if changed and len(set(ranks.values())) == 1:
        return dataclasses.replace(config, r=next(iter(ranks.values())))
    return config
