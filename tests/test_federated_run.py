"""Whole federated runs: Flower's simulation runtime end to end on the real MiniLM encoder (3 clients, 2 rounds), the
same history from the inline runtime (the clients' bases agree across processes), kill-and-resume, central DP with
ε, and every bad input refused before training."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, char_tokenizer
from test_bad_input import refused
from typer.testing import CliRunner

from nora.cli import app
from nora.federated import FederatedConfig, FederatedError, federate
from nora.federated.coordinator import train_client
from nora.io import read_adapter
from nora.training.config import TrainConfig

bad_input = pytest.mark.bad_input
GOOD, BAD = ["great", "lovely", "superb", "fine"], ["awful", "boring", "dull", "bad"]


def reviews(n: int, seed: int, labels=("pos", "neg")) -> list[dict]:
    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rnd.choice(labels)
        rows.append({"text": f"the film was {rnd.choice(GOOD if label == 'pos' else BAD)} .", "label": label})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> Path:
    """A tiny BERT classifier with a real (small) tokenizer, saved as a model directory."""
    from transformers import BertConfig, BertForSequenceClassification

    directory = tmp_path_factory.mktemp("base") / "bert"
    tokenizer = char_tokenizer(directory)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    BertForSequenceClassification(cfg).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"train": write_csv(root / "train.csv", reviews(96, 1)), "dev": write_csv(root / "dev.csv", reviews(40, 2))}


def config(model: Path, data: dict[str, Path], out: Path, method: str = "lora-xs", **fed) -> FederatedConfig:
    train = TrainConfig(model=str(model), task="seq-cls", data=str(data["train"]), eval_data=str(data["dev"]),
                        method=method, max_length=16, batch_size=8, learning_rate=1e-2, lr_scheduler="constant",
                        progress=False, adapter={"r": 4})  # fmt: skip
    return FederatedConfig(train=train, **{"clients": 3, "rounds": 2, "local_steps": 2, "output_dir": str(out), **fed})


def numbers(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if isinstance(v, float) and k != "server_s"} for h in history]


def test_flower_simulation_matches_the_inline_runtime_and_saves_ordinary_adapters(tiny_classifier, data, tmp_path):
    """3 clients, 2 rounds on Flower's simulation runtime (a ClientApp per process): each client process builds
    its own model and SVD basis, checks the server's fingerprint, trains; the server aggregates exactly. The inline
    runtime (one process) gives the same history, so the clients' bases agree with the server's across processes."""
    flower = federate(config(tiny_classifier, data, tmp_path / "flower", method="nora", rule="frozen-a"), "flower")
    inline = federate(config(tiny_classifier, data, tmp_path / "inline", method="nora", rule="frozen-a"), "inline")
    assert [h["round"] for h in flower.history] == [0, 1, 2]
    assert flower.history[2]["clients"] == ["client-0", "client-1", "client-2"]
    for a, b in zip(numbers(flower.history), numbers(inline.history), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    assert all(h["exact"] and h["bytes_up"] > 0 and h["aggregation_error"] < 1e-4 for h in flower.history[1:])
    # every round's global adapter is an ordinary nora adapter with its head record; the last one is adapter/
    config_, tensors, meta = read_adapter(flower.run_dir / "round-0002")
    assert config_.method == "nora" and meta["head"] == {"task": "seq-cls", "labels": ["neg", "pos"]}
    _, last, _ = read_adapter(flower.adapter_dir)
    assert all(torch.equal(last[k], tensors[k]) for k in tensors)
    _, first, _ = read_adapter(flower.run_dir / "round-0001")
    assert any(not torch.equal(first[k], tensors[k]) for k in tensors if k.endswith("inner_B"))  # round 2 trained
    logged = [json.loads(line) for line in (flower.run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [h["round"] for h in logged] == [0, 1, 2]


def test_clients_of_lower_rank_train_their_block_and_aggregate_exactly_under_both_runtimes(tiny_classifier, data,
                                                                                           tmp_path):  # fmt: skip
    """Client 0 at rank 2 of the global 4: it receives and sends 2×2 cores (fewer bytes), the server widens its
    reply into the global core, the mean stays exact, and a Flower client process builds its rank-2 model itself."""
    ranked = {"method": "lora-xs", "rounds": 1, "client_ranks": [2, 4, 4]}
    flower = federate(config(tiny_classifier, data, tmp_path / "flower", **ranked), "flower")
    inline = federate(config(tiny_classifier, data, tmp_path / "inline", **ranked), "inline")
    for a, b in zip(numbers(flower.history), numbers(inline.history), strict=True):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    even = federate(config(tiny_classifier, data, tmp_path / "even", method="lora-xs", rounds=1), "inline")
    line, full = inline.history[1], even.history[1]
    assert line["exact"] and line["aggregation_error"] < 1e-4
    cores = full["bytes_up"] - line["bytes_up"]  # client 0 sent 2×2 instead of 4×4 cores: 12 floats a layer fewer
    assert cores > 0 and cores % (12 * 4) == 0 and line["bytes_down"] == full["bytes_down"] - cores
    config_, tensors, _ = read_adapter(inline.adapter_dir)
    assert config_.r == 4 and all(t.shape == (4, 4) for k, t in tensors.items() if k.endswith(".core"))


@pytest.mark.parametrize("method,rule", [("lora-xs", None), ("svfit", None), ("nora", "frozen-a"), ("lora", "ffa"),
                                         ("lora", "fedavg")])  # fmt: skip
def test_each_rule_runs_and_reports_whether_it_was_exact(tiny_classifier, data, tmp_path, method, rule):
    result = federate(config(tiny_classifier, data, tmp_path / "run", method=method, rule=rule), "inline")
    for h in result.history[1:]:
        assert h["rule"] == (rule or "mean") and h["exact"] == (rule != "fedavg")
        if h["exact"]:
            assert h["aggregation_error"] < 1e-4
    if rule == "fedavg":
        assert result.history[2]["aggregation_error"] > 0  # mean(B)·mean(A) ≠ mean(B·A), once A has moved


def test_frozen_factors_never_travel_and_stay_the_servers(tiny_classifier, data, tmp_path):
    result = federate(config(tiny_classifier, data, tmp_path / "run", method="lora", rule="ffa"), "inline")
    _, first, _ = read_adapter(result.run_dir / "round-0001")
    _, second, _ = read_adapter(result.run_dir / "round-0002")
    a_keys = [k for k in first if k.endswith("lora_A")]
    assert a_keys and all(torch.equal(first[k], second[k]) for k in a_keys)
    assert any(not torch.equal(first[k], second[k]) for k in first if k.endswith("lora_B"))
    fedavg = federate(config(tiny_classifier, data, tmp_path / "avg", method="lora", rule="fedavg"), "inline")
    assert result.history[1]["bytes_up"] < fedavg.history[1]["bytes_up"]  # A is not sent under FFA


def test_a_client_on_another_base_is_refused_by_name(tiny_classifier, data, tmp_path):
    from nora.federated.flower import build_coordinator

    coordinator = build_coordinator(config(tiny_classifier, data, tmp_path / "run"), tmp_path / "run")
    instructions = {**coordinator.instructions(1, 1), "fingerprint": "0" * 64}
    with pytest.raises(FederatedError, match=r"client-1 refuses round 1: the server's base model fingerprint 000000"):
        train_client(coordinator.party, coordinator.data, 1, instructions, coordinator.sent())


@bad_input("federate", "interrupted")
def test_a_killed_run_resumes_at_the_next_round_and_ends_as_an_unbroken_run(tiny_classifier, data, tmp_path):
    """SIGKILL after round 1 is saved; --resume continues at round 2 and the result equals a run never killed."""
    whole = federate(config(tiny_classifier, data, tmp_path / "whole", rounds=3), "inline")
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "nora", "federate", "--model", tiny_classifier, "--task", "seq-cls", "--data",
            data["train"], "--eval-data", data["dev"], "--method", "lora-xs", "--rank", 4, "--max-length", 16,
            "--batch-size", 8, "--learning-rate", 1e-2, "--clients", 3, "--local-steps", 2, "-o", out,
            "--runtime", "inline"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([str(a) for a in [*args, "--rounds", 3]], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    log = out / "rounds.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and any(json.loads(line)["round"] == 1 for line in log.read_text().splitlines()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [json.loads(line)["round"] for line in log.read_text().splitlines()]
    assert 1 in done and 3 not in done, done  # killed mid-run
    refused(["federate", *args[4:], "--rounds", 3], r"holds a run|--resume|--overwrite")
    resumed = subprocess.run([str(a) for a in [*args, "--rounds", 3, "--resume"]], env=env, capture_output=True,
                             text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming after round {max(done)} of 3" in resumed.stderr
    history = [json.loads(line) for line in log.read_text().splitlines()]
    assert [h["round"] for h in history] == [0, 1, 2, 3]
    _, a, _ = read_adapter(whole.adapter_dir)
    _, b, _ = read_adapter(out / "adapter")
    for k in a:  # two processes on one machine: the same rounds, float32 tolerance
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    for x, y in zip(numbers(whole.history), numbers(history), strict=True):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-6)


def test_resume_may_add_rounds_but_not_change_settings(tiny_classifier, data, tmp_path):
    out = tmp_path / "run"
    federate(config(tiny_classifier, data, out, rounds=1), "inline")
    with pytest.raises(FederatedError, match=r"local_steps"):
        federate(config(tiny_classifier, data, out, rounds=2, local_steps=3, resume=True), "inline")
    result = federate(config(tiny_classifier, data, out, rounds=2, resume=True), "inline")
    straight = federate(config(tiny_classifier, data, tmp_path / "straight", rounds=2), "inline")
    assert numbers(result.history) == numbers(straight.history)  # one process: bit for bit


def test_central_dp_clips_adds_noise_and_reports_epsilon(tiny_classifier, data, tmp_path):
    plain = federate(config(tiny_classifier, data, tmp_path / "plain", rounds=2), "inline")
    dp = federate(config(tiny_classifier, data, tmp_path / "dp", rounds=2, dp_noise=1.0, dp_clip=0.5), "inline")
    eps = [h["epsilon"] for h in dp.history[1:]]
    assert 0 < eps[0] < eps[1] and all(h["delta"] == 1e-5 for h in dp.history[1:])
    assert "epsilon" not in plain.history[1] and "dp_noise_dw" not in plain.history[1]
    assert all(h["update_norm"] > 0 for h in plain.history[1:])
    # the noise measured where it acts: ΔW, beside the round's clean step (LoRA-XS: ΔW is linear in the noise)
    assert all(h["dp_noise_dw"] > 0 and h["update_dw"] > 0 for h in dp.history[1:])
    _, a, _ = read_adapter(plain.adapter_dir)
    _, b, _ = read_adapter(dp.adapter_dir)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_dp_noise_comes_from_the_servers_secret_not_the_public_seed_and_resumes_exactly(tiny_classifier, data,
                                                                                        tmp_path):  # fmt: skip
    dp = {"dp_noise": 1.0, "dp_clip": 0.5}
    out = tmp_path / "run"
    federate(config(tiny_classifier, data, out, rounds=1, **dp), "inline")
    secret = out / "dp-noise.secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    resumed = federate(config(tiny_classifier, data, out, rounds=2, resume=True, **dp), "inline")
    again = federate(config(tiny_classifier, data, copy, rounds=2, resume=True, **dp), "inline")
    assert numbers(resumed.history) == numbers(again.history)  # round 2's noise: a function of the kept secret
    # another run of the same settings and seed draws another secret, so other noise
    other = federate(config(tiny_classifier, data, tmp_path / "other", rounds=1, **dp), "inline")
    assert other.history[1]["dp_noise_dw"] != resumed.history[1]["dp_noise_dw"]
    secret.unlink()
    with pytest.raises(FederatedError, match=r"dp-noise.secret is missing"):
        federate(config(tiny_classifier, data, out, rounds=3, resume=True, **dp), "inline")


def test_clients_sampled_per_round_are_a_function_of_seed_and_round(tiny_classifier, data, tmp_path):
    result = federate(config(tiny_classifier, data, tmp_path / "run", rounds=2, clients_per_round=2), "inline")
    chosen = [h["clients"] for h in result.history[1:]]
    assert all(len(c) == 2 for c in chosen)
    again = federate(config(tiny_classifier, data, tmp_path / "again", rounds=2, clients_per_round=2), "inline")
    assert [h["clients"] for h in again.history[1:]] == chosen


# ---- bad input: each refused before any training ----------------------------------------------------------------
def federate_args(model, data, out, *extra) -> list:
    return ["federate", "--model", model, "--task", "seq-cls", "--data", data["train"], "--eval-data", data["dev"],
            "-o", out, "--runtime", "inline", "--max-length", 16, "--batch-size", 8, *extra]  # fmt: skip


@bad_input("federate", "malformed")
@pytest.mark.parametrize(
    "extra,pattern",
    [
        (["--method", "lora-xs", "--rounds", 0], r"--rounds 0: a federated run needs at least one round"),
        (["--method", "nora"], r"cannot be aggregated exactly without a choice of rule: give --rule one of "
                               r"\['frozen-a', 'product'\]"),
        (["--method", "lora"], r"give --rule one of \['fedavg', 'ffa', 'flora'\]"),
        (["--method", "lora-xs", "--rule", "product"], r"rule 'product' does not aggregate lora-xs"),
        (["--method", "nora", "--rule", "product", "--adapter-option", "awsvd=true"], r"awsvd.*leave awsvd off"),
        (["--method", "lora-xs", "--split", "dirichlet"], r"--split dirichlet needs --dirichlet-alpha"),
        (["--method", "lora-xs", "--dp-noise", 1.0], r"needs both --dp-noise .* and --dp-clip"),
        (["--method", "lora-xs", "--local-steps", 0], r"--local-steps 0: each client takes at least one"),
        (["--method", "nora", "--rule", "product", "--clients", 2, "--client-ranks", "2,4"],
         r"--client-ranks: a nora client of lower rank cannot be widened exactly"),
        (["--method", "lora-xs", "--rank", 4, "--clients", 2, "--client-ranks", "2,8"], r"client 1 has rank 8"),
        (["--method", "lora-xs", "--rank", 4, "--clients", 3, "--client-ranks", "2,4"], r"2 ranks for 3 clients"),
        (["--method", "lora-xs", "--clients", 2, "--client-ranks", "2,x"], r"--client-ranks '2,x': give whole"),
    ],
)  # fmt: skip
def test_settings_that_cannot_run_are_refused_before_anything_loads(data, tmp_path, extra, pattern):
    start = time.perf_counter()
    refused(federate_args(tmp_path / "no-such-model", data, tmp_path / "out", *extra), pattern)
    assert time.perf_counter() - start < 5 and not (tmp_path / "out").exists()


@bad_input("federate", "malformed")
def test_an_empty_client_file_or_a_label_only_one_client_has_is_refused_before_training(tiny_classifier, data,
                                                                                         tmp_path):  # fmt: skip
    a = write_csv(tmp_path / "a.csv", reviews(16, 3))
    b = write_csv(tmp_path / "b.csv", reviews(16, 4))
    odd = write_csv(tmp_path / "odd.csv", reviews(16, 5, labels=("pos", "neg", "meh")))
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    base = ["federate", "--model", tiny_classifier, "--task", "seq-cls", "--eval-data", data["dev"], "--runtime",
            "inline", "--max-length", 16, "--batch-size", 8, "--method", "lora-xs"]  # fmt: skip
    refused([*base, "-o", tmp_path / "o1", "--client-data", a, "--client-data", empty], r"empty\.csv")
    refused([*base, "-o", tmp_path / "o2", "--client-data", a, "--client-data", b, "--client-data", odd],
            r"client 'client-2 \(odd\.csv\)' is the only client with label 'meh'")  # fmt: skip
    for out in ("o1", "o2"):
        assert not (tmp_path / out / "rounds.jsonl").exists()


@bad_input("federate", "missing")
def test_missing_data_or_model_is_named(tiny_classifier, data, tmp_path):
    refused(["federate", "--model", tiny_classifier, "--task", "seq-cls", "--method", "lora-xs", "-o", tmp_path / "o"],
            r"no training data: pass --data")  # fmt: skip
    refused(federate_args(tiny_classifier, {**data, "train": tmp_path / "nope.csv"}, tmp_path / "o2", "--method",
                          "lora-xs"), r"nope\.csv")  # fmt: skip


@bad_input("federate", "too large")
def test_more_clients_than_the_data_or_the_round_can_hold_is_refused(tiny_classifier, data, tmp_path):
    refused(federate_args(tiny_classifier, data, tmp_path / "o", "--method", "lora-xs", "--clients", 3,
                          "--clients-per-round", 4), r"--clients-per-round 4 is more than the 3 clients")  # fmt: skip
    refused(federate_args(tiny_classifier, data, tmp_path / "o2", "--method", "lora-xs", "--clients", 40),
            r"fewer than one batch of 8")  # fmt: skip


@bad_input("federate", "hostile")
def test_a_client_reply_with_non_finite_tensors_is_refused_naming_it_and_nothing_is_saved(tiny_classifier, data,
                                                                                        tmp_path):  # fmt: skip
    from nora.federated.flower import build_coordinator

    coordinator = build_coordinator(config(tiny_classifier, data, tmp_path / "run"), tmp_path / "run")
    replies = [train_client(coordinator.party, coordinator.data, c, coordinator.instructions(1, c), coordinator.sent())
               for c in range(3)]  # fmt: skip
    key = next(iter(replies[2].tensors))
    replies[2].tensors[key] = torch.full_like(replies[2].tensors[key], float("nan"))
    with pytest.raises(Exception, match=r"client 'client-2'.*NaN or inf"):
        coordinator.absorb(1, replies)
    assert not (tmp_path / "run" / "round-0001").exists()


@bad_input("federate", "unwritable")
def test_an_output_dir_in_use_or_holding_a_run_is_refused_before_training(tiny_classifier, data, tmp_path):
    from nora.training.rundir import RunDir

    out = tmp_path / "out"
    holder = RunDir(out)
    holder.claim(overwrite=False, resume=False)
    try:
        refused(federate_args(tiny_classifier, data, out, "--method", "lora-xs"), r"in use by another")
    finally:
        holder.close()
    federate(config(tiny_classifier, data, out, rounds=1), "inline")
    refused(federate_args(tiny_classifier, data, out, "--method", "lora-xs"), r"--overwrite")


def test_flora_stacks_every_round_into_the_global_model_and_saves_it_as_an_ordinary_lora(tiny_classifier, data,
                                                                                        tmp_path):  # fmt: skip
    """FLoRA over rounds: exact every round, the global update's rank (and the download) grows with the rounds, and
    the saved adapter on the untouched base gives the server's evaluation of the global model."""
    fc = config(tiny_classifier, data, tmp_path / "run", method="lora", rule="flora", rounds=3)
    result = federate(fc, "inline")
    fed = result.history[1:]
    assert all(h["rule"] == "flora" and h["exact"] and h["aggregation_error"] < 1e-4 for h in fed)
    assert fed[0]["bytes_down"] < fed[1]["bytes_down"]  # round 1 sends the head only; then the stacked factors
    _, _, meta = read_adapter(result.adapter_dir)
    ranks = {info["r"] for info in meta["layers"].values()}
    assert ranks == {32}  # 3 rounds × 3 clients × r 4 = 36 > min(d, k) = 32: re-factored exactly at 32
    out = tmp_path / "eval.json"
    ok = CliRunner().invoke(app, ["eval", str(result.adapter_dir), "--tasks", str(data["dev"]), "-o", str(out),
                                  "--no-progress"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    (scores,) = json.loads(out.read_text())["results"]["classification"]["tasks"].values()
    assert scores["n"] == 40 and scores["acc"] == pytest.approx(fed[-1]["eval_acc"])


def test_the_flower_app_written_for_flwr_run_names_nora_s_apps_and_this_run(tiny_classifier, data, tmp_path):
    """`nora federate --flower-app DIR` writes what Flower's own `flwr run DIR` deploys: the components are the
    module-level ServerApp and ClientApp, configured by the run's federation.json."""
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from nora.federated import flower

    tomllib = pytest.importorskip("tomllib", reason="Python 3.11's TOML reader")
    args = federate_args(tiny_classifier, data, tmp_path / "out", "--method", "nora", "--rule", "frozen-a",
                         "--clients", 3, "--flower-app", tmp_path / "app")  # fmt: skip
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0 and "flwr run" in result.output, result.output
    project = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    components = project["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "nora.federated.flower:server_app",
                          "clientapp": "nora.federated.flower:client_app"}  # fmt: skip
    assert isinstance(flower.server_app, ServerApp) and isinstance(flower.client_app, ClientApp)
    recorded = json.loads(Path(project["tool"]["flwr"]["app"]["config"]["nora-config"]).read_text())
    fc = FederatedConfig.from_dict(recorded)
    assert fc.train.method == "nora" and fc.rule == "frozen-a" and fc.clients == 3 and fc.to_dict() == recorded
    assert project["tool"]["flwr"]["federations"]["local-simulation"]["options"]["num-supernodes"] == 3
    assert not (tmp_path / "out").exists()  # written, not run
