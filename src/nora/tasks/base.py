"""The contract of a task kind: what one kind of training (causal LM, classifier, ...) decides, from its options
to the model it rebuilds from an adapter's record. Training, evaluation, export and the CLI ask the kind; none of
them tests a task's name.

Adding a kind is one `TaskKind` subclass and one line in the registry (nora.tasks.registry).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import nn

from ..errors import AdapterError
from .data import Encoded, load_records

if TYPE_CHECKING:
    from ..training.config import TrainConfig
    from .records import Head

Example = dict[str, Any]
Batch = dict[str, torch.Tensor]


class Loss(NamedTuple):
    """A task's loss on one batch, and the model output it came from (for the metrics)."""

    value: torch.Tensor
    output: Any


@dataclass
class TaskOptions:
    """A kind's own training options (fields of a dataclass subclass), given as TrainConfig keywords, YAML keys
    and `nora train` flags like every other option. `paths`: those naming files (a resumed run compares the files,
    not the spelling); `free_on_resume`: those a resumed run may change."""

    paths: ClassVar[tuple[str, ...]] = ()
    free_on_resume: ClassVar[tuple[str, ...]] = ()

    def given(self) -> list[str]:
        """The options set to other than their defaults."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != _default(f)]

    def resume_keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if f.name not in self.free_on_resume]


@dataclass(frozen=True)
class OptionRow:
    """One `nora train` flag for a kind's option: --name-with-dashes (or `flags`), its type and help."""

    name: str
    type: Any
    help: str
    flags: tuple[str, ...] = ()


