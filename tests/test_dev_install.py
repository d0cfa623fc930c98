"""What a dev install (`pip install -e ".[dev]"`) shows a user: bitsandbytes runs only when something quantized uses
it (not on `import nora`, not for `--help`, not when peft or transformers' Trainer import it), so its CPU-kernel
warning does not open every command; and install hints name commands that work from a checkout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nora.cli import app

ROOT = Path(__file__).resolve().parents[1]

PHASES = """
import sys

def state():
    return "ran" if "bitsandbytes.nn" in sys.modules else "lazy" if "bitsandbytes" in sys.modules else "absent"

import nora
print("import nora:", state())
from nora.cli import app
for args in (["--help"], ["train", "--help"], ["eval", "--help"], ["serve", "--help"], ["export", "--help"]):
    try:
        app(args)
    except SystemExit:
        pass
print("help:", state())
import peft
from transformers import Trainer, get_scheduler
print("peft and the Trainer:", state())
print("-- quantized from here --", file=sys.stderr, flush=True)
import torch
from nora.quant import roundtrip
W = torch.randn(4, 64)
error = float((roundtrip(W, {"scheme": "nf4"}) - W).abs().max())
print("quantized:", state(), 0 < error < 1)
"""


def test_bitsandbytes_runs_only_when_something_quantized_uses_it():
    pytest.importorskip("bitsandbytes", reason='bitsandbytes is the quantizer (pip install -e ".[quant]")')
    done = subprocess.run([sys.executable, "-c", PHASES], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    states = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line and not line[0].isspace())
    assert states["import nora"] == "absent" and states["help"] == "absent"
    assert states["peft and the Trainer"] == "lazy"  # peft's `import bitsandbytes` bound the module, ran none of it
    assert states["quantized"] == "ran True"  # the first use runs it, and it quantizes
    before_quantized = done.stderr.split("-- quantized from here --")[0]
    assert "bitsandbytes" not in before_quantized and "gemm_4bit" not in before_quantized


def test_install_hints_name_extras_of_this_checkout(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the serve extra were not installed
    result = CliRunner().invoke(app, ["serve", "--base", "unused"], env={"COLUMNS": "250"})
    assert result.exit_code == 2
    assert 'pip install -e ".[serve]" in nora\'s checkout' in " ".join(result.output.split())
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("uvicorn") for dep in extras["serve"])
    unpublished = [p for p in (ROOT / "src").rglob("*.py") if "nora-peft[" in p.read_text()]
    assert not unpublished, f"these name the unpublished nora-peft[...] distribution: {unpublished}"
