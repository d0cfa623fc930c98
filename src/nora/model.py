"""AdaptedModel: the user-facing wrapper, shaped like Hugging Face PEFT's PeftModel."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .basis import compute_factors
from .config import AdapterConfig
from .errors import AdapterError
from .inject import (
    TrainableCopy,
    adapter_layers,
    find_targets,
    trainable_copies,
    unwrap_layers,
    wrap_layers,
    wrap_modules_to_save,
)
from .layer import BASE, AdapterLayer
from .methods import get_method


class AdaptedModel(nn.Module):
    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default", **kwargs) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)
        self.peft_config: dict[str, AdapterConfig] = {}
        self.active_adapter: str = adapter_name
        for p in model.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, config, **kwargs)
        self.set_adapter(adapter_name)

    # ---- delegation ------------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        with self._rows(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        with self._rows(adapter_names):
            return self.model.generate(*args, **kwargs)

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
        layers = self.layers().values()
        for layer in layers:
            layer.row_adapters = list(adapter_names)
        try:
            yield
        finally:
            for layer in layers:
                layer.row_adapters = None

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
        if self.__dict__.get("_layer_cache") is None:
            self.__dict__["_layer_cache"] = adapter_layers(self.model)
        return self.__dict__["_layer_cache"]

    def _copies(self) -> dict[str, TrainableCopy]:
        if self.__dict__.get("_copy_cache") is None:
            self.__dict__["_copy_cache"] = trainable_copies(self.model)
        return self.__dict__["_copy_cache"]

    def _invalidate(self) -> None:
        self.__dict__["_layer_cache"] = self.__dict__["_copy_cache"] = None

    def add_adapter(
        self,
        adapter_name: str,
        config: AdapterConfig,
        calibration_data: Iterable | None = None,
        scales: dict[str, torch.Tensor] | None = None,
        layer_names: list[str] | None = None,
        ranks: dict[str, int] | None = None,
    ) -> None:
        """Inject a new adapter. AwSVD scales come from `scales`, or are measured on `calibration_data`."""
        if adapter_name in self.peft_config:
            raise AdapterError(f"an adapter named {adapter_name!r} exists; delete_adapter() it or pick a new name.")
        if "." in adapter_name or not adapter_name or adapter_name == BASE:
            raise AdapterError(f"adapter name {adapter_name!r} must be non-empty, without '.', and not {BASE!r}.")
        method = get_method(config.method)
        names = layer_names or find_targets(
            self.model, config.target_modules, config.exclude_modules, config.modules_to_save
        )
        if getattr(config, "awsvd", False) and scales is None and layer_names is None:
            if calibration_data is None:
                warnings.warn("awsvd=True without calibration_data: using plain SVD.", stacklevel=2)
            else:
                from .calibrate import calibrate

                scales = calibrate(self.model, calibration_data, names, config.awsvd_power, config.awsvd_eps)
        layers = wrap_layers(self.model, names)
        if not set(layers) <= set(self.layers()):
            self.__dict__["_layer_cache"] = None
        try:
            plans = {
                n: layer.plan(config, method, None if scales is None else scales.get(n), (ranks or {}).get(n))
                for n, layer in layers.items()
            }
            requests = [p.request for p in plans.values() if p.request is not None]
            factors = compute_factors(requests, config.svd_settings, config.basis_cache_dir, f"{method.name} SVD")
            for n, layer in layers.items():
                request = plans[n].request
                layer.add_adapter(adapter_name, config, method, plans[n], factors.get(request.key) if request else None)
            if config.modules_to_save:
                wrap_modules_to_save(self.model, config.modules_to_save, adapter_name)
                self.__dict__["_copy_cache"] = None
        except BaseException:
            for layer in layers.values():
                if adapter_name in layer.adapters:
                    layer.delete_adapter(adapter_name)
            raise
        self.peft_config[adapter_name] = config
        self._set_trainable(only=adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_loaded(adapter_name)
        for layer in self.layers().values():
            if adapter_name in layer.adapters:
                layer.delete_adapter(adapter_name)
        for tc in self._copies().values():
            tc.copies.pop(adapter_name, None)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Activate one adapter (or several, whose updates add)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            self._check_loaded(n)
        for layer in self.layers().values():
            layer.active_adapters = [n for n in names if n in layer.adapters]
        for tc in self._copies().values():
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
        for tc in self._copies().values():
            for name, mod in tc.copies.items():
                if only is None or name == only:
                    mod.requires_grad_(trainable and name in active)

    def eval_mode_frozen(self) -> None:
        """Freeze the adapters too (inference)."""
        self._set_trainable(False)

    # ---- parameter accounting --------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        t, n = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {n:,d} || trainable%: {100 * t / max(n, 1):.4f}")

    def memory_report(self) -> dict[str, int]:
        """Bytes held by adapters: their own tensors, the shared bases, and the resident mixed-batch stacks."""
        layers = self.layers().values()
        return {
            "adapter_tensors": sum(p.numel() * p.element_size() for m in layers for p in m.adapters.parameters()),
            "bases": sum(b.numel() * b.element_size() for m in layers for b in m.bases.buffers()),
            "stacks": sum(st.nbytes for m in layers for st in m.stacks.values()),
            "adapters": len(self.peft_config),
        }

    # ---- merging ---------------------------------------------------------------------------------------------
    def merge(self, adapter_names: list[str] | None = None) -> None:
        names = adapter_names or self.active_adapters
        for n in names:
            self._check_loaded(n)
        for layer in self.layers().values():
            layer.merge(names)

    def unmerge(self) -> None:
        for layer in self.layers().values():
            layer.unmerge()

    def merge_and_unload(self, adapter_names: list[str] | None = None) -> nn.Module:
        """Fold the adapter into the base weights and return the plain model (heads as trained)."""
        self.merge(adapter_names)
        keep = (adapter_names or self.active_adapters)[0]
        for tc in self._copies().values():
            if keep in tc.copies:
                tc.original = tc.copies[keep]
        unwrap_layers(self.model)
        self._invalidate()
        return self.model

    def unload(self) -> nn.Module:
        """Remove every adapter and return the original model, untouched."""
        self.unmerge()
        unwrap_layers(self.model)
        self._invalidate()
        return self.model

    # ---- files -----------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None) -> None:
        """Write each adapter as adapter_config.json + adapter_model.safetensors ("default" at the root,
        others in sub-directories, as PEFT does)."""
        from .io import save_adapter

        for name in selected_adapters or list(self.peft_config):
            self._check_loaded(name)
            target = save_directory if name == "default" else os.path.join(save_directory, name)
            save_adapter(self, name, target)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        adapter_dir: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
    ) -> AdaptedModel:
        from .io import read_adapter

        config, tensors, meta = read_adapter(adapter_dir)
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj.model = model
        obj.train(model.training)
        obj.peft_config = {}
        obj.active_adapter = adapter_name
        for p in model.parameters():
            p.requires_grad_(False)
        obj._attach(adapter_name, config, tensors, meta, adapter_dir)
        obj.set_adapter(adapter_name)
        if not is_trainable:
            obj.eval_mode_frozen()
        return obj

    def load_adapter(self, adapter_dir: str | os.PathLike, adapter_name: str, is_trainable: bool = False) -> None:
        from .io import read_adapter

        config, tensors, meta = read_adapter(adapter_dir)
        self._attach(adapter_name, config, tensors, meta, adapter_dir)
        self._set_trainable(is_trainable, only=adapter_name)

    def _attach(self, name, config, tensors, meta, where) -> None:
        from .io import apply_tensors, check_layers

        layer_names, ranks = check_layers(self.model, config, meta, tensors, where)
        scales = {n: tensors[f"{n}.awsvd_scale"] for n in layer_names if f"{n}.awsvd_scale" in tensors}
        self.add_adapter(name, config, scales=scales or None, layer_names=layer_names, ranks=ranks)
        try:
            apply_tensors(self, name, tensors, where)
        except BaseException:
            self.delete_adapter(name)
            raise

    def export_lora(self, save_directory: str | os.PathLike, adapter_name: str | None = None) -> None:
        """Write a standard PEFT LoRA adapter reproducing this adapter's ΔW exactly."""
        from .export import export_lora

        export_lora(self, adapter_name or self.active_adapter, save_directory)


def get_peft_model(
    model: nn.Module,
    config: AdapterConfig,
    adapter_name: str = "default",
    calibration_data: Iterable | None = None,
) -> AdaptedModel:
    """Wrap `model` with a new trainable adapter; everything else is frozen."""
    return AdaptedModel(model, config, adapter_name, calibration_data=calibration_data)
