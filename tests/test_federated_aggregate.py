"""nora.federated's aggregation core on real clients: each trains its own adapter a few steps from the global
adapter's initialisation on a tiny float64 Llama, saves it as a nora adapter, and the server aggregates those
files. Where a rule is exact, the global adapter loaded back with nora gives ΔW = Σ p_i ΔW_i (each client's ΔW read
from its own loaded adapter); where it is not, the reported error is the measured one."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FLOAT64_TOL, assert_float_close, tiny_llama

import nora
from nora.errors import AdapterError
from nora.federated import ClientUpdate, aggregate, update_bytes
from nora.methods import get_method

TARGETS = ["q_proj", "v_proj"]
WEIGHTS = [3.0, 1.0, 2.0]


@pytest.fixture(scope="module")
def base():
    return tiny_llama(num_hidden_layers=1).double()


def config_of(method: str, **fields):
    fields = {"target_modules": TARGETS, "svd": "exact", "svd_dtype": "float64", **fields}  # exact: nested bases
    return get_method(method).config_cls(**fields)


def server_of(base, config):
    torch.manual_seed(100)  # every client starts from this same global initialisation
    return nora.get_peft_model(copy.deepcopy(base), config)


def train_client(base, config, seed: int, tmp_path, frozen: tuple[str, ...] = (), steps: int = 2) -> ClientUpdate:
    model = server_of(base, config)
    params = []
    for name, p in model.named_parameters():
        if p.requires_grad and name.rsplit(".", 1)[-1] in frozen:
            p.requires_grad_(False)
        elif p.requires_grad:
            params.append(p)
    opt = torch.optim.Adam(params, lr=0.05)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 6), generator=gen)
        loss = model(input_ids=ids).logits.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    directory = tmp_path / f"client{seed}"
    model.save_pretrained(directory)
    return ClientUpdate.load(directory, name=f"c{seed}")


def delta_weights(base, directory) -> dict[str, torch.Tensor]:
    """Each adapted layer's update as nora computes it for the adapter loaded from `directory`."""
    model = nora.AdaptedModel.from_pretrained(copy.deepcopy(base), directory)
    out = {}
    for lname, layer in model.layers().items():
        core = layer.core("default")
        if core.method.variant is None:
            out[lname] = layer.delta_weight("default")
        else:
            out[lname] = layer.merged_weight(core)[0] - layer.base_weight()
    return out


def expected_and_global(base, clients, result, tmp_path):
    p = torch.tensor(WEIGHTS[: len(clients)], dtype=torch.float64)
    p = p / p.sum()
    deltas = [delta_weights(base, tmp_path / f"client{c.name[1:]}") for c in clients]
    result.save(tmp_path / "global")
    glob = delta_weights(base, tmp_path / "global")
    assert set(glob) == set(deltas[0]) == set(result.errors)
    expected = {n: sum(float(pi) * d[n] for pi, d in zip(p, deltas, strict=True)) for n in glob}
    return expected, glob


def run(base, tmp_path, method, rule, frozen=(), ranks=(None, None, None), server=None, **fields):
    server_fields = {**fields, **(server or {})}
    if any(ranks):
        server_fields["r"] = max(r for r in ranks if r)
    server_model = server_of(base, config_of(method, **server_fields))
    clients = []
    for seed, r in enumerate(ranks, start=1):
        config = config_of(method, **fields, **({"r": r} if r else {}))
        clients.append(train_client(base, config, seed, tmp_path, frozen))
    result = aggregate(server_model, clients, WEIGHTS[: len(clients)], rule=rule)
    return result, *expected_and_global(base, clients, result, tmp_path)


EXACT = [
    ("lora-xs", None, (), {"r": 6}),
    ("svfit", None, (), {"r": 6}),
    ("nora", "product", (), {"r": 8, "inner_r": 8}),  # inner rank = r: the average always fits
    ("nora", "product", (), {"r": 8, "inner_r": 2, "inner_core": "diag", "inner_init": "orthogonal"}),
    ("nora", "frozen-a", ("inner_A",), {"r": 8, "inner_r": 2}),
    ("lora", "ffa", ("lora_A",), {"r": 4}),
    ("lora", "flora", (), {"r": 4}),
    ("pissa", "ffa", ("lora_A",), {"r": 4}),
]


