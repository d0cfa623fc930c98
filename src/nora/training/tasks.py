"""Kinds of training: each `Task` turns data rows into examples, examples into batches, and batches into a loss
(and evaluation metrics). The run (trainer.py) knows none of this; it asks `TASKS[config.task]`.

Adding a kind of training is one `Task` subclass and one line in `TASKS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError
from ..pretrained import name_labels
from .data import (
    IGNORE,
    Encoded,
    encode_causal,
    encode_classification,
    encode_regression,
    load_records,
    pad_inputs,
    pad_token_labels,
)

if TYPE_CHECKING:
    from .config import TrainConfig

Example = dict[str, Any]
Batch = dict[str, torch.Tensor]


class Loss(NamedTuple):
    """A task's loss on one batch, and the model output it came from (for the metrics)."""

    value: torch.Tensor
    output: Any


class Task(ABC):
    """One kind of training.

    Required:
        name                    the `--task` name (its key in `TASKS`)
        model_kind              the kind of pretrained model it trains (`nora.pretrained.load_model`'s `task`)
        encode(...)             data rows → tokenised examples (`Encoded`), with what was truncated or dropped
        collate(...)            examples → one padded batch of tensors: its targets under "labels", and an
                                "attention_mask" (the run counts the tokens it has seen from it)
        count_targets(batch)    how many targets the batch's loss sums over (a step divides by the global count)
        loss(model, batch, n)   the batch's loss summed over its targets, divided by n

    Optional (defaults here):
        has_label_set           False; True where examples are classes of a label set (`labels`, the head's size)
        adapter_defaults        {}; adapter fields the task sets unless the user does: what to adapt or train in full
                                (target_modules, modules_to_save), never ranks (one default per method, in its
                                config class); `defaults(config)` may choose them per model
        load_model(config, labels)    None: the standard loader; else the model to train (e.g. CLIP as a classifier)
        num_labels(labels)      the head's width: len(labels) for a label set, else the model's default
        prepare_model(...)      nothing; adjust the loaded model to the data (e.g. record the label names)
        eval_records(...)       []; what one evaluation batch contributes to `metrics` (gathered over processes)
        metrics(records)        {}; evaluation metrics besides the loss, named without the `eval_` prefix
        head(labels, config)    None; what the adapter file records of the head it trains (`nora eval` reads it:
                                {"task": "seq-cls", "labels": [...]} or {"task": "regression"})
        read(config, source, train)   the data rows of `source` (default: nora.training.data.load_records)
        check_model(config)     refuse a --model that cannot be loaded, before anything loads (default: a
                                transformers directory or hub id: nora.pretrained.check_model_source)
        load_processor(config)  what turns rows into model inputs (default: the model's tokenizer)
        prepare(processor, model)     adjust the processor to the model (default: a pad token for text)
        count_inputs(batch)     what the run counts as seen (default: the tokens of the attention mask)
        counts                  "tokens"; what count_inputs counts, as the progress bar and summary name its rate
    """

    name: ClassVar[str]
    model_kind: ClassVar[str]
    has_label_set: ClassVar[bool] = False
    adapter_defaults: ClassVar[dict[str, Any]] = {}
    counts: ClassVar[str] = "tokens"

    @abstractmethod
    def encode(
        self, config: TrainConfig, tokenizer: Any, rows: list[dict[str, Any]], source: str, labels: list[str] | None
    ) -> Encoded:
        """`rows` of `source` as examples; `labels` is the label set fixed so far (None: infer it)."""

    @abstractmethod
    def collate(self, examples: list[Example], pad_id: int) -> Batch: ...

    @abstractmethod
    def count_targets(self, batch: Batch) -> int: ...

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch, num_items: int) -> Loss: ...

    def num_labels(self, labels: list[str] | None) -> int | None:
        return len(labels) if labels else None

    def prepare_model(self, model: nn.Module, labels: list[str] | None) -> None:
        return None

    def eval_records(self, batch: Batch, output: Any) -> list[Any]:
        return []

    def metrics(self, records: list[Any]) -> dict[str, float]:
        return {}

    def head(self, labels: list[str] | None, config: TrainConfig) -> dict[str, Any] | None:
        return None

    def defaults(self, config: TrainConfig) -> dict[str, Any]:
        return self.adapter_defaults

    def check_model(self, config: TrainConfig) -> None:
        from ..pretrained import check_model_source

        check_model_source(config.model, config.gguf_file)

    def load_model(self, config: TrainConfig, labels: list[str] | None) -> nn.Module | None:
        return None

    def read(self, config: TrainConfig, source: str, train: bool) -> list[dict[str, Any]]:
        rows = load_records(source)
        return rows[: config.max_examples] if train and config.max_examples is not None else rows

    def load_processor(self, config: TrainConfig) -> Any:
        from ..pretrained import load_tokenizer

        return load_tokenizer(config.model, config.gguf_file)

    def prepare(self, processor: Any, model: nn.Module) -> None:
        if processor.pad_token_id is None:
            processor.pad_token = processor.eos_token or processor.unk_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = processor.pad_token_id

    def count_inputs(self, batch: Batch) -> int:
        return int(batch["attention_mask"].sum())


