"""TrainConfig: every knob of `nora train`, settable from Python, a YAML file, or the command line."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import AdapterConfig, fits_type
from ..errors import AdapterError
from ..methods import METHODS, get_method
from ..tasks import TASKS, TaskKind, TaskOptions, task_kind
from ..tasks.registry import DEFAULT_TASK

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
_NOT_KEYS = ("options", "other_options")  # fields that hold options by name, not options themselves


@dataclass(init=False)
class TrainConfig:
    """A training run. `adapter` holds the method's own fields (r, alpha, inner_r, ...) over the defaults of its
    config class, the same defaults as in Python (`nora.NoraConfig()`); a task adds only its own targets or head.

    The fields below are every kind's; `options` holds the options of the task kind (nora.tasks), given as keywords
    like the rest (`TrainConfig(task="image-cls", shots=4)`) and read as attributes (`config.shots`)."""

    model: str | None = None
    task: str = DEFAULT_TASK
    data: str | None = None
    eval_data: str | None = None
    eval_fraction: float = 0.0
    output_dir: str = "runs/nora"
    method: str = "nora"
    adapter: dict[str, Any] = field(default_factory=dict)
    target_modules: str | list[str] | None = None
    target_parameters: str | list[str] | None = None
    gguf_file: str | None = None
    quantize: str | None = None  # load the base in nf4 / fp4 (4-bit, QLoRA) or int8 with bitsandbytes
    loftq: bool = False  # with quantize: the adapter starts fitted to the quantization error (nora.loftq)
    # data
    max_length: int = 512
    mask_prompt: bool = True
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None  # default: `label` (or GLUE's own label column)
    labels: list[str] | None = None
    max_examples: int | None = None
    # optimisation
    batch_size: int = 8
    calibration_batches: int = 8  # AwSVD (awsvd=True): the first N training batches measure the input scales
    group_by_length: bool = False  # each epoch's shuffled order sorted by length within chunks of 50 global batches
    grad_accum: int = 1
    learning_rate: float | None = None
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    epochs: float = 1.0
    max_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    precision: str = "fp32"
    gradient_checkpointing: bool = False  # nora's policy: recompute the base, keep the narrow adapter activations
    liger: bool = False  # Liger's fused kernels (RMSNorm, SwiGLU, RoPE, linear cross-entropy) where CUDA has them
    compile: bool = False  # torch.compile the model (CUDA)
    lean_activations: bool = True  # MLP and norms keep only what backward needs (nora.lean; exact)
    loss_chunk_tokens: int | None = None  # causal LM: head + loss this many tokens at a time (None: auto, 0: stock)
    fsdp: bool = False  # shard the model's blocks over the processes (torch FSDP2) instead of replicating (DDP)
    # bookkeeping
    logging_steps: int = 10
    eval_steps: int | None = None
    save_steps: int | None = None
    save_total_limit: int = 2
    resume: bool | str = False
    resume_changes: bool = False  # resume with data, model, adapter or batch settings other than the run's
    overwrite: bool = False
    plot: bool = True
    progress: bool = True
    eval_tasks: list[str] | None = None
    eval_data_dir: str | None = None
    eval_limit: int | None = None
    threads: int | None = None  # CPU threads for torch (None: torch's choice)
    options: TaskOptions = field(default_factory=TaskOptions)  # the task kind's own options
    other_options: dict[str, Any] = field(default_factory=dict)  # another kind's settings given: kept, unused

    def __init__(self, **values: Any) -> None:
        given = values.pop("options", None)  # dataclasses.replace passes the options whole
        if isinstance(given, TaskOptions):
            values = {**dataclasses.asdict(given), **values}
        values = {**(values.pop("other_options", None) or {}), **values}
        for f in dataclasses.fields(self):
            if f.name not in _NOT_KEYS:
                setattr(self, f.name, values.pop(f.name) if f.name in values else _default(f))
        _check_types(self)
        self._check_choices()
        self.options, self.other_options = _kind_options(self.task, values)
        self._check_counts()
        self._check_optimisation()
        self._check_data_options()
        self.kind.check_options(self)
        self._check_parallelism()
        self._check_quantize()
        self._check_resume()
        self.adapter_config()  # validates the method's fields now, not after the model has loaded

    def __getattr__(self, name: str) -> Any:
        """The task kind's options read as attributes (`config.shots`), as before they moved into `options`."""
        options = self.__dict__.get("options")
        if options is not None and name in {f.name for f in dataclasses.fields(options)}:
            return getattr(options, name)
        if name in self.__dict__.get("other_options", {}):
            return self.__dict__["other_options"][name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def kind(self) -> TaskKind:
        return task_kind(self.task)

    def _check_choices(self) -> None:
        task_kind(self.task)
        if self.method not in METHODS:
            raise AdapterError(f"method={self.method!r}: choose one of {sorted(METHODS)}.")
        if self.learning_rate is None:
            default_lr(self.method)  # a method without one is refused now, not when training starts
        if self.precision not in PRECISIONS:
            raise AdapterError(f"precision={self.precision!r}: choose one of {PRECISIONS}.")
        if self.lr_scheduler not in SCHEDULES:
            raise AdapterError(f"lr_scheduler={self.lr_scheduler!r}: choose one of {SCHEDULES}.")

    def _check_counts(self) -> None:
        for name in ("batch_size", "calibration_batches", "grad_accum", "max_length", "logging_steps",
                     "save_total_limit"):  # fmt: skip
            if getattr(self, name) < 1:
                raise AdapterError(f"{name}={getattr(self, name)} must be at least 1.")
        for name in ("max_steps", "eval_steps", "save_steps", "max_examples", "eval_limit", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise AdapterError(f"{name}={getattr(self, name)} must be at least 1 (or left unset).")
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens < 0:
            raise AdapterError(
                f"loss_chunk_tokens={self.loss_chunk_tokens} must be at least 1, 0 (the model's own loss) or unset "
                "(auto)."
            )

    def _check_optimisation(self) -> None:
        if self.learning_rate is not None and not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            hint = _default_lr_hint(self.method)
            raise AdapterError(f"learning_rate={self.learning_rate} must be a positive number (e.g. 1e-3){hint}.")
        if not math.isfinite(self.epochs) or (self.max_steps is None and self.epochs <= 0):
            raise AdapterError(f"epochs={self.epochs} must be positive (or give max_steps).")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise AdapterError(f"warmup_ratio={self.warmup_ratio} must lie in [0, 1): a fraction of all steps.")
        if self.warmup_steps < 0:
            raise AdapterError(f"warmup_steps={self.warmup_steps} must be 0 or more.")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise AdapterError(f"weight_decay={self.weight_decay} must be 0 or a positive number.")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise AdapterError(f"max_grad_norm={self.max_grad_norm} must be positive (0 on the command line: off).")
        if not 0 <= self.seed < 2**32:
            raise AdapterError(f"seed={self.seed} must lie in [0, 2^32).")

    def _check_data_options(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise AdapterError(f"eval_fraction={self.eval_fraction} must lie in [0, 1).")
        if self.eval_fraction and self.eval_data:
            raise AdapterError("give eval_data or eval_fraction, not both: the held-out set would be ambiguous.")
        if self.labels is None:
            return
        self.labels = [str(label) for label in self.labels]
        if not self.kind.has_label_set:
            classifiers = " or ".join(f"--task {name}" for name, task in TASKS.items() if task.has_label_set)
            raise AdapterError(f"labels fix a classifier's label set: they need {classifiers}.")

    def _check_quantize(self) -> None:
        if self.quantize is None:
            if self.loftq:
                raise AdapterError("--loftq fits the adapter to a quantized base's error: add --quantize nf4 or int8.")
            return
        from ..quant import SCHEMES

        if self.quantize not in SCHEMES:
            raise AdapterError(f"--quantize {self.quantize}: choose from {', '.join(SCHEMES)} (bitsandbytes).")
        if self.fsdp:
            raise AdapterError("--quantize with --fsdp is not supported: shard a quantized base with DDP instead.")
        if self.kind.reads_images:
            raise AdapterError(f"--quantize loads transformers text models in bitsandbytes; not --task {self.task}.")
        if self.loftq and not get_method(self.method).has_fit:
            raise AdapterError(
                f"--loftq fits the adapter to the quantization error by least squares; --method {self.method} has no "
                "such fit: use lora, pissa, nora, lora-xs or svfit, or leave --loftq out."
            )

    def _check_resume(self) -> None:
        if self.resume_changes and not self.resume:
            raise AdapterError(
                "--resume-changes accepts changed settings when resuming a run: add --resume latest (or a checkpoint)."
            )

    def _check_parallelism(self) -> None:
        if self.fsdp and self.precision == "fp16":
            raise AdapterError("fsdp with fp16 is not supported (no sharded grad scaler); use precision bf16 or fp32.")
        if self.fsdp and self.eval_tasks:
            raise AdapterError(
                "eval_tasks runs on one process and cannot use an FSDP-sharded model; evaluate the "
                "saved adapter with `nora eval RUN_DIR/adapter` instead."
            )

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else default_lr(self.method)

    def adapter_config(self) -> AdapterConfig:
        """The method's config: the fields given (adapter, target_modules, target_parameters) over the task's, over
        the class defaults."""
        fields = dict(self.adapter)
        for name in ("target_modules", "target_parameters"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        cls = get_method(self.method).config_cls
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise AdapterError(
                f"adapter options {unknown} are not fields of {cls.__name__}{closest(unknown[0], known)}; it takes "
                f"{sorted(known)}."
            )
        fields = {**self.kind.default_adapter_fields(self), **fields}
        if "alpha" in fields and fields["alpha"] is not None:
            fields["alpha"] = float(fields["alpha"])
        try:
            return cls(**fields)
        except TypeError as e:
            raise AdapterError(f"adapter options {self.adapter}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """Every option by name, the task kind's among them (as a YAML file or train_config.json holds them)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _NOT_KEYS}
        return {**copy.deepcopy(values), **copy.deepcopy(self.other_options), **dataclasses.asdict(self.options)}

    def resolved(self) -> dict[str, Any]:
        """The options as the run used them: the learning rate and every adapter field filled in, so a run can be
        repeated from its own train_config.json (`nora train --config RUN/train_config.json`)."""
        values = self.to_dict()
        values["learning_rate"] = self.lr
        adapter = self.adapter_config().to_dict()
        adapter.pop("method")
        values["adapter"] = adapter
        values["target_modules"] = values["target_parameters"] = None  # inside adapter
        values["resume"] = False
        values["resume_changes"] = False
        values["overwrite"] = False
        return values

    def changes_since(self, recorded: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """The settings a resumed run must share with the run it continues (RESUME_KEYS, each adapter field) that
        differ from `recorded` (a train_config.json): {name: (recorded, now)}. Keys a file lacks are not compared
        (an older nora wrote it)."""
        now = json.loads(json.dumps(self.resolved()))  # as the file holds it: tuples as lists
        keys = [*RESUME_KEYS, *self.options.resume_keys()]
        pairs = [(key, recorded[key], now[key]) for key in keys if key != "adapter" and key in recorded and key in now]
        adapter = recorded.get("adapter")
        if isinstance(adapter, dict):
            pairs += [(f"adapter.{k}", adapter[k], now["adapter"][k]) for k in sorted(adapter) if k in now["adapter"]]
        paths = (*_PATHS, *self.options.paths)
        return {key: (old, new) for key, old, new in pairs if not _same_setting(key, old, new, paths)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = [*(f.name for f in dataclasses.fields(cls) if f.name not in _NOT_KEYS), *option_names()]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise AdapterError(
                f"unknown training option {unknown[0]!r}{closest(unknown[0], known)}"
                f"{f' (and {unknown[1:]})' if unknown[1:] else ''}; `nora train --help` lists them all."
            )
        return cls(**values)


# What a resumed run must share with the run it continues: the model, the data and its order, the adapter, the batch.
# (and the task kind's options, but those it declares free: TaskOptions.free_on_resume)
RESUME_KEYS = (
    "model", "gguf_file", "quantize", "task", "data", "max_examples", "eval_fraction", "labels", "text_column",
    "text_pair_column", "label_column", "max_length", "mask_prompt", "method", "adapter", "batch_size", "grad_accum",
    "group_by_length", "seed",
)  # fmt: skip
_PATHS = ("model", "data", "adapter.base_model_name_or_path")


def option_names() -> list[str]:
    """The options of every task kind, in registry order (an option two kinds share, once)."""
    return list(dict.fromkeys(f.name for kind in TASKS.values() for f in dataclasses.fields(kind.Options)))


def _kind_options(task: str, values: dict[str, Any]) -> tuple[TaskOptions, dict[str, Any]]:
    """The options of kind `task` from `values` (the keywords TrainConfig's own fields left), and the settings of
    other kinds given. Another kind's option at its default is dropped (a train_config.json of an older nora lists
    every option); one off by default (None, False) but given is refused, naming the kinds it belongs to: the run
    meant that kind; a setting with a default of its own (a template, a weight) is kept, unused."""
    kind = task_kind(task)
    own = {f.name for f in dataclasses.fields(kind.Options)}
    unknown = sorted(set(values) - own - set(option_names()))
    if unknown:
        raise TypeError(f"TrainConfig got unexpected keyword argument(s) {unknown}")
    other: dict[str, Any] = {}
    for name in sorted(set(values) - own):
        owners = [k for k in TASKS.values() if name in {f.name for f in dataclasses.fields(k.Options)}]
        default = _default(next(f for f in dataclasses.fields(owners[0].Options) if f.name == name))
        if values[name] == default:
            continue
        if default is not None and default is not False:
            _check_types(owners[0].Options(**{name: values[name]}))
            other[name] = values[name]
            continue
        names = " or ".join(f"--task {k.name}" for k in owners)
        listed = ", ".join(f.name for f in dataclasses.fields(owners[0].Options))
        raise AdapterError(
            f"{name} is an option of {names}, not of --task {task} (options of --task {owners[0].name}: {listed})."
        )
    options = kind.Options(**{k: v for k, v in values.items() if k in own})
    _check_types(options)
    return options, other


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _same_setting(key: str, old: Any, new: Any, paths: tuple[str, ...] = _PATHS) -> bool:
    """Equal, or (a path setting) naming the same files: "data.json" and "./data.json" are one file."""
    if old == new:
        return True
    if key not in paths or not isinstance(old, str) or not isinstance(new, str):
        return False

    def files(value: str) -> list[Path]:
        return [Path(part.strip()).expanduser().resolve() for part in value.split(",")]

    return files(old) == files(new)


def closest(name: str, names: list[str]) -> str:
    """ " (did you mean 'X'?)" for the known name nearest `name`, or "" where none is near."""
    import difflib

    match = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def default_lr(method: str) -> float:
    """The learning rate `method` trains with when none is given: the method's own `default_lr`."""
    lr = getattr(get_method(method), "default_lr", None)
    if lr is None:
        raise AdapterError(
            f"method {method!r} declares no default learning rate (default_lr): give learning_rate (--learning-rate)."
        )
    return lr


def _default_lr_hint(method: str) -> str:
    lr = getattr(get_method(method), "default_lr", None)
    return f"; leave it unset for {method}'s default {lr:g}" if lr is not None else ""


def _check_types(config: TrainConfig | TaskOptions) -> None:
    """Each option of the type its field declares (a YAML file may hold anything). Numbers written as strings
    are read as numbers: YAML 1.1 reads `1e-3` as a string."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        if f.name in _NOT_KEYS:
            continue
        value, hint = getattr(config, f.name), hints[f.name]
        if isinstance(value, str) and not fits_type(value, hint):
            with contextlib.suppress(ValueError):
                value = int(value) if fits_type(0, hint) and value.strip().lstrip("+-").isdigit() else float(value)
        if not fits_type(value, hint):
            raise AdapterError(f"option {f.name}={getattr(config, f.name)!r} must be {f.type}.")
        setattr(config, f.name, value)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The options of a YAML file (keys as in TrainConfig; dashes allowed: `learning-rate`)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"config file {path} does not exist.")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise AdapterError(f"config file {path} is not valid YAML: {e}") from e
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise AdapterError(f"config file {path} must hold a mapping of option: value, not {type(values).__name__}.")
    return {str(k).replace("-", "_"): v for k, v in values.items()}