@pytest.mark.parametrize(("method", "rule", "frozen", "fields"), EXACT, ids=[f"{m}-{r}" for m, r, *_ in EXACT])
def test_exact_rules_give_the_weighted_mean_update(base, tmp_path, method, rule, frozen, fields):
    if fields.get("inner_core") == "diag":
        frozen = ("inner_RA", "inner_RB")  # a diag core whose rotations stay shared: the average has rank ≤ r'
    result, expected, glob = run(base, tmp_path, method, rule, frozen, **fields)
    assert result.exact, result.note
    for name in glob:
        assert float(expected[name].norm()) > 1e-6, f"{name}: the clients did not move"
        assert_float_close(glob[name], expected[name], f"{method}/{result.rule} {name}")
        assert result.errors[name] <= FLOAT64_TOL["atol"] * max(1.0, float(expected[name].norm()))


def test_flora_stacks_the_ranks(base, tmp_path):
    result, _, _ = run(base, tmp_path, "lora", "flora", r=4)
    assert result.config.r == 12 and all(info["r"] == 12 for info in result.payload["nora"]["layers"].values())
    assert "Σ r_i" in result.note


INEXACT = [("lora", "fedavg", {"r": 4}), ("pissa", "fedavg", {"r": 4}), ("dora", "fedavg", {"r": 4})]


@pytest.mark.parametrize(("method", "rule", "fields"), INEXACT, ids=[m for m, *_ in INEXACT])
def test_inexact_rules_report_the_measured_error(base, tmp_path, method, rule, fields):
    result, expected, glob = run(base, tmp_path, method, rule, **fields)
    assert not result.exact
    for name in glob:
        measured = float((expected[name] - glob[name]).norm())
        assert measured > 1e-8, f"{name}: FedAvg of factors happened to be exact; the test cannot tell"
        assert result.errors[name] == pytest.approx(measured, rel=1e-8, abs=1e-12)


def test_nora_product_truncation_states_its_error(base, tmp_path):
    """r' = 1 < the rank of the averaged inner core: the re-factor keeps the top singular direction, and the
    error is s·‖the discarded singular values‖ (the outer factors of placement 'none' are orthonormal)."""
    result, expected, glob = run(base, tmp_path, "nora", "product", r=4, inner_r=1)
    assert not result.exact and "truncated" in result.note
    scale = result.config.scale(4)
    for name in glob:
        measured = float((expected[name] - glob[name]).norm())
        assert result.errors[name] == pytest.approx(measured, rel=1e-8)
        core_mean = torch.linalg.svdvals(expected[name] / scale)  # U C̄ Vᵀ: C̄'s singular values
        assert measured == pytest.approx(scale * float(core_mean[1:].norm()), rel=1e-6)


@pytest.mark.parametrize(
    ("method", "rule", "fields"),
    [("lora-xs", None, {"alpha": 16.0}), ("svfit", None, {}), ("nora", "product", {"inner_r": 2})],
    ids=["lora-xs", "svfit", "nora"],
)
def test_heterogeneous_ranks_pad_inside_the_nested_basis(base, tmp_path, method, rule, fields):
    result, expected, glob = run(base, tmp_path, method, rule, ranks=(6, 4, 2), **fields)
    for name in glob:
        if result.exact:
            assert_float_close(glob[name], expected[name], f"{method} {name}")
        else:  # NoRA: r' = 2 of the rank-6 global, and the clients' padded cores may average above it
            assert result.errors[name] == pytest.approx(float((expected[name] - glob[name]).norm()), rel=1e-8)
    if method != "nora":
        assert result.exact


