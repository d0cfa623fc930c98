"""AdaptedModel: the user-facing wrapper, shaped like Hugging Face PEFT's PeftModel.

Adapters come in two forms. Those added or loaded for training are modules in every layer they adapt. Those
loaded for inference (`load_adapter(..., is_trainable=False)`, the default) of a method whose core sits between
a frozen outer basis (NoRA's serial core, LoRA-XS, SVFit) are *resident*: one slot of a per-model AdapterBank,
i.e. one row of a stacked buffer per layer, and nothing else, so a model holds thousands of them and loading one
costs the same whatever the number already loaded. A resident adapter serves mixed batches (`adapter_names=`)
as it is; the APIs that need modules (set_adapter, merge, export_lora) turn it into one first.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

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
from .methods import AdapterCore, get_method
from .store import AdapterBank, RowPlan, StackedCore

if TYPE_CHECKING:
    from .io import AdapterFile

# Config fields that change only an adapter's scale or bookkeeping: adapters differing in them share a bank.
_SCALE_ONLY = (
    "alpha",
    "use_rslora",
    "dropout",
    "target_modules",
    "exclude_modules",
    "base_model_name_or_path",
    "basis_cache_dir",
    "clamp_rank",
)


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
        plan = RowPlan(list(adapter_names), self._resident, BASE)
        layers = self.layers().values()
        for layer in layers:
            layer.row_plan = plan
        try:
            yield
        finally:
            for layer in layers:
                layer.row_plan = None

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

    @property
    def _banks(self) -> dict[str, AdapterBank]:
        """Resident banks by layout key."""
        return self.__dict__.setdefault("_adapter_banks", {})

    @property
    def _resident(self) -> dict[str, AdapterBank]:
        """Resident adapters: name → the bank holding its slot."""
        return self.__dict__.setdefault("_resident_adapters", {})

    def resident_bank(self, adapter_name: str) -> AdapterBank | None:
        """The bank of a resident (inference-only, slot-stored) adapter; None for a module adapter."""
        return self._resident.get(adapter_name)

    def reserve_resident(self, count: int) -> None:
        """Allocate room for `count` resident adapters of each layout now (and for every layout loaded later), so
        no load has to grow the stores, which copies every adapter already resident. Costs `count` slots of
        memory per layout up front (`memory_report()["resident"]`)."""
        if count < 0:
            raise ValueError(f"reserve_resident({count}): the count must be ≥ 0.")
        self.__dict__["_resident_reserve"] = count
        for bank in self._banks.values():
            bank.reserve(count)

    def _check_new_name(self, adapter_name: str) -> None:
        if adapter_name in self.peft_config:
            raise AdapterError(f"an adapter named {adapter_name!r} exists; delete_adapter() it or pick a new name.")
        if not valid_adapter_name(adapter_name):
            raise AdapterError(f"adapter name {adapter_name!r} {ADAPTER_NAME_RULE}")

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
        self._check_new_name(adapter_name)
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
            _warn_clamped(config, plans)
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
        if adapter_name in self._resident:
            self._remove_resident(adapter_name)
            del self.peft_config[adapter_name]
            return
        for layer in self.layers().values():
            if adapter_name in layer.adapters:
                layer.delete_adapter(adapter_name)
        for tc in self._copies().values():
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
            self._materialize(n)
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
            "resident": sum(bank.nbytes for bank in self._banks.values()),  # allocated, spare slots included
            "resident_in_use": sum(bank.slot_bytes * len(bank) for bank in self._banks.values()),
            "adapters": len(self.peft_config),
            "resident_adapters": len(self._resident),
        }

    # ---- merging ---------------------------------------------------------------------------------------------
    def merge(self, adapter_names: list[str] | None = None) -> None:
        names = adapter_names or self.active_adapters
        for n in names:
            self._check_loaded(n)
        for n in names:
            self._materialize(n)
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
        self._forget_banks()
        return self.model

    def unload(self) -> nn.Module:
        """Remove every adapter and return the original model, untouched."""
        self.unmerge()
        unwrap_layers(self.model)
        self._invalidate()
        self._forget_banks()
        return self.model

    def _forget_banks(self) -> None:
        self._banks.clear()
        self._resident.clear()

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
        """Load a saved adapter as `adapter_name`. Inference-only adapters of NoRA (serial core), LoRA-XS and
        SVFit become resident slots (see the module docstring); the others, and trainable ones, modules."""
        from .io import open_adapter

        file = open_adapter(adapter_dir)
        if not is_trainable and self._load_resident(adapter_name, file, adapter_dir):
            return
        self._attach(adapter_name, file.config, file.tensors(), file.meta, adapter_dir)
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

        name = adapter_name or self.active_adapter
        self._materialize(name)
        export_lora(self, name, save_directory)

    # ---- resident adapters -----------------------------------------------------------------------------------
    def _load_resident(self, name: str, file: AdapterFile, where) -> bool:
        """Load `file` into a slot of the bank of its layout (made on first use); False where the adapter
        cannot be resident (no outer basis, modules_to_save, a core that does not stack)."""
        from .io import fill_slot

        config = file.config
        method = get_method(config.method)
        if not method.uses_basis or config.modules_to_save:
            return False
        self._check_new_name(name)
        key = _bank_key(config, file.meta)
        bank = self._banks.get(key)
        if bank is None:
            bank = self._new_bank(key, method, file, where)
            if bank is None:
                return False
        else:
            layers = self.layers()
            merged = sorted({a for n in bank.stacks for a in layers[n].merged_adapters})
            if merged:
                raise AdapterError(
                    f"adapters {merged} are merged into the weights; unmerge() before adding another, so it "
                    "applies to the original weights."
                )
        slot = bank.allocate(name, config)
        try:
            fill_slot(bank, slot, file, where)
        except BaseException:
            bank.remove(name)
            if not bank:
                self._drop_bank(bank)
            raise
        self.peft_config[name] = config
        self._resident[name] = bank
        return True

    def _new_bank(self, key: str, method, file: AdapterFile, where) -> AdapterBank | None:
        """The bank for `file`'s layout, its bases made (from the layers' own, the basis cache, or an SVD) and
        every check of a module load passed; None if this method's core does not stack."""
        from .io import check_keys, check_layers, check_shape, set_file_layout

        config, meta, tensors = file.config, file.meta, file.tensors()
        layer_names, ranks = check_layers(self.model, config, meta, tensors, where)
        scales = {n: tensors[f"{n}.awsvd_scale"] for n in layer_names if f"{n}.awsvd_scale" in tensors}
        layers = wrap_layers(self.model, layer_names)
        if not set(layers) <= set(self.layers()):
            self.__dict__["_layer_cache"] = None
        bank = AdapterBank(key, method, config)
        bank.reserve(self.__dict__.get("_resident_reserve", 0))
        made: list[tuple[AdapterLayer, str]] = []
        header = file.header() or {}
        try:
            plans = {n: layer.plan(config, method, scales.get(n), ranks[n]) for n, layer in layers.items()}
            requests = [p.request for p in plans.values() if p.request is not None]
            factors = compute_factors(requests, config.svd_settings, config.basis_cache_dir, f"{method.name} SVD")
            expected = {f"{n}.awsvd_scale" for n in scales}
            for n, layer in layers.items():
                plan = plans[n]
                request = plan.request
                if layer.ensure_basis(plan, config, method, factors.get(request.key) if request else None):
                    made.append((layer, plan.basis_key))
                basis = layer.bases[plan.basis_key]
                dtype = layer.param_dtype()
                template = method.init_params(config, layer.base_weight().detach(), basis, plan.r, dtype)
                own = {}
                for pname, t in template.items():
                    tname = f"{n}.{pname}"
                    expected.add(tname)
                    if tname in tensors:
                        check_shape(tuple(t.shape), tensors[tname], tname, where)
                        own[pname] = tensors[tname].to(dtype)
                if len(own) == len(template) and not _stacks(method, config, basis, own):
                    raise _NotStackable
                order = sorted(template, key=lambda p: header.get(f"{n}.{p}", {}).get("data_offsets", [0])[0])
                layout, column = [], 1
                for pname in order:
                    layout.append((pname, column, tuple(template[pname].shape)))
                    column += template[pname].numel()
                stack = bank.new_stack(plan.basis_key, plan.r, plan.key, layout, dtype, layer.base_weight().device)
                bank.stacks[n] = stack
            check_keys(expected, tensors, where)
        except _NotStackable:
            for layer, basis_key in made:
                layer.release_basis(basis_key)
            return None
        except BaseException:
            for layer, basis_key in made:
                layer.release_basis(basis_key)
            raise
        bank.expected_keys = frozenset(expected)
        bank.param_order = list(template)
        set_file_layout(bank, file)
        for n, stack in bank.stacks.items():
            layers[n].add_bank(bank.id, stack)
        self._banks[key] = bank
        return bank

    def _drop_bank(self, bank: AdapterBank) -> None:
        layers = self.layers()
        for n in bank.stacks:
            if n in layers:
                layers[n].drop_bank(bank.id)
        self._banks.pop(bank.key, None)

    def _remove_resident(self, name: str) -> None:
        bank = self._resident.pop(name)
        bank.remove(name)
        if not bank:
            self._drop_bank(bank)

    @torch.no_grad()
    def _materialize(self, name: str) -> None:
        """Turn resident adapter `name` into modules (bit-identical tensors, frozen), freeing its slot."""
        bank = self._resident.get(name)
        if bank is None:
            return
        slot, config = bank.slots[name], bank.configs[name]
        layers = self.layers()
        for n, stack in bank.stacks.items():
            tensors = stack.tensors_at(slot)
            params = {p: tensors[p].clone() for p in bank.param_order}
            core = AdapterCore(bank.method, config, params, stack.r, stack.basis_key)
            core.fingerprint = stack.fingerprint
            core.train(layers[n].training)
            core.requires_grad_(False)
            layers[n].adapters[name] = core
        self._remove_resident(name)


