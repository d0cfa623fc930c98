"""Choosing target modules by name, regex, "all-linear" or "all-conv" (and fused MoE expert parameters by name or
"all-experts"), and swapping them for AdapterLayers."""

from __future__ import annotations

import copy
import re
import warnings
from collections import Counter

import torch
from torch import nn

from .errors import AdapterError
from .layers import AdapterLayer, ExpertsLayer, expert_parameters, is_adaptable, is_grouped_conv, kind_of
from .slots import active_plan


def _matches(name: str, spec: str | list[str] | None) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _within(name: str, spec: list[str] | None) -> bool:
    """Whether `name` is, or lies inside, a module that `spec` names (a module trained in full needs no adapter)."""
    parts = name.split(".")
    return any(_matches(".".join(parts[:i]), spec) for i in range(1, len(parts) + 1))


# Task heads of transformers models: "all-linear" leaves modules under these names alone.
HEAD_NAMES = {"lm_head", "classifier", "score", "qa_outputs"}


def output_head_names(model: nn.Module) -> set[str]:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return {
        n
        for n, m in model.named_modules()
        if (head is not None and (m is head or getattr(m, "base_layer", None) is head))
        or HEAD_NAMES & set(n.split("."))
    }


def find_targets(
    model: nn.Module,
    target_modules: str | list[str],
    exclude_modules: str | list[str] | None = None,
    modules_to_save: list[str] | None = None,
    target_parameters: str | list[str] | None = None,
) -> list[str]:
    """Names of the adaptable layers a config selects: names, a regex, `"all-linear"` (every nn.Linear / Conv1D
    but the output head) or `"all-conv"` (every nn.Conv2d with groups=1). Grouped and depthwise convolutions take
    no adapter: named explicitly they are refused, under "all-conv" skipped with a warning saying why.

    Fused MoE expert parameters (`experts.gate_up_proj`, E × … × …) are chosen by `target_parameters`
    (see `expert_targets`); each chosen parameter gives one layer per expert, `<module>.<parameter>.<expert>`."""
    heads = output_head_names(model)
    names, grouped = [], []
    for name, module in model.named_modules():
        base = module.base_layer if isinstance(module, AdapterLayer) else module
        if name.endswith(".base_layer") or _inside_copy(model, name) or _matches(name, exclude_modules):
            continue
        if _inside(model, name, ExpertsLayer):  # expert layers are chosen by parameter, below
            continue
        if is_grouped_conv(base):
            if target_modules == "all-conv":
                grouped.append(name)
            elif target_modules not in ("all-linear", "all-conv") and _matches(name, target_modules):
                AdapterLayer(base, name)  # raises, saying why
            continue
        if not is_adaptable(base):
            continue
        if target_modules in ("all-linear", "all-conv"):
            wanted = isinstance(base, nn.Conv2d) == (target_modules == "all-conv")
            chosen = wanted and name not in heads and not _within(name, modules_to_save)
        else:
            chosen = _matches(name, target_modules)
        if chosen:
            names.append(name)
    experts, left_out = expert_targets(model, target_modules, target_parameters, exclude_modules, modules_to_save)
    names += experts
    if target_modules == "all-linear":
        _note_left_out(model, heads, left_out)
    if grouped:
        warnings.warn(
            f"all-conv leaves {len(grouped)} grouped/depthwise Conv2d layer(s) alone (e.g. {grouped[0]}): their "
            "weights are separate blocks, not one matrix, so a low-rank update of them is not exact.",
            stacklevel=3,
        )
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_adaptable(m)})
        raise AdapterError(
            f"target_modules={target_modules!r} (target_parameters={target_parameters!r}) matches no "
            "nn.Linear/Conv1D/Conv2d module or expert parameter of this model. "
            f"Its adaptable modules end in: {linear[:30]}. Use some of those names, a regex that fully matches "
            "module paths, 'all-linear' or 'all-conv'."
        )
    return names