class CausalLMTask(Task):
    """Next-token prediction on instruction, prompt/completion or plain-text data (data.encode_causal)."""

    name = "causal-lm"
    model_kind = "causal"

    def encode(
        self, config: TrainConfig, tokenizer: Any, rows: list[dict[str, Any]], source: str, labels: list[str] | None
    ) -> Encoded:
        return encode_causal(rows, tokenizer, config.max_length, config.mask_prompt, source, config.text_column)

    def collate(self, examples: list[Example], pad_id: int) -> Batch:
        batch = pad_inputs(examples, pad_id)
        batch["labels"] = pad_token_labels(examples, batch["input_ids"].shape[1])
        return batch

    def count_targets(self, batch: Batch) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())  # each token predicts the next

    def loss(self, model: nn.Module, batch: Batch, num_items: int) -> Loss:
        # the model's own loss: fused kernels (Liger) compute it without materialising the logits
        output = model(**batch, num_items_in_batch=num_items)
        return Loss(output.loss, output)


class SequenceClassificationTask(Task):
    """One label per text (or text pair), predicted by a classification head (data.encode_classification)."""

    name = "seq-cls"
    model_kind = "seq-cls"
    has_label_set = True
    adapter_defaults = {"modules_to_save": ["classifier", "score", "pooler"]}  # head (+ BERT's pooler) trains in full

    def encode(
        self, config: TrainConfig, tokenizer: Any, rows: list[dict[str, Any]], source: str, labels: list[str] | None
    ) -> Encoded:
        encoded = encode_classification(
            rows, tokenizer, config.max_length, labels, source,
            config.text_column, config.text_pair_column, config.label_column,
        )  # fmt: skip
        _two_classes(encoded.labels, source)
        return encoded

    def collate(self, examples: list[Example], pad_id: int) -> Batch:
        batch = pad_inputs(examples, pad_id)
        batch["labels"] = torch.tensor([e["label"] for e in examples])
        return batch

    def count_targets(self, batch: Batch) -> int:
        return batch["labels"].numel()

    def loss(self, model: nn.Module, batch: Batch, num_items: int) -> Loss:
        output = model(**_inputs(batch))
        return Loss(F.cross_entropy(output.logits.float(), batch["labels"], reduction="sum") / num_items, output)

    def prepare_model(self, model: nn.Module, labels: list[str] | None) -> None:
        name_labels(model, labels)

    def eval_records(self, batch: Batch, output: Any) -> list[tuple[int, int]]:
        return list(zip(batch["labels"].tolist(), output.logits.argmax(-1).tolist(), strict=True))

    def metrics(self, records: list[tuple[int, int]]) -> dict[str, float]:
        from ..evaluation import classification_metrics

        gold, predicted = zip(*records, strict=True)
        scores = classification_metrics(list(gold), list(predicted))
        return {k: float(v) for k, v in scores.items() if k not in ("n", "correct")}

    def head(self, labels: list[str] | None, config: TrainConfig) -> dict[str, Any] | None:
        return {"task": self.name, "labels": list(labels or [])}


