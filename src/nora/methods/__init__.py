"""The methods nora ships, each registered by name (nora.registry: one line per method)."""

from __future__ import annotations

from ..registry import METHODS, get_method, register
from .base import AdapterCore, Core, CoreView, Method, Variant
from .dora import DoRA, DoraConfig
from .head_only import HeadOnly, HeadOnlyConfig
from .lora import LoRA, LoraConfig
from .lora_xs import LoRAXS, LoraXSConfig
from .nora import NoRA, NoraConfig
from .pissa import PiSSA, PissaConfig
from .svfit import SVFit, SVFitConfig

register(LoRA())
register(PiSSA())
register(DoRA())
register(LoRAXS())
register(NoRA())
register(SVFit())
register(HeadOnly())

__all__ = [
    "METHODS",
    "AdapterCore",
    "Core",
    "CoreView",
    "DoraConfig",
    "HeadOnlyConfig",
    "LoraConfig",
    "LoraXSConfig",
    "Method",
    "NoraConfig",
    "PissaConfig",
    "SVFitConfig",
    "Variant",
    "get_method",
    "register",
]
