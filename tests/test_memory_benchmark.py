"""benchmarks/memory.py --quick: its records, the invariants between rows, two identical runs counted to the byte, and
the longest-context projection with its plot."""

from __future__ import annotations

import importlib
import json

import pytest
from conftest import ROOT

ROWS = ["peft-lora", "nora-nora"]  # PEFT LoRA and NoRA, each with every option set: a few seconds


@pytest.fixture(scope="module")
def memory():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT / "benchmarks"))
        yield importlib.import_module("memory"), importlib.import_module("memory_report")


def _run(memory, out):
    args = ["--quick", "--dtype", "fp32", "--time-pairs", "1", "--only", *ROWS, "--out", str(out)]
    (record,) = memory.main(args)["records"]
    return record


@pytest.fixture(scope="module")
def two_runs(memory, tmp_path_factory):
    """The same quick benchmark run twice, each into its own folder."""
    folders = [tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")]
    return [(_run(memory[0], folder), folder) for folder in folders]


def test_quick_rows_invariants_and_exact_repeat(memory, two_runs):
    bench, report = memory
    (first, folder), (second, _) = two_runs
    assert json.loads((folder / "memory-quick-fp32.json").read_text()) == first
    expected = {row.name for row in bench.rows(quick=True) if any(o in row.name for o in ROWS)}
    assert set(first["rows"]) | set(first["skipped"]) == expected
    assert all("not importable" in why for why in first["skipped"].values())

    exact = ["saved_by_bucket", "held_by_bucket", "saved_by_bucket_2x", "held_by_bucket_2x", "step_peak_bytes"]
    exact += ["step_peak_bytes_2x", "weight_bytes", "optimizer_bytes", "trainable_params", "flops"]
    for name, row in first["rows"].items():
        assert {k: row[k] for k in exact} == {k: second["rows"][name][k] for k in exact}, name
        assert row["whole_step_bytes"] == row["weight_bytes"] + row["optimizer_bytes"] + row["step_peak_bytes"]
        assert row["held_per_token_per_layer"] > 0 and row["step_per_token"] > 0
        if "ckpt" not in name:  # two independent counts: autograd's saved tensors, and storages alive after forward
            assert row["saved_per_token_per_layer"] == row["held_per_token_per_layer"], name

    rows = first["rows"]
    peft, nora_stock = rows["peft-lora-r4 stock"], rows["nora-nora-r16-i4 stock"]
    assert nora_stock["saved_per_token_per_layer"] < peft["saved_per_token_per_layer"]
    assert nora_stock["trainable_params"] < peft["trainable_params"]
    ckpt = rows["nora-nora-r16-i4 ckpt"]
    assert ckpt["held_per_token_per_layer"] < nora_stock["held_per_token_per_layer"]
    assert ckpt["flops"] > nora_stock["flops"]  # the recompute is paid in FLOPs
    if "nora-nora-r16-i4 lean" in rows:
        lean, peft_generic = rows["nora-nora-r16-i4 lean"], rows["peft-lora-r4 lean+chunked"]
        assert lean["saved_per_token_per_layer"] <= nora_stock["saved_per_token_per_layer"]
        assert lean["saved_per_token_per_layer"] <= peft_generic["saved_per_token_per_layer"]
    assert {t[0] for t in report.targets(first)} and len(report.targets(first)) == 8


def test_longest_context_projection_and_plot(memory, two_runs, tmp_path):
    _, report = memory
    record = two_runs[0][0]
    projection = report.longest_context([{**record, "shape": "llama-3-8b", "dtype": "bf16"}], tmp_path)
    assert "bytes(T) = W + 32·F + R + T·(32·a + h)" in projection["formula"]
    assert projection["bases"]["nf4"] < projection["bases"]["bf16"] / 2
    for name, row in projection["rows"].items():
        tokens = row["max_tokens"]
        for base, by_gpu in tokens.items():
            sizes = sorted(by_gpu)
            assert [by_gpu[g] for g in sizes] == sorted(by_gpu[g] for g in sizes), (name, base)
            for g in sizes:  # the longest context fits, one token more does not
                budget = g * 2**30 - row["fixed"][base]
                assert by_gpu[g] * row["per_token"] <= budget < (by_gpu[g] + 1) * row["per_token"]
    assert (tmp_path / "memory-longest-context.png").stat().st_size > 10_000
    assert (
        json.loads((tmp_path / "memory-longest-context.json").read_text())["rows"].keys() == projection["rows"].keys()
    )