class RegressionTask(SequenceClassificationTask):
    """One number per text (or text pair), e.g. STS-B's similarity: a one-output head, mean squared error, and
    Pearson and Spearman correlations (data.encode_regression)."""

    name = "regression"
    has_label_set = False

    def encode(
        self, config: TrainConfig, tokenizer: Any, rows: list[dict[str, Any]], source: str, labels: list[str] | None
    ) -> Encoded:
        return encode_regression(
            rows, tokenizer, config.max_length, source, config.text_column, config.text_pair_column, config.label_column
        )

    def collate(self, examples: list[Example], pad_id: int) -> Batch:
        batch = pad_inputs(examples, pad_id)
        batch["labels"] = torch.tensor([float(e["label"]) for e in examples])
        return batch

    def loss(self, model: nn.Module, batch: Batch, num_items: int) -> Loss:
        output = model(**_inputs(batch))
        predicted = output.logits.float().squeeze(-1)
        return Loss(F.mse_loss(predicted, batch["labels"].float(), reduction="sum") / num_items, output)

    def num_labels(self, labels: list[str] | None) -> int:
        return 1

    def prepare_model(self, model: nn.Module, labels: list[str] | None) -> None:
        model.config.problem_type = "regression"

    def eval_records(self, batch: Batch, output: Any) -> list[tuple[float, float]]:
        predicted = output.logits.float().squeeze(-1)
        return list(zip(batch["labels"].tolist(), predicted.tolist(), strict=True))

    def metrics(self, records: list[tuple[float, float]]) -> dict[str, float]:
        from scipy.stats import pearsonr, spearmanr

        gold, predicted = (list(v) for v in zip(*records, strict=True))
        if len(records) < 2 or len(set(predicted)) < 2 or len(set(gold)) < 2:
            return {}  # a correlation is undefined for constant values (or one pair)
        return {"pearson": float(pearsonr(gold, predicted)[0]), "spearman": float(spearmanr(gold, predicted)[0])}

    def head(self, labels: list[str] | None, config: TrainConfig) -> dict[str, Any] | None:
        return {"task": self.name}


class ImageClassificationTask(Task):
    """One class per image (nora.imagefiles): an image folder or a path/label file, --shots K per class,
    preprocessed by the model's image processor (or --image-size's stated transforms); top-1 and, with 10 or
    more classes, top-5 accuracy. The run counts images where text tasks count tokens."""

    name = "image-cls"
    model_kind = "image-cls"
    has_label_set = True
    counts = "images"
    adapter_defaults = {"modules_to_save": ["classifier", "head", "fc", "_fc"]}  # the head, as models name it

    def defaults(self, config: TrainConfig) -> dict[str, Any]:
        from ..clip import is_clip

        if config.model is not None and is_clip(config.model):  # CLIP-LoRA's protocol: q/k/v of both encoders
            return {"target_modules": ["q_proj", "k_proj", "v_proj"]}
        return self.adapter_defaults

    def load_model(self, config: TrainConfig, labels: list[str] | None) -> nn.Module | None:
        from ..clip import ClipClassifier, is_clip

        if config.model is None or not is_clip(config.model):
            return None
        return ClipClassifier.from_pretrained(config.model, labels or [], config.clip_template)

    def read(self, config: TrainConfig, source: str, train: bool) -> list[dict[str, Any]]:
        from ..imagefiles import draw_shots, image_rows

        rows = image_rows(source)
        if train and config.shots is not None:
            rows = draw_shots(rows, config.shots, config.seed, source)
        return rows[: config.max_examples] if train and config.max_examples is not None else rows

    def load_processor(self, config: TrainConfig) -> Any:
        from ..imagefiles import load_image_processor

        return load_image_processor(config.model, config.image_size)

    def prepare(self, processor: Any, model: nn.Module) -> None:
        return None

    def encode(
        self, config: TrainConfig, tokenizer: Any, rows: list[dict[str, Any]], source: str, labels: list[str] | None
    ) -> Encoded:
        from ..imagefiles import encode_images

        label_set = list(labels) if labels is not None else sorted({r["label"] for r in rows})
        _two_classes(label_set, source)
        return Encoded(encode_images(rows, tokenizer, label_set, source, config.max_image_pixels), labels=label_set)

    def collate(self, examples: list[Example], pad_id: int) -> Batch:
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["label"] for e in examples]),
        }

    def count_targets(self, batch: Batch) -> int:
        return batch["labels"].numel()

    def count_inputs(self, batch: Batch) -> int:
        return batch["labels"].numel()

    def loss(self, model: nn.Module, batch: Batch, num_items: int) -> Loss:
        from ..imagefiles import image_logits

        logits = image_logits(model, batch["pixel_values"])
        return Loss(F.cross_entropy(logits.float(), batch["labels"], reduction="sum") / num_items, logits)

    def prepare_model(self, model: nn.Module, labels: list[str] | None) -> None:
        name_labels(model, labels)

    def eval_records(self, batch: Batch, output: Any) -> list[tuple[int, list[int]]]:
        top = output.float().topk(5 if output.shape[-1] >= 10 else 1, dim=-1).indices.tolist()  # top-5: ≥ 10 classes
        return list(zip(batch["labels"].tolist(), top, strict=True))

    def metrics(self, records: list[tuple[int, list[int]]]) -> dict[str, float]:
        scores = {"acc": sum(gold == top[0] for gold, top in records) / len(records)}
        if len(records[0][1]) >= 5:
            scores["top5_acc"] = sum(gold in top for gold, top in records) / len(records)
        return scores

    def head(self, labels: list[str] | None, config: TrainConfig) -> dict[str, Any] | None:
        from ..clip import is_clip

        head = {"task": self.name, "labels": list(labels or [])}
        if config.model is not None and is_clip(config.model):
            head["template"] = config.clip_template  # nora eval rebuilds the classifier from the same prompts
        return head


