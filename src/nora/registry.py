"""The method registry: each method's name → its Method, which names its config class (`Method.config_cls`).

It sits below the configs and the methods so that both can look a method up by name (a config read from a file
finds its class here); nora.methods fills it, one `register` line per method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import AdapterError

if TYPE_CHECKING:
    from .methods.base import Method

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make `method` known by its name to every command (`nora train --method NAME`, loading its files, ...)."""
    if method.name != method.config_cls.method:
        raise AdapterError(
            f"{type(method).__name__}.name is {method.name!r} but its config {method.config_cls.__name__} says "
            f"method={method.config_cls.method!r}: a saved adapter names its method by the config's field, so the "
            "two must be equal (leave `name` out of the Method class: it is then the config's)."
        )
    METHODS[method.name] = method
    return method


def get_method(name: object) -> Method:
    """The registered method called `name`, or an AdapterError listing the known ones."""
    if not isinstance(name, str) or name not in METHODS:  # a file's "method" may be any JSON value
        raise AdapterError(
            f"unknown adapter method {name!r}; nora knows {sorted(METHODS)}. If this file came from another "
            "tool (e.g. a PEFT LoRA adapter), load it with that tool."
        )
    return METHODS[name]
