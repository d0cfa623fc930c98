"""Clients of lower rank than the global adapter (nora.federated.ranks) on a tiny float64 Llama: a rank-r client
starts from the global adapter's leading block and its widened reply is the global update with its trained block in
place, so the mean over widened replies is exactly the mean of those updates (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_float_close, tiny_llama

import nora
from nora.federated import ClientUpdate, aggregate
from nora.federated.ranks import narrow, widen
from nora.methods import get_method
from nora.state import adapter_payload, apply_tensors

R = 4
CASES = [("lora-xs", {"alpha": 2.0}), ("lora-xs", {"use_rslora": True}), ("svfit", {})]  # scales that vary with r


@pytest.fixture(scope="module")
def base():
    return tiny_llama(num_hidden_layers=1).double()


def model_at(base, method: str, r: int, fields: dict):
    config = get_method(method).config_cls(target_modules=["q_proj", "v_proj"], svd="exact", svd_dtype="float64",
                                           r=r, **fields)  # fmt: skip
    return nora.get_peft_model(copy.deepcopy(base), config)


def deltas(model) -> dict[str, torch.Tensor]:
    return {n: layer.delta_weight("default") for n, layer in model.layers().items()}


def trained(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in state.items()}


@pytest.mark.parametrize("method,fields", CASES)
def test_a_lower_rank_client_starts_from_the_global_block_and_widens_to_it_plus_its_change(base, method, fields):
    server = model_at(base, method, R, fields)
    apply_tensors(server, "default", trained(adapter_payload(server, "default")[0], 0), "global")
    G = adapter_payload(server, "default")[0]
    config = server.peft_config["default"]
    for key, t in widen(narrow(G, method, config, 2), G, method, config).items():
        assert_float_close(t, G[key], key)  # an untrained client widens back to the global adapter

    client = model_at(base, method, 2, fields)
    apply_tensors(client, "default", narrow(G, method, config, 2), "narrowed")
    U = {n: layer.basis_of(layer.core("default")) for n, layer in server.layers().items()}
    for n, d in deltas(client).items():  # the client's start: the global update seen through its top-2 basis
        core = server.layers()[n].core("default")
        if method == "lora-xs":
            block = core.scale * U[n].B[:, :2] @ core.params["core"][:2, :2] @ U[n].A[:2]
        else:
            block = U[n].B[:, :2] @ torch.diag(core.params["sigma"][:2] - U[n].S[:2]) @ U[n].A[:2]
        assert_float_close(d, block)
    start = deltas(client)
    apply_tensors(client, "default", trained(adapter_payload(client, "default")[0], 1), "trained")
    change = {n: d - start[n] for n, d in deltas(client).items()}

    widened = copy.deepcopy(server)
    apply_tensors(widened, "default", widen(adapter_payload(client, "default")[0], G, method, config), "widened")
    glob = deltas(server)
    for n, d in deltas(widened).items():
        assert_float_close(d, glob[n] + change[n])


@pytest.mark.parametrize("method,fields", CASES[::2])
def test_the_mean_of_widened_replies_is_exactly_the_mean_of_their_updates(base, method, fields):
    server = model_at(base, method, R, fields)
    G = adapter_payload(server, "default")[0]
    config = server.peft_config["default"]
    meta = adapter_payload(server, "default")[1]["nora"]
    updates, expected = [], []
    for i, r in enumerate([1, 2, R]):
        client = model_at(base, method, r, fields)
        apply_tensors(client, "default", narrow(G, method, config, r), "narrowed")
        apply_tensors(client, "default", trained(adapter_payload(client, "default")[0], i), "trained")
        full = widen(adapter_payload(client, "default")[0], G, method, config)
        updates.append(ClientUpdate(f"c{i}", config, full, meta))
        as_global = copy.deepcopy(server)
        apply_tensors(as_global, "default", full, "widened")
        expected.append(deltas(as_global))
    result = aggregate(server, updates, [3.0, 1.0, 2.0])
    assert result.exact
    apply_tensors(server, "default", result.state, "aggregated")
    for n, d in deltas(server).items():
        assert_float_close(d, (3 * expected[0][n] + expected[1][n] + 2 * expected[2][n]) / 6)
