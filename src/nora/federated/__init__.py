"""Federated fine-tuning: clients' nora adapters aggregated into a global one by a named rule that says whether it
is exact (LoRA-XS / SVFit "mean", NoRA "product" / "frozen-a", LoRA "ffa" / "flora": exact; LoRA, PiSSA and DoRA
"fedavg": inexact, its error measured), and whole runs of rounds on Flower (`federate`, `nora federate`)."""

from __future__ import annotations

from .aggregate import AggregationResult, aggregate, resolve_rule, rules_for, update_bytes
from .clients import ClientUpdate
from .config import FederatedConfig
from .participant import FederatedError, Participant
from .rules import RULES, Rule
from .run import FederatedResult, federate
from .splits import SplitError, check_clients, dirichlet_split, iid_split, split_examples

__all__ = ["RULES", "AggregationResult", "ClientUpdate", "FederatedConfig", "FederatedError", "FederatedResult",
           "Participant", "Rule", "SplitError", "aggregate", "check_clients", "dirichlet_split", "federate",
           "iid_split", "resolve_rule", "rules_for", "split_examples", "update_bytes"]  # fmt: skip