@pytest.mark.parametrize(("inner", "ranks"), [("serial", (6, 4, 2)), ("out", (6, 6, 6))])
def test_nora_product_is_exact_when_the_global_inner_rank_holds_the_average(base, tmp_path, inner, ranks):
    """Clients with r' = 2 each (serial: of ranks 6, 4, 2, padded); the global r' = 6 holds any average of three."""
    result, expected, glob = run(
        base, tmp_path, "nora", "product", ranks=ranks, server={"inner_r": 6}, inner_r=2, inner=inner
    )
    assert result.exact
    for name in glob:
        assert_float_close(glob[name], expected[name], f"nora {name}")


def test_flora_beyond_the_layer_width_is_refused(base, tmp_path):
    config = config_of("lora", r=16)
    clients = [train_client(base, config, seed, tmp_path, steps=1) for seed in (1, 2, 3)]
    with pytest.raises(AdapterError, match="FLoRA stacking gives layer .* rank Σ r_i = 48, above its min\\(d, k\\)"):
        aggregate(server_of(base, config), clients, [1.0, 1.0, 1.0], rule="flora")


@pytest.mark.parametrize("method", ["lora-xs", "head-only"])
def test_modules_to_save_are_averaged(base, tmp_path, method):
    """A module trained whole (here the LM head) aggregates as the weighted mean of its weights: exact in them."""
    fields = {"modules_to_save": ["lm_head"]} | ({"r": 4} if method == "lora-xs" else {"target_modules": []})
    clients = [train_client(base, config_of(method, **fields), seed, tmp_path) for seed in (1, 2)]
    result = aggregate(server_of(base, config_of(method, **fields)), clients, [3.0, 1.0])
    heads = [k for k in result.state if k.startswith("modules_to_save.")]
    assert heads and result.exact
    for key in heads:
        assert not torch.equal(clients[0].tensors[key], clients[1].tensors[key])
        assert_float_close(result.state[key], 0.75 * clients[0].tensors[key] + 0.25 * clients[1].tensors[key])
    result.save(tmp_path / "global")
    loaded = nora.AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path / "global")
    ids = torch.randint(0, 64, (1, 5))
    assert torch.isfinite(loaded(input_ids=ids).logits).all()


def test_nora_out_refuses_heterogeneous_ranks(base, tmp_path):
    server = server_of(base, config_of("nora", r=6, inner_r=2, inner="out"))
    client = train_client(base, config_of("nora", r=4, inner_r=2, inner="out"), 1, tmp_path)
    with pytest.raises(AdapterError, match="inner='out' needs equal ranks"):
        aggregate(server, [client], [1.0], rule="product")


def test_rank_above_the_global_one_is_refused(base, tmp_path):
    server = server_of(base, config_of("lora-xs", r=2))
    client = train_client(base, config_of("lora-xs", r=4), 1, tmp_path)
    with pytest.raises(AdapterError, match="above the global adapter's 2"):
        aggregate(server, [client], [1.0])


def test_a_client_on_another_base_is_refused_by_name(base, tmp_path):
    config = config_of("lora-xs", r=4)
    good = train_client(base, config, 1, tmp_path)
    other = tiny_llama(seed=7, num_hidden_layers=1).double()
    stranger = train_client(other, config, 2, tmp_path)
    with pytest.raises(AdapterError, match="client 'c2' was trained on another basis"):
        aggregate(server_of(base, config), [good, stranger], [1.0, 1.0])


def test_other_svd_settings_are_refused(base, tmp_path):
    client = train_client(base, config_of("lora-xs", r=4, svd_dtype="float32"), 1, tmp_path)
    with pytest.raises(AdapterError, match="client 'c1'.*differs from the global one in \\['svd_dtype'\\]"):
        aggregate(server_of(base, config_of("lora-xs", r=4)), [client], [1.0])


@pytest.mark.parametrize("method", ["lora", "nora", "pissa", "dora"])
def test_a_method_needing_a_choice_names_the_rules(base, method):
    server = server_of(base, config_of(method, r=4))
    with pytest.raises(AdapterError, match="cannot be aggregated exactly without a choice of rule: give rule="):
        aggregate(server, [], [])  # refused before the client list is even looked at


