"""Federated fine-tuning's aggregation core: clients' nora adapters → the global adapter, by a named rule that says
whether it is exact (LoRA-XS / SVFit "mean", NoRA "product" / "frozen-a", LoRA "ffa" / "flora": exact; LoRA, PiSSA and
DoRA "fedavg": inexact, its error measured), with the aggregation error of every layer and each client's bytes."""

from __future__ import annotations

from .aggregate import AggregationResult, aggregate, resolve_rule, rules_for, update_bytes
from .clients import ClientUpdate
from .rules import RULES, Rule

__all__ = ["RULES", "AggregationResult", "ClientUpdate", "Rule", "aggregate", "resolve_rule", "rules_for",
           "update_bytes"]  # fmt: skip
