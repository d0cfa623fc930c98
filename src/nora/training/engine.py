"""The step machinery every nora training path shares: a deterministic data order, one optimizer step over the
global batch (micro-batches, processes) and evaluation, all asked of the run's task kind. `Run` (trainer.py) adds
the run directory, checkpoints and logs around it; a federated client (nora.federated) its local rounds.

Every step's loss is the sum over the whole global batch (all micro-batches, all processes) divided by its number
of targets, so gradients do not depend on how the batch is split across processes or accumulation steps.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
from accelerate.utils import gather_object

from ..tasks.base import TaskKind
from .config import TrainConfig
from .rundir import TrainingError


def scheduler(config: TrainConfig, optimizer, total_steps: int):
    from transformers import get_scheduler

    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


class Engine:
    """Steps over `train_examples` in global batches of `global_batch` (an epoch is `steps_per_epoch` of them, its
    order a seeded shuffle of (`order_seed`, epoch)), training `model` (`adapted`, wrapped) with `optimizer`."""

    config: TrainConfig
    task: TaskKind
    tokenizer: Any
    train_examples: list[dict[str, Any]]
    eval_examples: list[dict[str, Any]]
    global_batch: int
    steps_per_epoch: int
    step: int
    tokens_seen: int

    def _start_processes(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[self.config.precision]
        # cpu=True where there is no GPU: Accelerate then forms a gloo group under torchrun / accelerate launch
        self.acc = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
        self.world = self.acc.num_processes
        set_seed(self.config.seed)
        self.order_seed = self.config.seed

    def _build_optimizer(self, total_steps: int) -> None:
        """AdamW over the trainable parameters and the config's learning-rate schedule over `total_steps`."""
        config = self.config
        params = [p for p in self.adapted.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.total_steps = total_steps
        self.scheduler = scheduler(config, self.optimizer, total_steps)

    def _global_batch(self, step: int) -> list[dict[str, Any]]:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        chosen = order[index * self.global_batch : (index + 1) * self.global_batch]
        return [self.train_examples[i] for i in chosen]

    def _epoch_order(self, epoch: int) -> list[int]:
        """The examples of `epoch` in the order its steps take them: a seeded shuffle, a function of (seed, epoch)
        alone so a resumed run continues exactly. With group_by_length, each chunk of 50 global batches is sorted
        by length and cut into batches, and the batches are shuffled (HF's LengthGroupedSampler, less padding)."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        g = torch.Generator().manual_seed(self.order_seed * 100_003 + epoch)
        order = torch.randperm(len(self.train_examples), generator=g).tolist()
        if self.config.group_by_length:
            size, chunk = self.global_batch, 50 * self.global_batch
            length = [len(e["input_ids"]) for e in self.train_examples]
            grouped = []
            for start in range(0, self.steps_per_epoch * size, chunk):
                part = sorted(order[start : min(start + chunk, self.steps_per_epoch * size)], key=lambda i: -length[i])
                batches = [part[i : i + size] for i in range(0, len(part), size)]
                grouped += [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]
            order = grouped
        self._order_cache = (epoch, order)
        return order

    def _micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        share = self.config.batch_size * self.config.grad_accum
        mine = self._global_batch(step)[self.acc.process_index * share : (self.acc.process_index + 1) * share]
        return self._batches(mine)

    def _batches(self, examples: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """`examples` in micro-batches of --batch-size, in order."""
        bs = self.config.batch_size
        return [self._batch(examples[i : i + bs]) for i in range(0, len(examples), bs)]

    def _batch(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.task.collate(examples, getattr(self.tokenizer, "pad_token_id", None) or 0)
        return {k: v.to(self.acc.device) for k, v in batch.items()}

    def train_step(self) -> float:
        batches = self._micro_batches(self.step)
        local = torch.tensor([sum(self.task.count_targets(b) for b in batches)], device=self.acc.device)
        total = int(self.acc.gather(local).sum())
        loss_sum = torch.zeros((), device=self.acc.device)
        for i, batch in enumerate(batches):
            with self._gradient_sync(last=i == len(batches) - 1), self.acc.autocast():
                loss = self.task.loss(self.model, batch, total).value  # over the global batch's target count
                self.acc.backward(loss * self.world)  # DDP averages over processes; undo that
            loss_sum += loss.detach().float()
        step_loss = float(self.acc.gather(loss_sum.reshape(1)).sum())
        self._stop_if_diverged(step_loss)
        self._clip_gradients()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = torch.tensor([sum(self.task.count_inputs(b) for b in batches)], device=self.acc.device)
        self.tokens_seen += int(self.acc.gather(tokens).sum())
        self.step += 1
        return step_loss

    def _gradient_sync(self, last: bool):
        """Gradients are reduced over the processes on the last micro-batch of a step only."""
        if self.config.fsdp:
            self.model.set_requires_gradient_sync(last)
            return nullcontext()
        return self.acc.no_sync(self.model) if not last else nullcontext()

    def _stop_if_diverged(self, step_loss: float) -> None:
        if math.isfinite(step_loss):
            return
        lr = self.scheduler.get_last_lr()[0]
        raise TrainingError(
            f"the loss became {step_loss} at step {self.step + 1} (learning rate {lr:.3g}); training stopped and "
            f"nothing was overwritten: {self._kept()}. Lower --learning-rate or the adapter's alpha, or add warmup."
        )

    def _clip_gradients(self) -> None:
        if not self.config.max_grad_norm:
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.config.fsdp:
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)  # DTensor-aware: the global norm
        else:
            self.acc.clip_grad_norm_(params, self.config.max_grad_norm)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """eval_loss (summed over every target of the held-out set, divided by their count) and the task's
        metrics, over all processes."""
        if not self.eval_examples:
            return {}
        was_training = self.model.training
        self.model.eval()
        mine = self.eval_examples[self.acc.process_index :: self.world]
        loss_sum = torch.zeros((), device=self.acc.device, dtype=torch.float64)
        count = torch.zeros((), device=self.acc.device, dtype=torch.float64)
        records: list[Any] = []
        for i in range(0, len(mine), self.config.batch_size):
            batch = self._batch(mine[i : i + self.config.batch_size])
            with self.acc.autocast():
                loss = self.task.loss(self.model, batch, 1)
            loss_sum += loss.value.double()
            count += self.task.count_targets(batch)
            records += self.task.eval_records(batch, loss.output)
        self.model.train(was_training)
        totals = self.acc.gather(torch.stack([loss_sum, count]).reshape(1, 2)).sum(0)
        metrics = {"eval_loss": float(totals[0] / totals[1].clamp(min=1))}
        task_metrics = self.task.metrics(gather_object(records))
        return metrics | {f"eval_{name}": value for name, value in task_metrics.items()}

    def _kept(self) -> str:
        """What a run that stops now leaves (Run: its previous run or last checkpoint)."""
        return "nothing was written"