def expert_targets(
    model: nn.Module,
    target_modules: str | list[str],
    target_parameters: str | list[str] | None,
    exclude_modules: str | list[str] | None = None,
    modules_to_save: list[str] | None = None,
) -> tuple[list[str], list[str]]:
    """(the expert layers chosen, the fused expert parameters left alone). `target_parameters` None: every fused
    expert parameter under "all-linear" (the experts are most of an MoE model's linear weights), none otherwise;
    "all-experts": every one; a list: those whose path is, or ends in, an entry (PEFT's `target_parameters`
    spelling, e.g. "mlp.experts.gate_up_proj"); another string: a regex fully matching the parameter's path."""
    chosen, left_out = [], []
    for name, module in model.named_modules():
        base = module.base_layer if isinstance(module, ExpertsLayer) else module
        params = expert_parameters(base)
        if not params or name.endswith(".base_layer") or _inside_copy(model, name) or _within(name, modules_to_save):
            continue
        for param in params:
            path = f"{name}.{param}"
            if _matches(name, exclude_modules) or _matches(path, exclude_modules):
                continue
            if target_parameters is None:
                wanted = target_modules == "all-linear"
            elif target_parameters == "all-experts":
                wanted = True
            else:
                wanted = _matches(path, target_parameters)
            if wanted:
                chosen += [f"{path}.{e}" for e in range(getattr(base, param).shape[0])]
            else:
                left_out.append(path)
    return chosen, left_out


def _note_left_out(model: nn.Module, heads: set[str], left_out: list[str]) -> None:
    """One warning naming what "all-linear" did not adapt besides embeddings, norms and the output head: fused
    expert parameters not chosen, and weight matrices of modules of no layer kind (an MoE router)."""
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None or weight.dim() < 2 or isinstance(module, nn.Embedding) or kind_of(module) is not None:
            continue
        if name in heads or name.endswith(".base_layer") or _inside_copy(model, name):
            continue
        left_out.append(f"{name}.weight ({type(module).__name__})")
    if not left_out:
        return
    counts = Counter(re.sub(r"\.\d+\.", ".*.", path) for path in left_out)
    listed = ", ".join(f"{k} ×{n}" if n > 1 else k for k, n in counts.items())
    warnings.warn(
        f"target_modules='all-linear' leaves {len(left_out)} weight(s) unadapted that are no nn.Linear/Conv1D layer: "
        f"{listed}. Fused expert parameters are chosen with target_parameters (a list of names, or 'all-experts'); "
        "a module of no layer kind (e.g. an MoE router) takes no adapter.",
        stacklevel=4,
    )


def expert_dropout_note(names: list[str], dropout: float) -> None:
    """Adapter dropout does not reach expert layers (expert_stack.py says why): said once, where it was asked for."""
    experts = [n for n in names if n.rsplit(".", 1)[-1].isdigit()]
    if dropout > 0 and experts:
        warnings.warn(
            f"dropout={dropout} is not applied to the {len(experts)} expert layers (e.g. {experts[0]}): an expert's "
            "input is internal to the experts module's forward, so it cannot be dropped out for ΔW alone (PEFT's "
            "target_parameters refuses dropout for the same reason). The other layers use it.",
            stacklevel=4,
        )


def _inside_copy(model: nn.Module, name: str) -> bool:
    return _inside(model, name, TrainableCopy)


def _inside(model: nn.Module, name: str, kind: type) -> bool:
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), kind) for i in range(1, len(parts)))


