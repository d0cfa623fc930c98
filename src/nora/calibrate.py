"""Activation-aware SVD (AwSVD): per-input-channel scales a_j = mean_tokens |x_j| ^ p from calibration batches (for
a Conv2d, per column of its kernel matrix: the mean over input patches)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .errors import AdapterError
from .inject import find_targets
from .layers import AdapterLayer, kind_of


def _measurable(module: nn.Module) -> bool:
    base = module.base_layer if isinstance(module, AdapterLayer) else module
    kind = kind_of(base)
    return kind is not None and kind.measurable


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable,
    target_modules: str | list[str] = "all-linear",
    power: float = 1.0,
    eps: float = 1e-6,
    max_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """Run `batches` (dicts of model kwargs, or input tensors) through `model`; return each target layer's
    input-channel scales. `target_modules` is a config-style selector or an explicit list of module names."""
    modules = dict(model.named_modules())
    listed = isinstance(target_modules, list) and all(
        n in modules or n.rpartition(".")[2].isdigit() for n in target_modules
    )
    names = target_modules if listed else find_targets(model, target_modules)
    experts = [n for n in names if n not in modules or not _measurable(modules[n])]
    if experts:
        raise AdapterError(
            f"activation-aware SVD (awsvd=True) measures each layer's inputs, and an expert's ({experts[0]}) are "
            "internal to its experts module (they depend on routing): use awsvd=False, or leave the experts out "
            "with target_parameters=[]."
        )
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)
    hooks = []

    def hook(name: str):
        def fn(module, args, kwargs=None):
            x = kind_of(module).calibration_input(module, args[0].detach())  # a Conv2d's: its patches
            flat = x.reshape(-1, x.shape[-1]).abs().to(torch.float64)
            sums[name] = sums.get(name, 0) + flat.sum(0)
            counts[name] += flat.shape[0]

        return fn

    for name in names:
        module = model.get_submodule(name)
        target = module.base_layer if isinstance(module, AdapterLayer) else module
        hooks.append(target.register_forward_pre_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            if isinstance(batch, Mapping):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                model(batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    missing = [n for n in names if counts[n] == 0]
    if missing:
        raise AdapterError(
            f"calibration data never reached {missing[:5]}; pass batches the model consumes "
            "(dicts of model inputs or input tensors)."
        )
    return {n: (sums[n] / counts[n]).pow(power).clamp_min(eps).float() for n in names}
