"""A client's update as the server receives it: the adapter's config, its tensors and nora's per-layer metadata,
exactly as nora saves an adapter (adapter_config.json + adapter_model.safetensors)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..config import AdapterConfig
from ..io import read_adapter
from ..state import adapter_payload

if TYPE_CHECKING:
    from ..model import AdaptedModel


@dataclass
class ClientUpdate:
    """One client's adapter: `meta` is the "nora" object of its adapter_config.json (per layer: r, shape,
    fingerprint, weight digest); `name` is how errors refer to the client."""

    name: str
    config: AdapterConfig
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @classmethod
    def load(cls, directory: str | os.PathLike, name: str | None = None) -> ClientUpdate:
        """The adapter saved in `directory` (read and checked as every nora load is)."""
        config, tensors, meta = read_adapter(directory)
        return cls(name or str(directory), config, tensors, meta)

    @classmethod
    def of_model(cls, model: AdaptedModel, adapter_name: str = "default", name: str | None = None) -> ClientUpdate:
        """Adapter `adapter_name` of a client's model, as it would be saved."""
        tensors, payload = adapter_payload(model, adapter_name)
        meta = payload.pop("nora")
        return cls(name or adapter_name, AdapterConfig.from_dict(payload), dict(tensors), meta)

    @property
    def layers(self) -> dict[str, dict[str, Any]]:
        return self.meta.get("layers", {})