class DreamBoothTask(Task):
    """Subject-driven generation (nora.diffusion): --data is a folder of the subject's images, each captioned
    --instance-prompt; with --class-data and --class-prompt, prior preservation adds class images (sampled from the
    base pipeline up to --num-class-images where the folder has fewer; a folder that does not exist only with
    --generate-class-images), their loss weighted --prior-loss-weight.
    The loss is the noise-prediction mean squared error per image; the run counts images."""

    name = "dreambooth"
    model_kind = "diffusion"
    counts = "images"

    def defaults(self, config: TrainConfig) -> dict[str, Any]:
        from ..diffusion import TEXT_ENCODER_TARGETS, UNET_TARGETS

        both = f"(?:{UNET_TARGETS})|(?:{TEXT_ENCODER_TARGETS})"
        return {"target_modules": both if config.train_text_encoder else UNET_TARGETS}

    def check_model(self, config: TrainConfig) -> None:
        from ..diffusion import check_pipeline

        check_pipeline(config.model)

    def load_model(self, config: TrainConfig, labels: list[str] | None) -> nn.Module | None:
        from ..diffusion import DreamBoothModel

        return DreamBoothModel.from_pretrained(config.model)

    def read(self, config: TrainConfig, source: str, train: bool) -> list[dict[str, Any]]:
        from ..diffusion import class_images, image_files

        files = image_files(source, "--data")
        rows = [{"image": str(p), "prompt": config.instance_prompt, "prior": False} for p in files]
        if train and config.class_data is not None:
            images = class_images(config.model, config.class_data, config.class_prompt, config.num_class_images,
                                  config.seed, config.generate_class_images)  # fmt: skip
            rows += [{"image": str(p), "prompt": config.class_prompt, "prior": True} for p in images]
        return rows

    def load_processor(self, config: TrainConfig) -> Any:
        from ..diffusion import DreamBoothProcessor

        return DreamBoothProcessor.from_pretrained(config.model, config.image_size)

    def prepare(self, processor: Any, model: nn.Module) -> None:
        return None

    def encode(
        self, config: TrainConfig, tokenizer: Any, rows: list[dict[str, Any]], source: str, labels: list[str] | None
    ) -> Encoded:
        from ..imagefiles import open_rgb

        examples = [
            {"pixel_values": tokenizer.pixels(open_rgb(r["image"], config.max_image_pixels)),
             "input_ids": tokenizer.ids(r["prompt"]),
             "weight": config.prior_loss_weight if r["prior"] else 1.0}
            for r in rows
        ]  # fmt: skip
        return Encoded(examples)

    def collate(self, examples: list[Example], pad_id: int) -> Batch:
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "input_ids": torch.stack([e["input_ids"] for e in examples]),
            "weight": torch.tensor([e["weight"] for e in examples]),
        }

    def count_targets(self, batch: Batch) -> int:
        return batch["weight"].numel()

    def count_inputs(self, batch: Batch) -> int:
        return batch["weight"].numel()

    def loss(self, model: nn.Module, batch: Batch, num_items: int) -> Loss:
        per_image = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"])
        return Loss((per_image * batch["weight"]).sum() / num_items, per_image)


def _two_classes(labels: list[str] | None, source: str) -> None:
    """A classifier of one class has nothing to learn (its loss is 0 from the start): refused."""
    if labels is not None and len(labels) < 2:
        raise AdapterError(
            f"{source} holds {len(labels)} class(es) {labels}: a classifier needs at least two. Add the other "
            "classes' examples (an image folder: one sub-folder per class), or name the full label set with --labels."
        )


def _inputs(batch: Batch) -> Batch:
    """What a classifier reads of a batch: its tokens, mask, and (BERT's text pairs) segment ids."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        CausalLMTask(),
        SequenceClassificationTask(),
        RegressionTask(),
        ImageClassificationTask(),
        DreamBoothTask(),
    )
}
