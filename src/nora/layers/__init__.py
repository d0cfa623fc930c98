"""Layer kinds as plug-ins: the contract (kind.py), one module per kind, the registry, and AdapterLayer, which
holds the adapters of one weight and asks its kind."""

from .adapter import BASE, AdapterLayer, AdapterPlan, oriented_weight
from .conv1d import conv1d_type
from .conv2d import conv_patches, has_own_forward, is_grouped_conv
from .expert_stack import ExpertsLayer, expert_stacks
from .experts import ExpertSlice, expert_parameters
from .kind import LayerKind, MatrixKind, PeftEntry, PeftPart
from .registry import KINDS, is_adaptable, kind_of
from .updates import update_of

__all__ = [
    "BASE",
    "KINDS",
    "AdapterLayer",
    "AdapterPlan",
    "ExpertSlice",
    "ExpertsLayer",
    "LayerKind",
    "MatrixKind",
    "PeftEntry",
    "PeftPart",
    "conv1d_type",
    "conv_patches",
    "expert_parameters",
    "expert_stacks",
    "has_own_forward",
    "is_adaptable",
    "is_grouped_conv",
    "kind_of",
    "oriented_weight",
    "update_of",
]
