"""ExpertsLayer: an experts module whose fused expert parameters carry adapters, one AdapterLayer per expert
(experts.py). It runs the experts module's own forward (routing, activation, biases, whichever transformers
experts implementation the model uses) with each adapted parameter swapped for W_e + ΔW_e, so the update is exact
whatever the family's layout. A mixed batch (adapter_names=) runs each adapter's rows through the experts with its
own weights: the experts module sees tokens, each row's tokens consecutive (the MoE block flattens batch × seq).

Adapter dropout is not applied inside an expert stack: the input of one expert's matrix is internal to the experts
module's forward, so x cannot be dropped out for ΔW alone (PEFT's ParamWrapper refuses dropout for that reason).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterError
from ..slots import active_plan
from .adapter import BASE, AdapterLayer
from .experts import ExpertSlice, expert_count, expert_parameters


class ExpertsLayer(nn.Module):
    def __init__(self, experts: nn.Module, name: str) -> None:
        super().__init__()
        self.base_layer = experts
        self.module_name = name
        self.params: list[str] = []  # the parameters with expert layers, each a child ModuleList of that name

    def slices(self, param: str) -> nn.ModuleList:
        """The AdapterLayers of parameter `param`'s experts (made on first use): child `param`, so expert e of
        `experts.gate_up_proj` is the layer `experts.gate_up_proj.e`."""
        if param not in self.params:
            if param not in expert_parameters(self.base_layer):
                raise AdapterError(
                    f"{self.module_name}.{param} is not a fused expert parameter of this "
                    f"{type(self.base_layer).__name__}; it has {expert_parameters(self.base_layer)}."
                )
            count = expert_count(self.base_layer)
            layers = [AdapterLayer(ExpertSlice(self.base_layer, param, e), f"{self.module_name}.{param}.{e}")
                      for e in range(count)]  # fmt: skip
            self._modules[param] = nn.ModuleList(layers)  # add_module would see the base's parameter of that name
            self.params.append(param)
        return self._modules[param]  # type: ignore[return-value]

    def _weights(self, names: list[str] | None) -> dict[str, torch.Tensor]:
        """Each adapted parameter with the adapters `names` (None: each layer's active ones) folded into every
        expert, differentiably; parameters no such adapter touches are left out."""
        swapped: dict[str, torch.Tensor] = {}
        for param in self.params:
            layers: list[AdapterLayer] = list(self.slices(param))
            if any(layer.disabled for layer in layers):
                continue
            experts = []
            touched = False
            for layer in layers:
                W = layer.base_weight()
                for name in layer.active_adapters if names is None else names:
                    if name in layer.adapters and name not in layer.merged_adapters:
                        W = layer.adapted_weight(layer.adapters[name], W)
                        touched = True
                experts.append(layer.base_layer.stored(W))
            if touched:
                swapped[param] = torch.stack(experts)
        return swapped

    def _run(self, swapped: dict[str, torch.Tensor], *args, **kwargs):
        if not swapped:
            return self.base_layer(*args, **kwargs)
        return torch.func.functional_call(self.base_layer, swapped, args, kwargs, tie_weights=False, strict=False)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        plan = active_plan()
        if plan is None:
            return self._run(self._weights(None), hidden_states, *args, **kwargs)
        merged = sorted({n for p in self.params for layer in self.slices(p) for n in layer.merged_adapters})
        if merged:
            raise AdapterError(f"adapter_names= needs unmerged adapters ({merged} are merged); call unmerge() first.")
        tokens = hidden_states.shape[0]
        if tokens % len(plan.names):
            raise AdapterError(f"adapter_names has {len(plan.names)} entries for a batch of {tokens} tokens.")
        expand = tokens // len(plan.names)
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(plan.names):
            groups.setdefault(name, []).extend(range(i * expand, (i + 1) * expand))
        out = None
        for name, rows in groups.items():
            index = torch.tensor(rows, device=hidden_states.device)

            def pick(t, index=index):
                return t.index_select(0, index) if isinstance(t, torch.Tensor) and t.shape[:1] == (tokens,) else t

            swapped = {} if name == BASE else self._weights([name])
            part = self._run(swapped, pick(hidden_states), *map(pick, args), **{k: pick(v) for k, v in kwargs.items()})
            if out is None:
                out = part.new_zeros((tokens, *part.shape[1:]))
            out = out.index_copy(0, index, part)
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_layer, name)

    def extra_repr(self) -> str:
        return f"adapted={self.params}"


def expert_stacks(model: nn.Module) -> dict[str, ExpertsLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertsLayer)}
