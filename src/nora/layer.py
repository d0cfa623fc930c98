"""The names nora.layer held before layer kinds became the nora.layers package; kept for code that imports them."""

from .layers import (
    BASE,
    AdapterLayer,
    AdapterPlan,
    conv1d_type,
    conv_patches,
    has_own_forward,
    is_adaptable,
    is_grouped_conv,
    oriented_weight,
)

__all__ = [
    "BASE",
    "AdapterLayer",
    "AdapterPlan",
    "conv1d_type",
    "conv_patches",
    "has_own_forward",
    "is_adaptable",
    "is_grouped_conv",
    "oriented_weight",
]
