"""One checked loader for every adapter file: nora's own and PEFT's, through the library (`from_pretrained`,
`load_adapter`), `nora eval --adapter`, `nora generate` and `nora export`. NaN/inf, integer tensors, missing or
extra tensors, wrong shapes, truncated files, a missing weights file and flags without their tensors are nora's own
AdapterError naming the file and the tensor; none loads, none is a traceback. (Serving: test_serve_isolation.py.)"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import peft
import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file
from test_eval_support import RECORDS, byte_llama, byte_tokenizer, write_task
from typer.testing import CliRunner

import nora
from nora.cli import app
from nora.errors import AdapterError

WEIGHTS = "adapter_model.safetensors"


def _first(tensors: dict[str, torch.Tensor], part: str = "") -> str:
    return sorted(k for k in tensors if part in k)[0]


def _poke(value: float):
    def edit(t: dict[str, torch.Tensor]) -> str:
        key = _first(t)
        t[key] = t[key].clone()
        t[key].view(-1)[0] = value
        return key

    return edit


def _as_int64(t: dict[str, torch.Tensor]) -> str:
    key = _first(t)
    t[key] = (t[key] * 100).long()
    return key


def _drop(t: dict[str, torch.Tensor]) -> str:
    key = _first(t, "lora_A") if any("lora_A" in k for k in t) else _first(t)
    del t[key]
    return key


def _extra(t: dict[str, torch.Tensor]) -> str:
    key = _first(t).rpartition(".")[0] + ".stowaway"
    t[key] = torch.zeros(3)
    return key


def _narrow(t: dict[str, torch.Tensor]) -> str:
    key = _first(t, "lora_A") if any("lora_A" in k for k in t) else _first(t)
    t[key] = t[key][..., :-1].contiguous()
    return key


# corruption → (how to make it, what the error says); the tensor it touched is named in the error too
TENSOR_CASES = {
    "nan": (_poke(float("nan")), r"holds 1 non-finite value"),
    "inf": (_poke(float("inf")), r"holds 1 non-finite value"),
    "int64": (_as_int64, r"is I64, not floating point"),
    "missing-tensor": (_drop, r"lacks"),
    "extra-tensor": (_extra, r"no place for|neither a LoRA factor"),
    "wrong-shape": (_narrow, r"in the file but .* here"),
}


def corrupt(directory: Path, case: str) -> str:
    """Damage the adapter in `directory` as `case` says; returns what the error must name (a tensor or a file)."""
    weights = directory / WEIGHTS
    if case in TENSOR_CASES:
        tensors = load_file(weights)
        key = TENSOR_CASES[case][0](tensors)
        save_file(tensors, weights)
        return key.removeprefix("base_model.model.").removesuffix(".weight")
    if case == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return str(weights)
    if case == "no-weights-file":
        weights.unlink()
        return str(directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    if case == "dora-flag-without-magnitudes":
        config["use_dora"] = True
    elif case == "rank-not-the-config's":
        config["r"] = 8
    elif case == "rank-zero":
        config["r"] = 0
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return str(directory)


MESSAGES = {
    **{case: message for case, (_, message) in TENSOR_CASES.items()},
    "truncated": r"is corrupt or truncated",
    "no-weights-file": r"has no adapter_model.safetensors",
    "dora-flag-without-magnitudes": r"lacks lora_magnitude_vector \(adapter_config.json sets use_dora",
    "rank-not-the-config's": r"rank 4 in the file but r=8 in adapter_config.json",
    "rank-zero": r"r=0, lora_alpha=8 .* not what PEFT writes",
}
PEFT_ONLY = ("dora-flag-without-magnitudes", "rank-not-the-config's", "rank-zero")


def make_adapters(root: Path, base_factory=tiny_llama) -> dict[str, Path]:
    """Trained-looking adapters on `base_factory()`: a NoRA (resident when loaded), a LoRA (modules) and PEFT's
    own LoRA r=4."""
    out = {}
    for kind, config in (("nora", nora.NoraConfig(r=8, inner_r=2)), ("lora", nora.LoraConfig(r=4))):
        model = nora.get_peft_model(base_factory(), config)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(root / kind)
        out[kind] = root / kind
    theirs = peft.get_peft_model(base_factory(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    theirs.save_pretrained(str(root / "peft"))
    out["peft"] = root / "peft"
    return out


def damaged(adapters: dict[str, Path], kind: str, case: str, where: Path) -> tuple[Path, str]:
    directory = where / f"{kind}-{case}"
    shutil.copytree(adapters[kind], directory)
    return directory, corrupt(directory, case)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    torch.manual_seed(0)
    return make_adapters(tmp_path_factory.mktemp("adapters"))


LIBRARY_CASES = [(kind, case) for kind in ("nora", "lora", "peft") for case in MESSAGES
                 if kind == "peft" or case not in PEFT_ONLY]  # fmt: skip


@pytest.mark.parametrize(("kind", "case"), LIBRARY_CASES, ids=[f"{k}-{c}" for k, c in LIBRARY_CASES])
def test_every_damaged_file_is_refused_by_name_in_the_library(adapters, kind, case, tmp_path):
    directory, named = damaged(adapters, kind, case, tmp_path)
    model = nora.AdaptedModel(tiny_llama())
    with pytest.raises(AdapterError, match=MESSAGES[case]) as caught:
        model.load_adapter(directory, "x")
    assert named in str(caught.value)
    assert "x" not in model.peft_config and not any(layer.adapters or layer.banks for layer in model.layers().values())
    with pytest.raises(AdapterError, match=MESSAGES[case]):
        nora.AdaptedModel.from_pretrained(tiny_llama(), directory)


def test_a_peft_dora_and_a_trained_head_import_to_peft_outputs(tmp_path):
    """What PEFT writes for DoRA (magnitudes) and for a classifier (modules_to_save) loads through nora's importer,
    so `nora eval --adapter` needs no second loader for them."""
    from conftest import tiny_bert

    ids = torch.tensor([[1, 5, 9, 3, 7, 2], [4, 4, 8, 1, 6, 3]])
    cases = {
        "dora": (tiny_llama, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)),
        "head": (tiny_bert, peft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")),
    }
    for name, (make, config) in cases.items():
        theirs = peft.get_peft_model(make(), config)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in theirs.parameters():
                if p.requires_grad:
                    p.add_(0.2 * torch.randn_like(p))
        theirs.save_pretrained(str(tmp_path / name))
        ours = nora.AdaptedModel.from_pretrained(make(), tmp_path / name)
        with torch.no_grad():
            expected = theirs.eval()(input_ids=ids).logits
            assert (expected - make()(input_ids=ids).logits).abs().max() > 1e-3  # the adapter changes the output
            torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)


# ---- the commands ------------------------------------------------------------------------------------------------
runner = CliRunner()


def _plain(output: str) -> str:
    return " ".join(re.sub("[│╭╮╰╯─]", " ", output).split())


def _names(output: str, named: str) -> bool:
    """Whether the error box names `named` (a long path wraps across its lines)."""
    return "".join(named.split()) in "".join(re.sub("[│╭╮╰╯─]", "", output).split())


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    """A byte-level Llama saved as a base directory, its adapters (nora, PEFT) and one commonsense task file."""
    root = tmp_path_factory.mktemp("cli")
    byte_llama().save_pretrained(root / "base")
    byte_tokenizer().save_pretrained(root / "base")
    torch.manual_seed(0)

    def base():
        return type(byte_llama()).from_pretrained(root / "base")

    adapters = make_adapters(root / "adapters", base)
    write_task(root / "data", "boolq", [RECORDS["boolq"]])
    return root / "base", adapters, root / "data"


CLI_CASES = ["nan", "int64", "missing-tensor", "wrong-shape", "truncated", "no-weights-file",
             "dora-flag-without-magnitudes", "rank-not-the-config's", "rank-zero"]  # fmt: skip


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.bad_input("eval", "hostile" if c == "nan" else "malformed"))
             for c in CLI_CASES]
)  # fmt: skip
def test_nora_eval_reads_a_peft_adapter_through_the_checked_loader(cli_setup, case, tmp_path):
    """Through peft.PeftModel these scored with exit 0 (NaN, int64, missing tensors, a DoRA flag without
    magnitudes) or ended in tracebacks; a missing file said "Cannot find the requested files in the disk cache"."""
    base, adapters, data = cli_setup
    directory, named = damaged(adapters, "peft", case, tmp_path)
    out = tmp_path / "results.json"
    args = [str(base), "--adapter", str(directory), "--tasks", "boolq", "--data-dir", str(data), "-o", str(out)]
    result = runner.invoke(app, ["eval", *args, "--no-progress"])
    assert result.exit_code == 2, result.output
    if case == "wrong-shape":  # found on the base built from its config alone, naming the layer and both shapes
        message, named = r"module '.*' is \[32, 48\] here but \[32, 47\] in the adapter", named.rpartition(".lora_")[0]
    else:
        message = MESSAGES[case]
    assert re.search(message, _plain(result.output)) and _names(result.output, named), result.output
    assert "Loading weights" not in result.output  # refused before the base model is loaded
    assert not out.exists()


@pytest.mark.bad_input("generate", "malformed")
@pytest.mark.bad_input("export", "malformed")
def test_generate_and_export_refuse_a_damaged_nora_adapter_by_tensor(cli_setup, tmp_path):
    base, adapters, _ = cli_setup
    directory, named = damaged(adapters, "lora", "nan", tmp_path)
    generated = runner.invoke(app, ["generate", "--adapter", str(directory), "-p", "hi", "--device", "cpu"])
    exported = runner.invoke(app, ["export", str(directory), "-o", str(tmp_path / "out")])
    for result in (generated, exported):
        assert result.exit_code == 2, result.output
        assert "non-finite" in _plain(result.output) and _names(result.output, named), result.output
    assert not (tmp_path / "out").exists()
