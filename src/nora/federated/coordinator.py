"""The two sides of a federated round, apart from how messages travel (Flower carries them: flower.py).

    server: Coordinator.instructions(round) → each sampled client: train_client(...) → Reply
            → Coordinator.absorb(round, replies): clip (DP), aggregate by the rule, noise (DP), evaluate, save

Everything a round does is a function of the global adapter, the run's seed and the round number (the clients it
samples, each client's data order and dropout), so a run resumed after a kill takes exactly the rounds it would have.
The one exception is DP noise: drawn from a secret the server keeps in the run directory (dp-noise.secret, mode
0600), never from the run's seed, which every party knows; so a resumed run adds the same noise and no client can
subtract it.
The run directory holds federation.json (the settings), rounds.jsonl (one line per round), round-NNNN/ (the global
adapter after each round, an ordinary nora adapter) and adapter/ (the latest).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import secrets
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_write_bytes, atomic_write_json
from ..config import AdapterConfig
from ..io import SAVE_PREFIX, read_adapter, write_adapter
from ..state import adapter_payload
from ..tasks.data import split_eval
from ..training.build import loading
from . import ranks, stacking
from .aggregate import aggregate, is_sent
from .clients import ClientUpdate
from .config import FILES, FederatedConfig
from .participant import FederatedError, Participant, base_fingerprint
from .rules import Rule
from .splits import SplitError, check_clients, split_examples

NOISE_SECRET = "dp-noise.secret"  # the server's secret seed of the DP noise, in the run directory


@dataclass
class ClientData:
    """Every client's encoded examples (and name), the server's evaluation examples and the label set."""

    names: list[str]
    examples: list[list[dict[str, Any]]]
    eval_examples: list[dict[str, Any]]
    labels: list[str] | None


@dataclass
class Reply:
    """A client's answer to one round: the tensors it trained (the rule's frozen ones left out), its adapter's
    metadata and config, its example count and mean training loss."""

    client: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    config: dict[str, Any]
    num_examples: int
    train_loss: float


def load_tokenizer(fc: FederatedConfig) -> Any:
    return loading(fc.train.model, lambda: fc.train.kind.load_processor(fc.train))


def client_data(fc: FederatedConfig, tokenizer: Any) -> ClientData:
    """Read, encode and divide the data: the same on every party (the split is seeded), checked before training."""
    try:
        return _client_data(fc, tokenizer)
    except SplitError as e:
        raise FederatedError(str(e)) from e


def _client_data(fc: FederatedConfig, tokenizer: Any) -> ClientData:
    train, task = fc.train, fc.train.kind
    if fc.split == FILES:
        sources = list(fc.client_data or [])
        rows = [task.read_rows(train, source, True) for source in sources]
        names = [f"client-{i} ({Path(source).name})" for i, source in enumerate(sources)]
    else:
        sources, rows, names = [str(train.data)], [task.read_rows(train, str(train.data), True)], []
    batch = train.batch_size * train.grad_accum  # every client must fill at least one batch
    labels = train.labels
    if task.has_label_set and labels is None:  # the label set of all the data, so every party's head agrees
        labels = task.encode(train, tokenizer, [r for part in rows for r in part], ", ".join(sources), None).labels
    encoded = [task.encode(train, tokenizer, part, src, labels).examples for part, src in zip(rows, sources,
                                                                                             strict=True)]  # fmt: skip
    eval_examples: list[dict[str, Any]] = []
    if fc.split != FILES:
        pooled, eval_examples = split_eval(encoded[0], train.eval_fraction, train.seed)
        encoded = split_examples(pooled, fc.clients, fc.split, train.seed, fc.alpha, batch)
        names = [f"client-{i}" for i in range(fc.clients)]
    if train.eval_data:
        eval_rows = task.read_rows(train, train.eval_data, False)
        eval_examples = task.encode(train, tokenizer, eval_rows, train.eval_data, labels).examples
    check_clients(encoded, names, labels, allow_unique_labels=fc.split != FILES)
    for name, examples in zip(names, encoded, strict=True):
        if len(examples) < batch:
            raise FederatedError(
                f"{name} holds {len(examples)} examples, fewer than one batch of {batch} (batch size × gradient "
                "accumulation): lower --batch-size, use fewer --clients, or give that client more data."
            )
    return ClientData(names, encoded, eval_examples, labels)


def round_seed(seed: int, rnd: int, client: int = -1) -> int:
    """The seed of round `rnd` (client -1: the server's sampling), a function of these alone."""
    digest = hashlib.sha256(f"{seed}/{rnd}/{client}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def sent_keys(state: dict[str, torch.Tensor], rule: Rule) -> list[str]:
    """The tensors that travel each round (both ways)."""
    return sorted(k for k in state if is_sent(k, rule))


def train_client(party: Participant, data: ClientData, client: int, instructions: dict[str, Any],
                 tensors: dict[str, torch.Tensor]) -> Reply:  # fmt: skip
    """One client's round: check the server's basis, start from the global adapter, train, answer."""
    fingerprint = party.fingerprint
    if instructions["fingerprint"] != fingerprint:
        raise FederatedError(
            f"{data.names[client]} refuses round {instructions['round']}: the server's base model fingerprint "
            f"{instructions['fingerprint'][:12]}… differs from this client's {fingerprint[:12]}… (another base model, "
            "SVD setting or seed): every party must load the same base model with the same settings."
        )
    if party.rule.name == "flora":  # a fresh LoRA on the global model (its update merged into the base)
        state = dict(party.fresh)
        party.set_base_delta(stacking.from_message(tensors))
        tensors = {k: v for k, v in tensors.items() if not k.startswith(stacking.PREFIX)}
    else:
        state = party.state()
    expected = [k for k in sent_keys(state, party.rule) if party.rule.name != "flora" or k.startswith(SAVE_PREFIX)]
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise FederatedError(f"the server sent no {missing[:3]}: its adapter is not the one this client trains.")
    state.update(tensors)
    party.load(state, "the server's global adapter")
    seed = int(instructions["seed"])
    torch.manual_seed(seed)  # dropout
    out = party.fit(data.examples[client], int(instructions["local_steps"]), seed)
    update = party.update(data.names[client])
    sent = {k: update.tensors[k].detach().clone() for k in sent_keys(update.tensors, party.rule)}
    return Reply(client, sent, update.meta, update.config.to_dict(), len(data.examples[client]), out["train_loss"])


class Coordinator:
    """The server: holds the global adapter on `party`, samples each round's clients, aggregates their replies by
    `rule`, evaluates and saves the result in `work` (a run directory already claimed)."""

    def __init__(self, fc: FederatedConfig, rule: Rule, party: Participant, data: ClientData, work: Path) -> None:
        self.fc, self.rule, self.party, self.data, self.work = fc, rule, party, data, work
        work.mkdir(parents=True, exist_ok=True)
        self.log_path = work / "rounds.jsonl"
        self.history: list[dict[str, Any]] = []
        self.state = party.state()
        self.fingerprint = party.fingerprint
        self.start_round = 1
        self.carry: stacking.Carry | None = {} if rule.name == "flora" else None
        self.parties: dict[int, Participant] = {}  # lower client ranks' models (--client-ranks)
        recorded = work / "federation.json"
        if fc.resume and recorded.is_file():
            self._resume(json.loads(recorded.read_text()))
        else:
            atomic_write_json({**fc.to_dict(), "labels": data.labels, "client_names": data.names}, recorded)
        self.accountant = self._accountant()
        self.noise_secret = self._noise_secret()

    # ---- resume ---------------------------------------------------------------------------------------------------
    def _resume(self, recorded: dict[str, Any]) -> None:
        changed = self.fc.changes_since(recorded)
        if changed:
            raise FederatedError(
                f"--resume continues the run in {self.work}, but these settings differ from it: {changed}. Resume "
                "with the recorded settings (only --rounds may grow), or start a new run in another --output-dir."
            )
        lines = self.log_path.read_text().splitlines() if self.log_path.is_file() else []
        self.history = [json.loads(line) for line in lines if line.strip()]
        done = max((h["round"] for h in self.history), default=0)
        if done:
            config, tensors, meta = read_adapter(self.work / _round_dir(done))
            if self.carry is not None:
                self.carry = stacking.from_adapter(tensors, meta, config)
                self.party.set_base_delta(self.carry)
                tensors = {**self.party.fresh, **stacking.head_of(tensors)}
            self.party.load(tensors, f"round {done}'s adapter")
            self.state = self.party.state()
        self.start_round = done + 1
        print(f"resuming after round {done} of {self.fc.rounds}", file=sys.stderr, flush=True)

    def _accountant(self):
        if self.fc.dp_noise is None:
            return None
        from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        population = self.fc.clients
        accountant = RdpAccountant(
            PrivacyConfig(self.fc.dp_delta, population, NeighboringRelation.ADD_OR_REMOVE_ONE,
                          SamplingMethod.NO_AMPLIFICATION)
        )  # fmt: skip
        done = self.start_round - 1
        if done:
            accountant.compose(self._privacy_event(), count=done)
        return accountant

    def _noise_secret(self) -> int | None:
        if self.fc.dp_noise is None:
            return None
        path = self.work / NOISE_SECRET
        if self.start_round > 1:
            if not path.is_file():
                raise FederatedError(
                    f"{path} is missing: this DP run's noise cannot be continued as it began. Start the run again "
                    "without --resume (or in another --output-dir)."
                )
            return int(path.read_text())
        secret = secrets.randbits(128)
        atomic_write_bytes(str(secret).encode(), path, mode=0o600)
        return secret

    def _privacy_event(self):
        from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

        return GaussianPrivacyEvent(self.fc.dp_noise, self.fc.per_round, self.fc.clients)

    # ---- a round --------------------------------------------------------------------------------------------------
    def sample(self, rnd: int) -> list[int]:
        """The clients of round `rnd`: a seeded choice of clients_per_round (all of them by default)."""
        if self.fc.per_round == self.fc.clients:
            return list(range(self.fc.clients))
        rng = np.random.default_rng(round_seed(self.fc.train.seed, rnd))
        return sorted(rng.choice(self.fc.clients, self.fc.per_round, replace=False).tolist())

    def instructions(self, rnd: int, client: int) -> dict[str, Any]:
        return {"round": rnd, "fingerprint": self.party_for(client).fingerprint, "local_steps": self.fc.local_steps,
                "seed": round_seed(self.fc.train.seed, rnd, client)}  # fmt: skip

    def party_for(self, client: int) -> Participant:
        """The model at client `client`'s rank: the server's own, or (--client-ranks) one built at the lower rank,
        checked to nest in the server's basis (the inline runtime trains that client on it)."""
        r = self.fc.rank_of(client)
        if r is None:
            return self.party
        if r not in self.parties:
            party = Participant(ranks.at_rank(self.fc.train, r), self.data.labels, self.rule,
                                tokenizer=self.party.tokenizer)  # fmt: skip
            ranks.check_nested(self.party, party, r)
            self.parties[r] = party
        return self.parties[r]

    def sent_to(self, client: int) -> dict[str, torch.Tensor]:
        """What client `client` receives: the global tensors, narrowed to its rank where it is lower."""
        r = self.fc.rank_of(client)
        sent = self.sent()
        return sent if r is None else ranks.narrow(sent, self.fc.train.method, self._config, r)

    @property
    def _config(self) -> AdapterConfig:
        return self.party.adapted.peft_config["default"]

    def sent(self) -> dict[str, torch.Tensor]:
        """The global tensors every sampled client receives (FLoRA: the head and the global update's factors)."""
        if self.carry is not None:
            return {**stacking.head_of(self.state), **stacking.to_message(self.carry)}
        return {k: self.state[k] for k in sent_keys(self.state, self.rule)}

    def evaluate_initial(self) -> None:
        if self.start_round == 1 and not self.history:
            self._append({"round": 0, **self._evaluate()})

    def absorb(self, rnd: int, replies: list[Reply], failures: dict[str, str] | None = None) -> dict[str, Any]:
        """Aggregate round `rnd`'s replies into the global adapter; evaluate, save and log it; return the log line."""
        started = time.perf_counter()
        if not replies:
            raise FederatedError(f"round {rnd}: no client answered ({failures or {}}); the run stops here, "
                                 f"resumable from round {rnd - 1}.")  # fmt: skip
        replies = sorted(replies, key=lambda r: r.client)
        base = self.sent()
        down = sum(t.numel() * t.element_size() for r in replies for t in self.sent_to(r.client).values())
        up = sum(t.numel() * t.element_size() for r in replies for t in r.tensors.values())
        replies = [self._widened(r, base) for r in replies]
        norms = [_update_norm(r.tensors, base) for r in replies] if self.carry is None else []  # FLoRA: fresh factors
        if self.fc.dp_clip is not None:
            for reply in replies:
                _clip(reply.tensors, base, self.fc.dp_clip)
        frozen = {k: v for k, v in self.state.items() if k not in base}
        updates = [ClientUpdate(self.data.names[r.client], AdapterConfig.from_dict(r.config),
                                {**frozen, **r.tensors}, r.meta) for r in replies]  # fmt: skip
        weights = [1.0] * len(replies) if self.fc.dp_noise else [float(r.num_examples) for r in replies]
        self.party.load(self.state, "the global adapter")
        before = self._weights_delta() if self.fc.dp_noise is not None else None
        result = aggregate(self.party.adapted, updates, weights, self.rule.name)
        state = dict(result.state)
        noise: dict[str, float] = {}
        if self.fc.dp_noise is not None:
            self.party.load(state, "the aggregated adapter")
            clean = self._weights_delta()
            rng = np.random.default_rng([self.noise_secret, rnd])
            _add_noise(state, list(base), self.fc.dp_noise * self.fc.dp_clip / self.fc.per_round, rng)
            self.party.load(state, "the noised adapter")
            noise = {"dp_noise_dw": _distance(self._weights_delta(), clean), "update_dw": _distance(clean, before)}
        payload = result.payload
        if self.carry is not None:  # FLoRA: the stacked round joins the global update, merged into the base
            ranks = {lname: info["r"] for lname, info in payload["nora"]["layers"].items()}
            self.carry = stacking.extend(self.carry, stacking.round_update(state, ranks, result.config))
            self.party.set_base_delta(self.carry)
            state = {**self.party.fresh, **stacking.head_of(state)}
        self.party.load(state, "the aggregated adapter")
        self.state = self.party.state()
        total = sum(weights)
        line: dict[str, Any] = {
            "round": rnd,
            "clients": [self.data.names[r.client] for r in replies],
            "rule": result.rule,
            "exact": result.exact,
            "aggregation_error": math.sqrt(sum(e * e for e in result.errors.values())),
            "aggregation_error_max": max(result.errors.values(), default=0.0),
            "bytes_up": up,
            "bytes_down": down,
            "train_loss": sum(w * r.train_loss for w, r in zip(weights, replies, strict=True)) / total,
            **({"update_norm": statistics.median(norms)} if norms else {}),
            **noise,
        }
        if failures:
            line["failed"] = failures
        if self.accountant is not None:
            self.accountant.compose(self._privacy_event())
            line["epsilon"] = self.accountant.get_epsilon(self.fc.dp_delta)
            line["delta"] = self.fc.dp_delta
        line.update(self._evaluate())
        line["server_s"] = time.perf_counter() - started
        self._save(rnd, payload)
        self._append(line)
        return line

    def _widened(self, reply: Reply, base: dict[str, torch.Tensor]) -> Reply:
        """A lower-rank client's reply as a global-rank update (ranks.widen), once its basis is checked."""
        r = self.fc.rank_of(reply.client)
        if r is None:
            return reply
        expected = self.party_for(reply.client).base_print
        if base_fingerprint(reply.meta) != expected:
            raise FederatedError(f"{self.data.names[reply.client]} answered with an adapter on another basis than "
                                 f"its rank-{r} one; its reply is refused.")  # fmt: skip
        tensors = ranks.widen(reply.tensors, base, self.fc.train.method, self._config)
        return Reply(reply.client, tensors, self._global_meta, self._config.to_dict(), reply.num_examples,
                     reply.train_loss)  # fmt: skip

    @functools.cached_property
    def _global_meta(self) -> dict[str, Any]:
        """The global adapter's per-layer metadata (ranks, fingerprints): fixed for a run with --client-ranks."""
        return json.loads(json.dumps(adapter_payload(self.party.adapted, "default")[1]["nora"]))

    def _weights_delta(self) -> dict[str, torch.Tensor]:
        """Each adapted layer's W − W0 under the adapter the server holds now (float64)."""
        out = {}
        for lname, layer in self.party.adapted.layers().items():
            W = layer.base_weight().double()
            out[lname] = layer.merged_weight(layer.core("default"), W)[0] - W
        return out

    def _evaluate(self) -> dict[str, float]:
        if not self.data.eval_examples:
            return {}
        return self.party.evaluate_on(self.data.eval_examples)

    def _save(self, rnd: int, payload: dict[str, Any]) -> None:
        payload = json.loads(json.dumps(payload))
        head = self.party.task.head_record(self.data.labels, self.fc.train)
        if head is not None:
            payload["nora"]["head"] = head
        tensors = self.state
        if self.carry is not None:
            config = self.party.adapted.peft_config["default"]
            tensors, payload = stacking.as_adapter(self.carry, stacking.head_of(self.state), payload, config,
                                                   self.party.adapted.layers())  # fmt: skip
        for name in (_round_dir(rnd), "adapter"):
            write_adapter(tensors, payload, self.work / name)

    def _append(self, line: dict[str, Any]) -> None:
        self.history.append(line)
        text = "".join(json.dumps(h) + "\n" for h in self.history)
        atomic_write_bytes(text.encode(), self.log_path)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in line.items() if k not in ("clients",)}
        print(f"round {line['round']}/{self.fc.rounds}: {shown}", file=sys.stderr, flush=True)


def _round_dir(rnd: int) -> str:
    return f"round-{rnd:04d}"


def _clip(tensors: dict[str, torch.Tensor], base: dict[str, torch.Tensor], norm: float) -> None:
    """Flower's flat clipping of the update (client − global) to L2 `norm`, in place."""
    from flwr.supercore.differential_privacy import compute_clip_model_update

    keys = sorted(base)
    mine = [tensors[k].double().numpy() for k in keys]
    compute_clip_model_update(mine, [base[k].double().numpy() for k in keys], norm)
    for k, a in zip(keys, mine, strict=True):
        tensors[k] = torch.from_numpy(a).to(tensors[k].dtype)


def _add_noise(state: dict[str, torch.Tensor], keys: list[str], std: float, rng: np.random.Generator) -> None:
    """Gaussian noise of standard deviation `std` on the aggregated tensors `keys`, in place. (Flower's
    add_gaussian_noise_inplace draws from NumPy's global generator, which training seeds with the public run seed.)"""
    for k in sorted(keys):
        noise = torch.from_numpy(rng.normal(0.0, std, tuple(state[k].shape)))
        state[k] = (state[k].double() + noise).to(state[k].dtype)


def _update_norm(tensors: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    """The L2 norm of a client's update (what it sent − what it received), before any clipping."""
    return math.sqrt(sum(float((tensors[k].double() - base[k].double()).square().sum()) for k in base))


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """‖a − b‖_F over every layer."""
    return math.sqrt(sum(float(torch.linalg.matrix_norm(a[k] - b[k]) ** 2) for k in a))
