"""The layer-kind contract: what nora needs to know about a weight it adapts.

A kind says which modules it takes, how their weight reads as one d × k (out × in) matrix, how a chain of factors
(chain.py's terms) is applied to the layer's input, and how the PEFT export lays the exact LoRA pair out. Merging
writes through the matrix view, so a kind whose view is a view of the stored weight needs nothing more for it.

Adding a kind is one module defining a `LayerKind` plus one line in registry.KINDS.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..chain import Term, terms_add, terms_apply, terms_apply_rows


@dataclass
class PeftEntry:
    """One adapted layer as the PEFT export sees it: its exact pair (B: d × q, A: q × k, the scale folded into B) and
    the method's own tensors (DoRA's magnitude), by PEFT's name suffix."""

    name: str
    module: nn.Module
    B: torch.Tensor
    A: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32  # what the exported tensors are stored as


@dataclass
class PeftPart:
    """What one kind's layers add to a PEFT LoRA directory."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)  # rank_pattern key → rank
    modules: list[str] = field(default_factory=list)  # target_modules entries
    parameters: list[str] = field(default_factory=list)  # target_parameters entries
    fan_in_fan_out: bool = False


class LayerKind(ABC):
    name: ClassVar[str]
    # Whether module adapters of a mixed batch may be evaluated from stacked mirrors of their tensors (rows at once);
    # False: each adapter on its own rows.
    mirrors: ClassVar[bool] = True
    fan_in_fan_out: ClassVar[bool] = False  # PEFT's flag: the stored weight is in × out
    measurable: ClassVar[bool] = True  # whether a forward hook on the module sees its inputs (AwSVD calibration)

    @abstractmethod
    def matches(self, module: nn.Module) -> bool:
        """Whether this kind holds `module`'s weight."""

    def refusal(self, module: nn.Module) -> str | None:
        """Why this module of the kind takes no adapter (None: it does)."""
        return None

    @abstractmethod
    def weight(self, module: nn.Module) -> torch.Tensor:
        """The weight as d × k (out × in): a view of the stored tensor, so that writing to it merges."""

    def to_last(self, out: torch.Tensor) -> torch.Tensor:
        """The layer's output with its output channels last (what `apply` returns and a variant works on)."""
        return out

    def from_last(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def apply(self, module: nn.Module, terms: list[Term], x: torch.Tensor, rows: bool = False) -> torch.Tensor:
        """ΔW applied to the layer's input `x` as the layer applies its weight, channels last. `rows`: the terms'
        cores carry a leading rows axis (each row of a mixed batch its own adapter, chain.terms_apply_rows)."""
        return terms_apply_rows(terms, x) if rows else terms_apply(terms, x)

    def add(self, module: nn.Module, out: torch.Tensor, terms: list[Term], x: torch.Tensor) -> torch.Tensor:
        """out + ΔW x."""
        return out + self.from_last(self.apply(module, terms, x)).to(out.dtype)

    def calibration_input(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The vectors the d × k matrix multiplies, (…, k): what AwSVD measures."""
        return x

    def peft_refusal(self, module: nn.Module) -> str | None:
        """Why PEFT's LoRA of this layer would compute something else (None: it reproduces it)."""
        return None

    def peft_pair(self, module: nn.Module, B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_B.weight, lora_A.weight) as PEFT stores them for this kind."""
        return B, A

    def peft_vector(self, module: nn.Module, t: torch.Tensor) -> torch.Tensor:
        """A per-output-channel tensor (DoRA's magnitude) as PEFT stores it for this kind."""
        return t

    def peft_part(self, entries: list[PeftEntry], prefix: str) -> PeftPart:
        """The PEFT tensors, ranks and targets of this kind's adapted layers (one module each, here)."""
        part = PeftPart(fan_in_fan_out=self.fan_in_fan_out)
        for e in entries:
            B, A = self.peft_pair(e.module, e.B, e.A)
            part.tensors[f"{prefix}{e.name}.lora_A.weight"] = A.to(e.dtype).contiguous()
            part.tensors[f"{prefix}{e.name}.lora_B.weight"] = B.to(e.dtype).contiguous()
            for suffix, t in e.extras.items():
                t = self.peft_vector(e.module, t) if t.dim() == 1 else t
                part.tensors[f"{prefix}{e.name}.{suffix}"] = t.detach().to(e.dtype)
            part.ranks[e.name] = A.shape[0]
            part.modules.append(e.name)
        return part


class MatrixKind(LayerKind):
    """A layer whose output is its weight matrix times the input vectors (plus a bias): Linear-like."""

    def add(self, module: nn.Module, out: torch.Tensor, terms: list[Term], x: torch.Tensor) -> torch.Tensor:
        return terms_add(out, terms, x)
