"""nora: nested low-rank adaptation (NoRA), SVFit and SVD-based adapters for any PyTorch model."""

from .calibrate import calibrate
from .config import AdapterConfig
from .errors import AdapterError
from .export import export_diffusers_lora, export_lora
from .layers import BASE, AdapterLayer
from .loftq import loftq_init
from .methods import DoraConfig, HeadOnlyConfig, LoraConfig, LoraXSConfig, NoraConfig, PissaConfig, SVFitConfig
from .model import AdaptedModel, get_peft_model
from .svd import BASIS_CACHE, SVDSettings

__all__ = [
    "BASE",
    "BASIS_CACHE",
    "AdaptedModel",
    "AdapterConfig",
    "AdapterError",
    "AdapterLayer",
    "DoraConfig",
    "HeadOnlyConfig",
    "LoraConfig",
    "LoraXSConfig",
    "NoraConfig",
    "PissaConfig",
    "SVDSettings",
    "SVFitConfig",
    "calibrate",
    "export_diffusers_lora",
    "export_lora",
    "get_peft_model",
    "loftq_init",
]
