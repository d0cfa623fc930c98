"""Adapter files written by an earlier nora (tests/fixtures/v1, made by fixtures/make_v1_adapters.py at format
version 1) load after every later change and reproduce the logits recorded when they were written (on another
CPU, so to float32 rounding: see conftest.FLOAT32_TOL)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_float_close
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import nora

V1 = Path(__file__).resolve().parent / "fixtures" / "v1"
NAMES = ["lora", "pissa", "dora", "lora-xs", "nora", "nora-out", "svfit"]


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(V1 / "expected_logits.safetensors")


def base() -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(V1 / "base").eval()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("is_trainable", [True, False])
def test_v1_file_loads_to_the_same_logits(name: str, is_trainable: bool, expected) -> None:
    model = nora.AdaptedModel.from_pretrained(base(), V1 / name, is_trainable=is_trainable).eval()
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    assert_float_close(logits, expected[name], msg=name)


def test_v1_files_serve_one_mixed_batch(expected) -> None:
    model = nora.AdaptedModel.from_pretrained(base(), V1 / NAMES[0], NAMES[0]).eval()
    for name in NAMES[1:]:
        model.load_adapter(V1 / name, name)
    ids = expected["input_ids"]
    rows = ids.repeat(len(NAMES), 1)
    with torch.no_grad():
        logits = model(input_ids=rows, adapter_names=[n for n in NAMES for _ in range(len(ids))]).logits
    for i, name in enumerate(NAMES):
        assert_float_close(logits[i * len(ids) : (i + 1) * len(ids)], expected[name], msg=name)
