"""A federated run's settings: the training settings every party shares (model, method, adapter, batch, learning
rate, seed) and the federation's own, each checked before any model or data loads."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from ..training.config import TrainConfig
from .aggregate import resolve_rule
from .participant import FederatedError, check_federable
from .ranks import check_client_ranks
from .rules import Rule
from .splits import SCHEMES

FILES = "files"  # one data file per client


@dataclass
class FederatedConfig:
    """`train.data` is split into `clients` by `split` ("iid"; "dirichlet" or "dirichlet-equal", the label skew with
    equal client sizes, with `alpha`), or with split="files"
    each of `client_data` is one client's data. Each round samples `clients_per_round` clients (None: all), each
    takes `local_steps` optimizer steps from the global adapter, and the server aggregates by `rule`. With
    `dp_noise` and `dp_clip`, every client's update is clipped to L2 norm `dp_clip` and Gaussian noise of
    `dp_noise` × `dp_clip` / (clients per round) is added to the aggregate (central DP; ε at `dp_delta` reported).
    `client_ranks` gives client i rank client_ranks[i] ≤ the global r (LoRA-XS, SVFit: ranks.py)."""

    train: TrainConfig
    clients: int = 10
    split: str = "iid"
    alpha: float | None = None
    client_data: list[str] | None = None
    rounds: int = 5
    clients_per_round: int | None = None
    local_steps: int = 10
    rule: str | None = None
    dp_noise: float | None = None
    dp_clip: float | None = None
    dp_delta: float = 1e-5
    client_ranks: list[int] | None = None
    output_dir: str = "runs/federated"
    resume: bool = False
    overwrite: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> Rule:
        """Every setting checked (nothing loads); returns the aggregation rule."""
        if self.train.data is None and self.split != FILES:
            raise FederatedError("no training data: pass --data (split between the clients) or --client-data files.")
        if self.split not in (*SCHEMES, FILES):
            raise FederatedError(f"unknown --split {self.split!r}: use one of {', '.join((*SCHEMES, FILES))}.")
        if self.split == FILES:
            if not self.client_data or len(self.client_data) < 1:
                raise FederatedError("--split files needs one --client-data file per client.")
            self.clients = len(self.client_data)
        elif self.client_data:
            raise FederatedError("--client-data gives each client its own file: use it with --split files only.")
        skewed = self.split.startswith("dirichlet")
        if skewed and self.alpha is None:
            raise FederatedError(f"--split {self.split} needs --dirichlet-alpha: 0.1 (label-skewed) to 100 (near IID).")
        if self.alpha is not None and (not skewed or not (math.isfinite(self.alpha) and self.alpha > 0)):
            raise FederatedError("--dirichlet-alpha (Dirichlet concentration) is positive, for --split dirichlet.")
        _positive("--rounds", self.rounds, "a federated run needs at least one round")
        _positive("--clients", self.clients, "a federated run needs at least one client")
        _positive("--local-steps", self.local_steps, "each client takes at least one optimizer step per round")
        if self.clients_per_round is not None:
            _positive("--clients-per-round", self.clients_per_round, "each round needs at least one client")
            if self.clients_per_round > self.clients:
                raise FederatedError(
                    f"--clients-per-round {self.clients_per_round} is more than the {self.clients} clients."
                )
        if (self.dp_noise is None) != (self.dp_clip is None):
            raise FederatedError("differential privacy needs both --dp-noise (noise multiplier) and --dp-clip (norm).")
        if self.dp_noise is not None:
            if not (self.dp_noise > 0 and math.isfinite(self.dp_noise)) or not (
                self.dp_clip > 0 and math.isfinite(self.dp_clip)
            ):
                raise FederatedError("--dp-noise and --dp-clip must be positive finite numbers.")
            if not 0 < self.dp_delta < 1:
                raise FederatedError(f"--dp-delta {self.dp_delta} must lie in (0, 1), e.g. 1e-5.")
        if self.dp_noise is not None and self.rule == "flora":
            raise FederatedError("central DP clips each client's change to the global tensors, which FLoRA's fresh "
                                 "per-round factors are not: use --rule ffa or fedavg with --dp-noise.")  # fmt: skip
        if self.train.max_steps is not None or self.train.eval_steps or self.train.save_steps:
            raise FederatedError("a federated run counts --local-steps per round and --rounds, not --max-steps, "
                                 "--eval-steps or --save-steps: leave those out.")  # fmt: skip
        check_federable(self.train)
        try:
            rule = resolve_rule(self.train.method, self.rule)
        except Exception as e:
            raise FederatedError(str(e).replace("give rule=", "give --rule")) from e
        if self.client_ranks is not None:
            check_client_ranks(self.train, self.client_ranks, self.clients)
        return rule

    def rank_of(self, client: int) -> int | None:
        """Client `client`'s own rank, where it is below the global adapter's (None: the global rank)."""
        if self.client_ranks is None or self.client_ranks[client] == self.train.adapter_config().r:
            return None
        return self.client_ranks[client]

    @property
    def per_round(self) -> int:
        return self.clients_per_round or self.clients

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what federation.json records and what a Flower app is configured with (from_dict)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "train"}
        return {"train": self.train.resolved(), **out}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FederatedConfig:
        values = dict(values)
        return cls(train=TrainConfig.from_dict(values.pop("train")), **values)

    def changes_since(self, recorded: dict[str, Any]) -> list[str]:
        """The settings that differ from a recorded run's (all but --rounds, which a resume may extend)."""
        now = json.loads(json.dumps(self.to_dict()))
        keys = sorted(set(now) - {"rounds", "output_dir", "resume", "overwrite", "train"})
        changed = [k for k in keys if now.get(k) != recorded.get(k)]
        old = recorded.get("train")
        if not isinstance(old, dict):
            return [*changed, "train"]
        return changed + [f"train.{k}" for k in self.train.changes_since(old)]


def _positive(flag: str, value: object, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FederatedError(f"{flag} {value!r}: {why}; give a whole number >= 1.")