class TaskKind(ABC):
    """One kind of training.

    Declared:
        name                the `--task` name (its registry key; the value the adapter's head record names)
        Options             its option dataclass (a TaskOptions subclass); `option_rows` its `nora train` flags
        model_class         the transformers Auto class its model is loaded (and rebuilt for eval/export) with
        model_kind          "causal"; the kind of model that is, as messages name it ("a vit has no causal model")
        counts              "tokens"; what `count_inputs` counts, as the progress bar and summary name its rate
        has_label_set       False; True where examples are classes of a label set (`labels`, the head's size)
        predicts_number     False; True for a one-number head (eval reads numeric targets and scores correlations)
        reads_images        False; True where inputs are images (no text length, no bitsandbytes text loader)
        adapter_defaults    {}; adapter fields set unless the user does (target_modules, modules_to_save)

    Required:
        encode(...)                 data rows → examples (`Encoded`), with what was truncated or dropped
        collate(examples, pad_id)   examples → one batch: targets under "labels" (or what `loss` reads)
        count_targets(batch)        how many targets the batch's loss sums over (a step divides by the global count)
        loss(model, batch, n)       the batch's loss summed over its targets, divided by n

    Optional hooks (defaults here), by stage:
        options:    check_options(config)
        adapter:    default_adapter_fields(config)
        model:      check_model(config), build_model(config, labels), head_width(labels),
                    label_model(model, labels), pretrained_kwargs(num_labels)
        record:     head_record(labels, config), record_fits(head), rebuild_model(head, base, ...),
                    rebuilt_class(head), load_eval_processor(adapter_dir, base, gguf_file)
        data:       read_rows(config, source, train), load_processor(config), fit_processor(processor, model)
        counting:   count_inputs(batch)
        metrics:    eval_records(batch, output), metrics(records)
    """

    name: ClassVar[str]
    Options: ClassVar[type[TaskOptions]] = TaskOptions
    option_rows: ClassVar[tuple[OptionRow, ...]] = ()
    model_class: ClassVar[str] = "AutoModelForCausalLM"
    model_kind: ClassVar[str] = "causal"
    counts: ClassVar[str] = "tokens"
    has_label_set: ClassVar[bool] = False
    predicts_number: ClassVar[bool] = False
    reads_images: ClassVar[bool] = False
    adapter_defaults: ClassVar[dict[str, Any]] = {}

    # ---- the batch: required ------------------------------------------------------------------------------------
    @abstractmethod
    def encode(
        self, config: TrainConfig, processor: Any, rows: list[dict[str, Any]], source: str, labels: list[str] | None
    ) -> Encoded:
        """`rows` of `source` as examples; `labels` is the label set fixed so far (None: infer it)."""

    @abstractmethod
    def collate(self, examples: list[Example], pad_id: int) -> Batch: ...

    @abstractmethod
    def count_targets(self, batch: Batch) -> int: ...

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch, num_items: int) -> Loss: ...

    # ---- options and adapter ------------------------------------------------------------------------------------
    def check_options(self, config: TrainConfig) -> None:
        """Refuse option values that do not fit together (called once TrainConfig's own checks passed)."""
        return None

    def default_adapter_fields(self, config: TrainConfig) -> dict[str, Any]:
        """Adapter fields the kind sets unless the user does: what to adapt or train in full, never ranks."""
        return self.adapter_defaults

    # ---- the model for training ---------------------------------------------------------------------------------
    def check_model(self, config: TrainConfig) -> None:
        """Refuse a --model that cannot be loaded, before anything loads."""
        from ..pretrained import check_model_source

        check_model_source(config.model, config.gguf_file)

    def build_model(self, config: TrainConfig, labels: list[str] | None) -> nn.Module | None:
        """The model to train where it is not `model_class` loaded from --model (e.g. CLIP as a classifier)."""
        return None

    def head_width(self, labels: list[str] | None) -> int | None:
        """The head's number of outputs: len(labels) for a label set, else the model's default (None)."""
        return len(labels) if labels else None

    def pretrained_kwargs(self, num_labels: int | None) -> dict[str, Any]:
        """What `model_class.from_pretrained` is given besides the name, dtype and quantization."""
        return {}

    def label_model(self, model: nn.Module, labels: list[str] | None) -> None:
        """Record in the model's config what its head predicts (label names, problem type)."""
        return None

    # ---- the record an adapter keeps, and the model rebuilt from it (eval, export) -------------------------------
    def head_record(self, labels: list[str] | None, config: TrainConfig) -> dict[str, Any] | None:
        """What the adapter file records of the head trained ({"task": name, "labels": [...]}); None: no head."""
        return None

    def record_fits(self, head: Head) -> bool:
        """Whether `head` is a record this kind writes (False: the file was edited or damaged)."""
        return self.has_label_set and len(head.labels) >= 2

    def rebuilt_class(self, head: Head | None) -> str | None:
        """The transformers class the model is rebuilt with from `head` (None: not a transformers Auto class)."""
        return self.model_class

    def rebuild_model(
        self, head: Head | None, base: str, dtype: torch.dtype, num_labels: int | None, gguf_file: str | None
    ) -> nn.Module:
        """The base model as it was trained, its head labelled from the record, for the adapter to go on."""
        from ..pretrained import load_model

        model = load_model(
            base, self.model_class, dtype=dtype, gguf_file=gguf_file, **self.pretrained_kwargs(num_labels)
        )
        if head is not None:
            self.label_model(model, list(head.labels))
        return model

    def load_eval_processor(self, adapter_dir: Path | None, base: str, gguf_file: str | None) -> Any:
        """What turns evaluation inputs into model inputs: the adapter directory's tokenizer, else the base's."""
        return saved_tokenizer(adapter_dir, base, gguf_file)

    # ---- data ---------------------------------------------------------------------------------------------------
    def read_rows(self, config: TrainConfig, source: str, train: bool) -> list[dict[str, Any]]:
        """The data rows of `source` (training rows stop at --max-examples)."""
        rows = load_records(source)
        return rows[: config.max_examples] if train and config.max_examples is not None else rows

    def load_processor(self, config: TrainConfig) -> Any:
        """What turns rows into model inputs: the model's tokenizer."""
        from ..pretrained import load_tokenizer

        return load_tokenizer(config.model, config.gguf_file)

    def fit_processor(self, processor: Any, model: nn.Module) -> None:
        """Make processor and model agree once both are loaded: a pad token for text."""
        if processor.pad_token_id is None:
            processor.pad_token = processor.eos_token or processor.unk_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = processor.pad_token_id

    def count_inputs(self, batch: Batch) -> int:
        """What the run counts as seen: the tokens of the attention mask."""
        return int(batch["attention_mask"].sum())

    # ---- metrics ------------------------------------------------------------------------------------------------
    def eval_records(self, batch: Batch, output: Any) -> list[Any]:
        """What one evaluation batch contributes to `metrics` (gathered over processes)."""
        return []

    def metrics(self, records: list[Any]) -> dict[str, float]:
        """Evaluation metrics besides the loss, named without the `eval_` prefix."""
        return {}


def saved_tokenizer(adapter_dir: Path | None, base: str, gguf_file: str | None = None) -> Any:
    """The tokenizer an adapter was saved with, else the base model's."""
    from ..pretrained import load_tokenizer

    if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file():
        return load_tokenizer(str(adapter_dir))
    return load_tokenizer(base, gguf_file)


def two_classes(labels: list[str] | None, source: str) -> None:
    """A classifier of one class has nothing to learn (its loss is 0 from the start): refused."""
    if labels is not None and len(labels) < 2:
        raise AdapterError(
            f"{source} holds {len(labels)} class(es) {labels}: a classifier needs at least two. Add the other "
            "classes' examples (an image folder: one sub-folder per class), or name the full label set with --labels."
        )


def at_least_one(options: TaskOptions, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(options, name)
        if value is not None and value < 1:
            raise AdapterError(f"{name}={value} must be at least 1 (or left unset).")


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
