"""One federated party's model: the base model with the run's adapter, trained by nora's training engine.

A client loads the global adapter's tensors, takes `local_steps` optimizer steps over its own examples and sends
back its adapter (ClientUpdate); the server holds the global adapter on the same base, aggregates into it and
evaluates it. Both build the same Participant from the same TrainConfig, so both compute the same frozen basis (the
SVD is deterministic and sign-canonical) and `base_fingerprint` lets each side check that it is so.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from ..errors import AdapterError
from ..methods import get_method
from ..state import adapter_payload, apply_tensors
from ..training.build import accelerate, build_adapted, loading
from ..training.config import TrainConfig
from ..training.engine import Engine
from .clients import ClientUpdate
from .rules import Rule


class FederatedError(AdapterError):
    """A federated run cannot start or go on (its inputs, a client's reply, its output directory)."""


def check_federable(config: TrainConfig) -> None:
    """Refuse, before anything loads, a training setting a federated party cannot use."""
    adapter = config.adapter_config()
    if get_method(adapter.method).calibration(adapter) is not None:
        raise FederatedError(
            "an activation-aware basis (awsvd=True) is calibrated on each party's own data, so the clients' bases "
            "would differ and their updates could not be aggregated: leave awsvd off for federated training."
        )
    if config.fsdp or config.loftq or config.quantize:
        raise FederatedError("federated clients train unquantized, unsharded models: leave --fsdp, --loftq and "
                             "--quantize off.")  # fmt: skip


class Participant(Engine):
    """The base model of `config.model` with adapter "default" as `config` describes it, for labels `labels`, the
    tensors the aggregation `rule` keeps shared frozen (e.g. LoRA's A under "ffa")."""

    def __init__(
        self, config: TrainConfig, labels: list[str] | None, rule: Rule, model: nn.Module | None = None, tokenizer=None
    ) -> None:
        check_federable(config)
        self.config, self.task, self.labels, self.rule = config, config.kind, labels, rule
        self._start_processes()
        if self.world > 1:
            raise FederatedError("a federated party trains in one process: launch it without torchrun/accelerate.")
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.tokenizer = tokenizer or loading(config.model, lambda: self.task.load_processor(config))
        # the rule's frozen factors are shared by every client, never trained (FFA-LoRA, NoRA frozen-a)
        self.adapted = build_adapted(config, self.tokenizer, labels, model, self.acc.device, frozen=rule.frozen)
        accelerate(self.adapted, config)
        self.model = self.adapted
        self.train_examples: list[dict[str, Any]] = []
        self.eval_examples: list[dict[str, Any]] = []
        self._order_cache: tuple[int, list[int]] | None = None
        self.step = self.tokens_seen = 0
        self.fresh = self.state()  # the adapter as initialised (FLoRA starts every round from it)
        # what every party must share: the base and its bases, and the factors the rule freezes (never trained)
        meta = adapter_payload(self.adapted, "default")[1]["nora"]
        self.base_print = base_fingerprint(meta)
        self.fingerprint = self.base_print + frozen_digest(self.fresh, rule)
        self._w0: dict[str, torch.Tensor] = {}

    def state(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors (copies)."""
        return {k: v.detach().clone() for k, v in adapter_payload(self.adapted, "default")[0].items()}

    def load(self, tensors: dict[str, torch.Tensor], where: str = "the global adapter") -> None:
        """Set the adapter's tensors (every one, checked by name and shape)."""
        apply_tensors(self.adapted, "default", tensors, where)

    @torch.no_grad()
    def set_base_delta(self, delta: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Base weights W0 + B·A on the layers of `delta` (FLoRA: the global update merged into the base); W0 is
        kept, so each call replaces the previous delta."""
        layers = self.adapted.layers()
        for lname, (B, A) in delta.items():
            W = layers[lname].base_weight()
            W0 = self._w0.setdefault(lname, W.detach().clone())
            W.copy_((W0.double() + B.double() @ A.double()).to(W.dtype))

    def update(self, name: str) -> ClientUpdate:
        return ClientUpdate.of_model(self.adapted, "default", name)

    def fit(self, examples: list[dict[str, Any]], steps: int, seed: int) -> dict[str, float]:
        """`steps` optimizer steps (a fresh optimizer and schedule) over `examples` in the order `seed` draws;
        returns the mean training loss and the number of examples."""
        config = self.config
        self.train_examples = examples
        self.global_batch = config.batch_size * config.grad_accum
        self.steps_per_epoch = len(examples) // self.global_batch
        if self.steps_per_epoch == 0:
            raise FederatedError(
                f"a client holds {len(examples)} examples, fewer than one batch of {self.global_batch} (batch size × "
                "gradient accumulation): lower --batch-size, or give that client more data."
            )
        self.order_seed, self._order_cache, self.step, self.tokens_seen = seed, None, 0, 0
        self._build_optimizer(steps)
        self.adapted.train()
        losses = [self.train_step() for _ in range(steps)]
        return {"train_loss": sum(losses) / len(losses), "num_examples": float(len(examples))}

    def evaluate_on(self, examples: list[dict[str, Any]]) -> dict[str, float]:
        self.eval_examples = examples
        return self.evaluate()


def frozen_digest(state: dict[str, torch.Tensor], rule: Rule) -> str:
    """Digest of the tensors the rule keeps frozen and shared: every client must hold the same ones."""
    h = hashlib.sha256()
    for key in sorted(k for k in state if k.rsplit(".", 1)[-1] in rule.frozen):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def base_fingerprint(meta: dict[str, Any]) -> str:
    """One digest of every adapted layer's base weight, shape and basis (nora's per-layer fingerprints): equal on
    two parties exactly when their bases, and so their frozen SVD factors, are the same."""
    layers = meta.get("layers", {})
    record = {name: [info.get("shape"), info.get("weight"), info.get("fingerprint")] for name, info in layers.items()}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
