"""AdaptedModel: the user-facing wrapper, shaped like Hugging Face PEFT's PeftModel.

It holds zero or more named adapters. Those added or loaded for training are modules in every layer they adapt.
Those loaded for inference (`load_adapter(..., is_trainable=False)`, the default) of a linear method on a frozen
outer basis (NoRA, LoRA-XS, SVFit) are *resident* (resident.py): one slot of a per-model bank, i.e. one row of a
stacked buffer per layer, and nothing else, so a model holds thousands of them and loading one costs the same
whatever the number already loaded. A resident adapter serves mixed batches (`adapter_names=`) as it is; the
APIs that need modules (set_adapter, merge, export_lora) turn it into one first.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .accel import enable_adapter_checkpointing
from .calibrate import calibrate
from .config import AdapterConfig
from .errors import AdapterError
from .export import export_lora
from .file_check import check_layers
from .hf_compat import (
    blank_instance,
    clear_gguf_quantization,
    drop_tied_copies,
    fill_tied_copies,
    forwarding_class,
    note_trainer,
)
from .inject import (
    TrainableCopy,
    adapter_layers,
    expert_dropout_note,
    find_targets,
    trainable_copies,
    unwrap_layers,
    wrap_expert_stacks,
    wrap_layers,
    wrap_modules_to_save,
)
from .io import open_adapter, write_adapter
from .layers import BASE, AdapterLayer
from .methods import get_method
from .peft_import import is_peft_lora_dir, peft_lora_as_nora
from .planning import plan_bases, release_bases
from .resident import ResidentAdapters
from .slots import AdapterBank, RowPlan, rows_context
from .state import adapter_payload, apply_tensors


class AdaptedModel(nn.Module):
    """`model` (frozen) with named adapters; with a `config`, a first trainable adapter `adapter_name` is added
    and made active, as `get_peft_model` does. Without one it holds none until `add_adapter` / `load_adapter`."""

    def __init__(
        self, model: nn.Module, config: AdapterConfig | None = None, adapter_name: str = "default", **kwargs
    ) -> None:
        super().__init__()
        self.__class__ = forwarding_class(type(self), type(model))  # its forward's signature is the base's
        clear_gguf_quantization(model)
        self.register_state_dict_post_hook(drop_tied_copies)
        self.register_load_state_dict_pre_hook(fill_tied_copies)
        self.register_forward_pre_hook(note_trainer)
        self.model = model
        self.train(model.training)
        self.peft_config: dict[str, AdapterConfig] = {}
        self.active_adapter: str = adapter_name
        self._layer_cache: dict[str, AdapterLayer] | None = None
        self._copy_cache: dict[str, TrainableCopy] | None = None
        self.resident = ResidentAdapters(model, self.layers, self._wrap)
        for p in model.parameters():
            p.requires_grad_(False)
        if config is not None:
            self.add_adapter(adapter_name, config, **kwargs)
            self.set_adapter(adapter_name)

    def train(self, mode: bool = True) -> AdaptedModel:
        """As nn.Module.train, except that the frozen base's batch-norm layers stay in eval mode: training the
        adapter must not rewrite the base's running statistics (they are not in the adapter file, so a reloaded
        adapter would compute something else). A batch norm listed in modules_to_save trains as usual."""
        super().train(mode)
        if mode:
            trained = {id(m) for tc in trainable_copies(self.model).values() for m in tc.copies.modules()}
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and id(module) not in trained:
                    module.eval()
        return self

    # ---- delegation ------------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The base model's forward (its signature, plus `adapter_names`: one adapter per row of the batch)."""
        with self._rows(adapter_names):
            return self.model(*args, **kwargs)

    def __reduce__(self) -> tuple:  # pickled as the class it was built as; the forwarding class is remade on load
        declared = type(self).__dict__.get("_declared_class", type(self))
        return blank_instance, (declared, type(self.model)), self.__dict__

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        with self._rows(adapter_names):
            return self.model.generate(*args, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **_: Any) -> None:
        """What transformers' Trainer calls for activation_checkpointing=True: the base model's blocks recompute
        their activations in backward, the adapters keep their narrow ones (nora.accel; the kwargs are its own)."""
        enable_adapter_checkpointing(self.model)

    gradient_checkpointing_enable = activation_checkpointing_enable  # the name before transformers 5.2x

    @contextmanager
    def _rows(self, adapter_names: list[str] | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {BASE})
        if unknown:
            raise AdapterError(
                f"adapter_names mentions {unknown}, which are not loaded; loaded: "
                f"{sorted(self.peft_config)} (and {BASE!r} for the base model)."
            )
        with rows_context(RowPlan(list(adapter_names), self.resident.of, BASE, list(self.layers().values()))):
            yield

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone (merged adapters stay merged: unmerge first for the pristine base)."""
        layers = self.layers().values()
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False

    # ---- adapters --------------------------------------------------------------------------------------------
    def layers(self) -> dict[str, AdapterLayer]:
        """The wrapped layers by module name (cached: walking a model with many adapters is not free)."""
        if self._layer_cache is None:
            self._layer_cache = adapter_layers(self.model)
        return self._layer_cache

    def trainable_copies(self) -> dict[str, TrainableCopy]:
        """The modules trained whole (modules_to_save), by module name."""
        if self._copy_cache is None:
            self._copy_cache = trainable_copies(self.model)
        return self._copy_cache

    def _invalidate(self) -> None:
        self._layer_cache = self._copy_cache = None

    def resident_bank(self, adapter_name: str) -> AdapterBank | None:
        """The bank of a resident (inference-only, slot-stored) adapter; None for a module adapter."""
        return self.resident.of.get(adapter_name)

    def reserve_resident(self, count: int) -> None:
        """Allocate room for `count` resident adapters of each layout now (and for every layout loaded later), so
        no load has to grow the stores, which copies every adapter already resident. Costs `count` slots of
        memory per layout up front (`memory_report()["resident"]`)."""
        if count < 0:
            raise ValueError(f"reserve_resident({count}): the count must be ≥ 0.")
        self.resident.reserve(count)

    def _check_new_name(self, adapter_name: str) -> None:
        if adapter_name in self.peft_config:
            raise AdapterError(f"an adapter named {adapter_name!r} exists; delete_adapter() it or pick a new name.")
        check_adapter_name(adapter_name)

    def add_adapter(
        self,
        adapter_name: str,
        config: AdapterConfig,
        calibration_data: Iterable | None = None,
        scales: dict[str, torch.Tensor] | None = None,
        layer_names: list[str] | None = None,
        ranks: dict[str, int] | None = None,
        keys: dict[str, str] | None = None,
        sources: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Inject a new adapter. AwSVD scales come from `scales`, or are measured on `calibration_data`;
        `sources` gives the W0 of a layer's basis where it is not the layer's own (file_check.check_layers)."""
        self._check_new_name(adapter_name)
        method = get_method(config.method)
        if not method.adapts_layers:
            names = []
        elif layer_names is not None:
            names = layer_names
        else:
            names = find_targets(self.model, config.target_modules, config.exclude_modules, config.modules_to_save,
                                 config.target_parameters)  # fmt: skip
            expert_dropout_note(names, config.dropout)
        calibration = method.calibration(config)
        if calibration is not None and scales is None and layer_names is None:
            if calibration_data is None:
                warnings.warn("awsvd=True without calibration_data: using plain SVD.", stacklevel=2)
            else:
                scales = calibrate(self.model, calibration_data, names, *calibration)
        layers = self._wrap(names)
        plans, made = plan_bases(config, method, layers, scales or {}, ranks or {}, keys or {}, sources or {})
        try:
            for n, layer in layers.items():
                layer.add_adapter(adapter_name, config, method, plans[n])
            if config.modules_to_save:
                wrap_modules_to_save(self.model, config.modules_to_save, adapter_name)
                self._copy_cache = None
        except BaseException:
            for layer in layers.values():
                if adapter_name in layer.adapters:
                    layer.delete_adapter(adapter_name)
            release_bases(made)
            raise
        self.peft_config[adapter_name] = config
        self._set_trainable(only=adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_loaded(adapter_name)
        if adapter_name in self.resident:
            self.resident.remove(adapter_name)
            del self.peft_config[adapter_name]
            return
        for layer in self.layers().values():
            if adapter_name in layer.adapters:
                layer.delete_adapter(adapter_name)
        for tc in self.trainable_copies().values():
            if adapter_name in tc.copies:
                del tc.copies[adapter_name]  # ModuleDict.pop takes no default
            if tc.active == adapter_name:
                tc.active = None
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Activate one adapter (or several, whose updates add)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            self._check_loaded(n)
        for n in names:
            self.materialize(n)
        for layer in self.layers().values():
            layer.active_adapters = [n for n in names if n in layer.adapters]
        for tc in self.trainable_copies().values():
            tc.active = names[0]
        self.active_adapter = names[0]
        self._set_trainable()

    @property
    def active_adapters(self) -> list[str]:
        layer = next(iter(self.layers().values()), None)
        return list(layer.active_adapters) if layer else [self.active_adapter]

    def _check_loaded(self, name: str) -> None:
        if name not in self.peft_config:
            raise AdapterError(f"no adapter named {name!r}; loaded: {sorted(self.peft_config)}.")

    def _set_trainable(self, trainable: bool = True, only: str | None = None) -> None:
        """Only the active adapters' tensors (and their modules_to_save copies) require grad; `only` limits the
        update to one adapter (adding one must not walk thousands of others)."""
        active = set(self.active_adapters)
        for layer in self.layers().values():
            names = list(layer.adapters) if only is None else [only] if only in layer.adapters else []
            for name in names:
                layer.adapters[name].requires_grad_(trainable and name in active)
        for tc in self.trainable_copies().values():
            for name, mod in tc.copies.items():
                if only is None or name == only:
                    mod.requires_grad_(trainable and name in active)

    def eval_mode_frozen(self) -> AdaptedModel:
        """Inference: the adapters frozen too (no tensor requires grad) and every module in eval mode (no dropout),
        as PEFT leaves a model it loads without is_trainable."""
        self._set_trainable(False)
        return self.eval()

    # ---- parameter accounting --------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        t, n = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {n:,d} || trainable%: {100 * t / max(n, 1):.4f}")

    def memory_report(self) -> dict[str, int]:
        """Bytes held by adapters: their own tensors, the shared bases, the stacks that mirror module adapters for
        mixed batches ("stacks"), and the resident adapters' banks."""
        layers = self.layers().values()
        return {
            "adapter_tensors": sum(p.numel() * p.element_size() for m in layers for p in m.adapters.parameters()),
            "bases": sum(b.numel() * b.element_size() for m in layers for b in m.bases.buffers()),
            "stacks": sum(mirror.nbytes for m in layers for mirror in m.mirrors.values()),
            "resident": sum(bank.nbytes for bank in self.resident.banks.values()),  # allocated, spare slots included
            "resident_in_use": sum(bank.slot_bytes * len(bank) for bank in self.resident.banks.values()),
            "adapters": len(self.peft_config),
            "resident_adapters": len(self.resident.of),
        }

    # ---- merging ---------------------------------------------------------------------------------------------
    def merge(self, adapter_names: list[str] | None = None) -> None:
        names = adapter_names or self.active_adapters
        for n in names:
            self._check_loaded(n)
        for n in names:
            self.materialize(n)
        for layer in self.layers().values():
            layer.merge(names)

    def unmerge(self) -> None:
        for layer in self.layers().values():
            layer.unmerge()

    def merge_and_unload(self, adapter_names: list[str] | None = None, dequantize: bool = False) -> nn.Module:
        """Fold the adapter into the base weights and return the plain model (heads as trained). A quantized
        (bitsandbytes) layer is dequantized, given ΔW and requantized, with the rounding that costs stated in a
        warning; with `dequantize=True` it becomes a float nn.Linear holding the exact merged weight instead."""
        names = adapter_names or self.active_adapters
        quantized = {n: layer for n, layer in self.layers().items() if layer.quant is not None}
        if quantized:
            self._fold_quantized(names, quantized, dequantize)
        self.merge(adapter_names)
        keep = names[0]
        for tc in self.trainable_copies().values():
            if keep in tc.copies:
                tc.original = tc.copies[keep]
        unwrap_layers(self.model)
        self._invalidate()
        self.resident.forget()
        return self.model

    def _fold_quantized(self, names: list[str], layers: dict[str, AdapterLayer], dequantize: bool) -> None:
        for n in names:
            self._check_loaded(n)
            self.materialize(n)
        rounding = delta = 0.0
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
        for layer in layers.values():
            active = [n for n in names if n in layer.adapters]
            layer.base_layer, r2, d2 = layer.fold(active, dtype if dequantize else None)
            layer.merged_adapters.extend(active)
            rounding, delta = rounding + r2, delta + d2
        if not dequantize:
            schemes = sorted({layer.quant["scheme"] for layer in layers.values()})
            relative = (rounding / max(delta, 1e-30)) ** 0.5
            warnings.warn(
                f"merged into {len(layers)} quantized ({', '.join(schemes)}) layers by dequantizing, adding ΔW and "
                f"requantizing: the stored weights differ from the exact W0 + ΔW by {relative:.1%} "
                "of ‖ΔW‖ (rounding), so the merged model's outputs differ from the adapter's by that much. "
                "merge_and_unload(dequantize=True) keeps the exact merge in float layers.",
                stacklevel=3,
            )

    def unload(self) -> nn.Module:
        """Remove every adapter and return the original model, untouched."""
        self.unmerge()
        unwrap_layers(self.model)
        self._invalidate()
        self.resident.forget()
        return self.model

    # ---- files -----------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None) -> None:
        """Write each adapter as adapter_config.json + adapter_model.safetensors ("default" at the root,
        others in sub-directories, as PEFT does)."""
        for name in selected_adapters or list(self.peft_config):
            self._check_loaded(name)
            target = save_directory if name == "default" else os.path.join(save_directory, name)
            write_adapter(*adapter_payload(self, name), target)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        adapter_dir: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
    ) -> AdaptedModel:
        """`model` with the adapter saved in `adapter_dir` loaded and active."""
        obj = cls(model, adapter_name=adapter_name)
        obj.load_adapter(adapter_dir, adapter_name, is_trainable=is_trainable)
        obj.set_adapter(adapter_name)
        if not is_trainable:
            obj.eval_mode_frozen()
        return obj

    def load_adapter(self, adapter_dir: str | os.PathLike, adapter_name: str, is_trainable: bool = False) -> None:
        """Load a saved adapter (nora's, or a standard PEFT LoRA directory: nora.peft_import) as `adapter_name`.
        Inference-only adapters of a linear method on an outer basis (NoRA, LoRA-XS, SVFit) become resident
        slots (see the module docstring); the others, and trainable ones, modules."""
        self._check_new_name(adapter_name)
        if is_peft_lora_dir(adapter_dir):
            config, tensors, layer_names, ranks = peft_lora_as_nora(self.model, adapter_dir)
            keys: dict[str, str] | None = None
            sources: dict[str, torch.Tensor] | None = None
        else:
            file = open_adapter(adapter_dir)
            experts = wrap_expert_stacks(self.model, list(file.meta["layers"]))  # so check_layers finds them
            if experts:
                self._invalidate()
            if not is_trainable and not experts and self.resident.load(adapter_name, file, adapter_dir):
                self.peft_config[adapter_name] = file.config
                return
            config, tensors = file.config, file.tensors()
            layer_names, ranks, keys, sources = check_layers(self.model, config, file.meta, tensors, adapter_dir)
        scales = {n: tensors[f"{n}.awsvd_scale"] for n in layer_names if f"{n}.awsvd_scale" in tensors}
        self.add_adapter(adapter_name, config, scales=scales or None, layer_names=layer_names, ranks=ranks, keys=keys,
                         sources=sources)  # fmt: skip
        try:
            apply_tensors(self, adapter_name, tensors, adapter_dir)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
        self._set_trainable(is_trainable, only=adapter_name)

    def export_lora(self, save_directory: str | os.PathLike, adapter_name: str | None = None) -> None:
        """Write a standard PEFT LoRA adapter reproducing this adapter's ΔW exactly."""
        export_lora(self, adapter_name or self.active_adapter, save_directory)

    def materialize(self, adapter_name: str) -> None:
        """Turn resident adapter `adapter_name` into modules (bit-identical tensors, frozen); no-op otherwise."""
        self.resident.materialize(adapter_name)

    def _wrap(self, names: list[str]) -> dict[str, AdapterLayer]:
        layers = wrap_layers(self.model, names)
        if not set(layers) <= set(self.layers()):
            self._layer_cache = None
        return layers


def check_adapter_name(name: object) -> None:
    """Refuse a name that cannot name an adapter: it becomes a sub-directory name on save, so no path separators,
    dots ('..'), or control characters (NUL)."""
    usable = isinstance(name, str) and name not in ("", BASE) and not any(c in name for c in "./\\")
    if not (usable and name.isprintable()):
        raise AdapterError(
            f"adapter name {name!r} must be non-empty, without '.', '/', '\\' or control characters, and not "
            f"{BASE!r} (save_pretrained writes each adapter to a sub-directory of that name)."
        )


def get_peft_model(
    model: nn.Module,
    config: AdapterConfig,
    adapter_name: str = "default",
    calibration_data: Iterable | None = None,
) -> AdaptedModel:
    """Wrap `model` with a new trainable adapter; everything else is frozen."""
    return AdaptedModel(model, config, adapter_name, calibration_data=calibration_data)
