"""Fused MoE expert stacks: a 3-D parameter of an experts module (transformers 5's Qwen3-MoE, Mixtral, gpt-oss,
DeepSeek-style models: `experts.gate_up_proj` E × 2I × H, `experts.down_proj` E × H × I; gpt-oss stores them
transposed, E × H × 2I, which its experts module says with `is_transposed`) seen as E matrices, one per expert.

Each expert's matrix is one `ExpertSlice`, and each slice is an ordinary AdapterLayer of this kind: every method
applies per expert (its SVD, NoRA's outer basis and inner core, per expert), and planning, files, merging and
resident bookkeeping need nothing new. The experts module itself runs its own forward with W_e + ΔW_e swapped in
(expert_stack.ExpertsLayer), so routing is the model's own. The router (a TopKRouter, not an nn.Linear) is left
alone.

PEFT's export of such a parameter (`target_parameters`, its ParamWrapper) is per expert too: lora_A.weight is
(E·r) × in with expert e's A in rows e·r … e·r + r − 1, lora_B.weight is out × (r·E) with expert e's B in columns
e, E + e, 2E + e, …; several parameters of one module nest, the first registered innermost (`…base_layer.lora_A`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterError
from .kind import MatrixKind, PeftEntry, PeftPart


def expert_count(module: nn.Module) -> int | None:
    count = getattr(module, "num_experts", None)
    if count is None:
        count = getattr(module, "num_local_experts", None)
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None


def expert_parameters(module: nn.Module) -> list[str]:
    """The fused expert parameters an experts module holds itself (3-D, one matrix per expert), in registration
    order; [] for any other module."""
    count = expert_count(module)
    if count is None:
        return []
    return [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3 and p.shape[0] == count]


class ExpertSlice(nn.Module):
    """Expert `index` of the fused parameter `param` of an experts module: what one AdapterLayer of the expert kind
    wraps. It refers to the experts module without holding it as a child (the model holds it once)."""

    def __init__(self, experts: nn.Module, param: str, index: int) -> None:
        super().__init__()
        self.__dict__["experts"] = experts  # not a submodule
        self.param = param
        self.index = index
        self.transposed = bool(getattr(experts, "is_transposed", False))  # stored in × out (gpt-oss)
        self.bias = None

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.experts, self.param)[self.index]

    def matrix(self) -> torch.Tensor:
        """The expert's weight as d × k (out × in), a view of the stored parameter."""
        return self.weight.T if self.transposed else self.weight

    def stored(self, matrix: torch.Tensor) -> torch.Tensor:
        """A d × k matrix in the parameter's own layout."""
        return matrix.T if self.transposed else matrix

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the expert's matrix alone, as a Linear without bias
        return nn.functional.linear(x, self.matrix())

    def extra_repr(self) -> str:
        return f"{self.param}[{self.index}]"


class ExpertSliceKind(MatrixKind):
    name = "expert"
    mirrors = False
    measurable = False  # an expert's input is internal to the experts module's forward

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, ExpertSlice)

    def weight(self, module: nn.Module) -> torch.Tensor:
        return module.matrix()

    def peft_part(self, entries: list[PeftEntry], prefix: str) -> PeftPart:
        """Each parameter's experts in PEFT's ParamWrapper layout (the module docstring), keyed as PEFT nests
        several parameters of one module; ranks padded with zeros to the widest expert of the parameter."""
        with_extras = [e.name for e in entries if e.extras]
        if with_extras:
            raise AdapterError(
                f"the adapter has tensors besides B and A on expert stacks ({with_extras[0]}, e.g. DoRA's magnitude): "
                "PEFT's target_parameters LoRA (ParamWrapper) refuses use_dora, so its format has no place for a "
                "per-expert magnitude. Merge the adapter instead (merge_and_unload), or leave the experts out "
                "(target_parameters=[])."
            )
        groups: dict[tuple[str, str], list[PeftEntry]] = {}
        for e in entries:
            groups.setdefault((e.name.rsplit(".", 2)[0], e.module.param), []).append(e)
        part = PeftPart()
        for (path, param), group in groups.items():
            experts = group[0].module.experts
            order = [p for p in expert_parameters(experts) if (path, p) in groups]
            depth = len(order) - 1 - order.index(param)
            count = expert_count(experts)
            q = max(e.A.shape[0] for e in group)
            d, k = group[0].B.shape[0], group[0].A.shape[1]
            A = torch.zeros(count, q, k, dtype=torch.float64)
            B = torch.zeros(count, d, q, dtype=torch.float64)
            for e in group:
                A[e.module.index, : e.A.shape[0]] = e.A
                B[e.module.index, :, : e.B.shape[1]] = e.B
            key, dtype = f"{prefix}{path}." + "base_layer." * depth, group[0].dtype
            part.tensors[key + "lora_A.weight"] = A.reshape(count * q, k).to(dtype).contiguous()
            part.tensors[key + "lora_B.weight"] = B.permute(1, 2, 0).reshape(d, q * count).to(dtype).contiguous()
            part.ranks[f"{path}.{param}"] = q
            part.parameters.append(f"{path}.{param}")
        return part
