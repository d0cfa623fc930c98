"""The method registry: name → implementation."""

from __future__ import annotations

from ..errors import AdapterError
from .base import AdapterCore, Core, CoreView, Method, Variant
from .dora import DoRA, DoraConfig
from .head_only import HeadOnly, HeadOnlyConfig
from .lora import LoRA, LoraConfig
from .lora_xs import LoRAXS, LoraXSConfig
from .nora import NoRA, NoraConfig
from .pissa import PiSSA, PissaConfig
from .svfit import SVFit, SVFitConfig

METHODS: dict[str, Method] = {m.name: m for m in (LoRA(), PiSSA(), DoRA(), LoRAXS(), NoRA(), SVFit(), HeadOnly())}


def get_method(name: str | None) -> Method:
    if not isinstance(name, str) or name not in METHODS:  # a file's "method" may be any JSON value
        raise AdapterError(
            f"unknown adapter method {name!r}; nora knows {sorted(METHODS)}. If this file came from another "
            "tool (e.g. a PEFT LoRA adapter), load it with that tool."
        )
    return METHODS[name]


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
]