def wrap_expert_stacks(model: nn.Module, names: list[str]) -> list[str]:
    """Give each experts module that `names` has expert layers of (`<module>.<parameter>.<expert>`) its
    ExpertsLayer and the parameter's expert layers, so that those names resolve to modules; returns those names."""
    found = []
    for name in names:
        path, _, param = name.rpartition(".")[0].rpartition(".")
        if not name.rpartition(".")[2].isdigit() or not path:
            continue
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if not isinstance(module, ExpertsLayer):
            if param not in expert_parameters(module):
                continue
            parent, child = _parent(model, path)
            module = ExpertsLayer(module, path)
            setattr(parent, child, module)
        if param in expert_parameters(module.base_layer):
            module.slices(param)
            found.append(name)
    return found


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def wrap_layers(model: nn.Module, names: list[str]) -> dict[str, AdapterLayer]:
    wrap_expert_stacks(model, names)
    layers = {}
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, AdapterLayer):
            parent, child = _parent(model, name)
            module = AdapterLayer(module, name)
            setattr(parent, child, module)
        layers[name] = module
    return layers


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def unwrap_layers(model: nn.Module) -> None:
    for name, stack in list(model.named_modules()):
        if isinstance(stack, ExpertsLayer):
            parent, child = _parent(model, name)
            setattr(parent, child, stack.base_layer)
    for name, layer in list(adapter_layers(model).items()):
        parent, child = _parent(model, name)
        setattr(parent, child, layer.base_layer)
    for name, tc in list(trainable_copies(model).items()):
        parent, child = _parent(model, name)
        setattr(parent, child, tc.original)


class TrainableCopy(nn.Module):
    """A module trained and saved whole (a classification head): one copy per adapter, the original kept."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: str | None = None

    def add(self, adapter: str) -> None:
        if adapter not in self.copies:
            self.copies[adapter] = copy.deepcopy(self.original)
            for p in self.copies[adapter].parameters():
                p.requires_grad_(True)

    def current(self) -> nn.Module:
        return self.copies[self.active] if self.active in self.copies else self.original  # noqa: SIM401

    def forward(self, *args, **kwargs):
        plan = active_plan()
        if plan is None:
            return self.current()(*args, **kwargs)
        return self._mixed_forward(plan.names, *args, **kwargs)

    def _mixed_forward(self, names: list[str], x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """A mixed batch: each row through the copy of its own adapter (the original for the base model's rows and
        for adapters that train no copy of this module)."""
        if x.shape[0] % len(names):
            raise AdapterError(f"a mixed batch names {len(names)} adapters for {x.shape[0]} rows; give one per row.")
        expand = x.shape[0] // len(names)
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            key = name if name in self.copies else ""
            groups.setdefault(key, []).extend(range(i * expand, (i + 1) * expand))
        modules = {key: self.copies[key] if key else self.original for key in groups}
        if len(groups) == 1:
            return modules[next(iter(groups))](x, *args, **kwargs)
        out = None
        for key, rows in groups.items():
            index = torch.tensor(rows, device=x.device)
            part = modules[key](x.index_select(0, index), *args, **kwargs)
            if not isinstance(part, torch.Tensor):
                raise AdapterError(
                    f"a mixed batch over adapters with their own copy of a {type(self.original).__name__} needs it "
                    f"to return a tensor, and it returned {type(part).__name__}: run those adapters in separate "
                    "batches."
                )
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out.index_copy_(0, index, part)
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.current(), name)

    # A container kept whole (an nn.ModuleList of blocks that the model loops over) iterates as its active copy.
    def __iter__(self):
        return iter(self.current())

    def __len__(self) -> int:
        return len(self.current())

    def __bool__(self) -> bool:  # a module is true, as nn.Module is, whatever __len__ would say
        return True

    def __getitem__(self, index):
        return self.current()[index]


def trainable_copies(model: nn.Module) -> dict[str, TrainableCopy]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TrainableCopy)}


def wrap_modules_to_save(model: nn.Module, names: list[str] | None, adapter: str) -> dict[str, TrainableCopy]:
    out: dict[str, TrainableCopy] = {}
    if not names:
        return out
    for name, module in list(model.named_modules()):
        if not _matches(name, names) or _inside_copy(model, name):
            continue
        if not isinstance(module, TrainableCopy):
            parent, child = _parent(model, name)
            tc = TrainableCopy(module)
            setattr(parent, child, tc)
            module = tc
        module.add(adapter)
        out[name] = module
    if not out:
        raise AdapterError(f"modules_to_save={names} matches no module of this model.")
    return out
