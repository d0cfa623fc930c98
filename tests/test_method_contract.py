"""The method registry and the parts of the Method contract that the layer does not exercise by itself: one
registry (each method's config class known through it), and the shapes a method states without initialising."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import nora
from nora.config import AdapterConfig
from nora.errors import AdapterError
from nora.layer import AdapterLayer
from nora.methods import METHODS, LoraConfig, register
from nora.methods.lora import LoRA

CONFIGS = [
    nora.LoraConfig(r=3),
    nora.PissaConfig(r=3),
    nora.DoraConfig(r=3),
    nora.LoraXSConfig(r=3),
    nora.NoraConfig(r=4),
    nora.NoraConfig(r=4, inner_core="diag"),
    nora.NoraConfig(r=4, inner="out", inner_r=2),
    nora.SVFitConfig(r=3),
    nora.HeadOnlyConfig(modules_to_save=["head"]),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-{getattr(c, 'inner_core', '')}")
@torch.no_grad()
def test_param_shapes_are_those_init_params_makes_in_its_order(config):
    layer = AdapterLayer(nn.Linear(7, 5).double())
    method = METHODS[config.method]
    core = layer.add_adapter("a", config, method)
    made = {name: tuple(p.shape) for name, p in core.params.items()}
    stated = method.param_shapes(config, layer.base_weight(), layer.basis_of(core), core.r)
    assert list(stated.items()) == list(made.items())


def test_a_saved_config_is_read_back_as_its_methods_config_class():
    assert {c.method for c in CONFIGS} == set(METHODS)
    for name, method in METHODS.items():
        assert method.name == name == method.config_cls.method
    for config in CONFIGS:
        read = AdapterConfig.from_dict(config.to_dict())
        assert type(read) is METHODS[config.method].config_cls and read == config


def test_a_method_whose_name_disagrees_with_its_config_is_refused():
    @dataclass
    class OtherConfig(LoraConfig):
        method = "other-test"

    class Misnamed(LoRA):
        name = "misnamed-test"
        config_cls = OtherConfig

    with pytest.raises(AdapterError, match="must be equal"):
        register(Misnamed())
    assert "misnamed-test" not in METHODS and "other-test" not in METHODS

    class Named(LoRA):  # no name of its own: it is the config's
        config_cls = OtherConfig

    assert Named.name == "other-test"


def test_an_unknown_method_is_refused_naming_the_known_ones():
    with pytest.raises(AdapterError, match=r"unknown adapter method 'nope'; nora knows \['dora'"):
        AdapterConfig.from_dict({"method": "nope"})