def test_bad_inputs_are_refused(base, tmp_path):
    config = config_of("lora-xs", r=4)
    server = server_of(base, config)
    a, b = train_client(base, config, 1, tmp_path), train_client(base, config, 2, tmp_path)
    with pytest.raises(AdapterError, match="no client updates"):
        aggregate(server, [], [])
    with pytest.raises(AdapterError, match="client 'c2' has weight 0"):
        aggregate(server, [a, b], [1.0, 0])
    with pytest.raises(AdapterError, match="client 'c1' has weight -1"):
        aggregate(server, [a, b], [-1.0, 1.0])
    with pytest.raises(AdapterError, match="2 clients"):
        aggregate(server, [a, b], [1.0])
    with pytest.raises(AdapterError, match="rule 'ffa' does not aggregate lora-xs"):
        aggregate(server, [a], [1.0], rule="ffa")
    key = next(k for k in b.tensors if k.endswith(".core"))
    nan = copy.deepcopy(b)
    nan.tensors[key] = nan.tensors[key].clone().fill_(float("nan"))
    with pytest.raises(AdapterError, match=f"client 'c2': tensor {key} holds NaN"):
        aggregate(server, [a, nan], [1.0, 1.0])
    short = copy.deepcopy(b)
    layer = next(iter(short.layers))
    del short.meta["layers"][layer]
    with pytest.raises(AdapterError, match=f"client 'c2' has no update for layer '{layer}'"):
        aggregate(server, [a, short], [1.0, 1.0])
    lora = train_client(base, config_of("lora", r=4), 3, tmp_path)
    with pytest.raises(AdapterError, match="client 'c3' sent a lora adapter"):
        aggregate(server, [a, lora], [1.0, 1.0])
    bent = copy.deepcopy(b)
    bent.tensors[key] = bent.tensors[key][:, :2]
    with pytest.raises(AdapterError, match=f"client 'c2': tensor {key} is \\[4, 2\\], expected \\[4, 4\\]"):
        aggregate(server, [a, bent], [1.0, 1.0])


def test_frozen_rules_refuse_clients_whose_frozen_factor_moved(base, tmp_path):
    config = config_of("lora", r=4)
    a = train_client(base, config, 1, tmp_path, frozen=("lora_A",))
    b = train_client(base, config, 2, tmp_path)  # trained A too
    with pytest.raises(AdapterError, match="lora_A of client 'c2' differs from that of client 'c1'"):
        aggregate(server_of(base, config), [a, b], [1.0, 1.0], rule="ffa")
    with pytest.raises(AdapterError, match="rule 'ffa' needs equal ranks"):
        aggregate(server_of(base, config_of("lora", r=6)), [a], [1.0], rule="ffa")


def test_update_bytes_counts_what_a_client_sends(base, tmp_path):
    client = train_client(base, config_of("lora", r=4), 1, tmp_path)
    b_bytes = sum(t.numel() * 8 for k, t in client.tensors.items() if k.endswith("lora_B"))
    a_bytes = sum(t.numel() * 8 for k, t in client.tensors.items() if k.endswith("lora_A"))
    assert update_bytes(client.tensors, "ffa", method="lora") == b_bytes
    assert update_bytes(client.tensors, "fedavg", method="lora") == a_bytes + b_bytes
    xs = train_client(base, config_of("lora-xs", r=4), 2, tmp_path)
    loaded = nora.AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path / "client2", is_trainable=True)
    in_memory = ClientUpdate.of_model(loaded, name="c2")  # the same update, read from a client's model
    assert in_memory.tensors.keys() == xs.tensors.keys() and in_memory.meta["layers"] == xs.meta["layers"]
    result = aggregate(server_of(base, config_of("lora-xs", r=4)), [in_memory], [1.0])
    assert result.bytes == {"c2": 2 * 4 * 4 * 8}  # two layers, one 4×4 float64 core each
    assert_float_close(result.state[next(iter(xs.tensors))], xs.tensors[next(iter(xs.tensors))])