def _warn_clamped(config: AdapterConfig, plans: dict) -> None:
    if not config.clamp_rank or isinstance(config.r, float):
        return
    clamped = {n: p.r for n, p in plans.items() if p.r < config.r}
    if clamped:
        warnings.warn(
            f"r={config.r} is wider than {len(clamped)} of {len(plans)} adapted layers; those take r = min(d, k) "
            f"(down to {min(clamped.values())}, e.g. {next(iter(clamped))}). Pass an explicit rank to choose another.",
            stacklevel=3,
        )


ADAPTER_NAME_RULE = (
    f"must be non-empty, without '.', '/', '\\' or control characters, and not {BASE!r} (save_pretrained writes "
    "each adapter to a sub-directory of that name)."
)


def valid_adapter_name(name: object) -> bool:
    """Whether `name` can name an adapter: it becomes a sub-directory name on save, so no path separators, dots
    ('..'), or control characters (NUL)."""
    return (
        isinstance(name, str)
        and bool(name)
        and name != BASE
        and not any(c in name for c in "./\\")
        and name.isprintable()
    )


class _NotStackable(Exception):
    pass


def _bank_key(config: AdapterConfig, meta: dict) -> str:
    """Adapters with equal keys share a bank: same method and core settings, same layers, ranks and bases."""
    fields = config.to_dict()
    for name in _SCALE_ONLY:
        fields.pop(name, None)
    return json.dumps([fields, meta["layers"]], sort_keys=True, default=str)


def _stacks(method, config: AdapterConfig, basis, params: dict[str, torch.Tensor]) -> bool:
    """Whether `method` stacks this core, and reads it element-wise so that stacking is exact: its stacked form
    of a one-row batch equals that of the lone core."""
    single = method.stack_parts(StackedCore(params, config), basis)
    if single is None:
        return False
    batched = method.stack_parts(StackedCore({k: v.unsqueeze(0) for k, v in params.items()}, config), basis)
    return len(batched) == len(single) and all(
        b.shape == (1, *s.shape) and torch.equal(b[0], s) for b, s in zip(batched, single, strict=True)
    )


def get_peft_model(
    model: nn.Module,
    config: AdapterConfig,
    adapter_name: str = "default",
    calibration_data: Iterable | None = None,
) -> AdaptedModel:
    """Wrap `model` with a new trainable adapter; everything else is frozen."""
    return AdaptedModel(model, config, adapter_name, calibration_data=calibration_data)
