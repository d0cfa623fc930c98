"""Run directories that never lose or mix work: one writer at a time (a lock beside the directory, a stale one
taken over), --overwrite that replaces a run only with a finished one (kill -9 included), --resume that refuses
changed settings, a full disk that keeps the last good checkpoint, and an unwritable output refused first."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import RECORDS, ROOT, save_tiny_llm
from test_bad_input import refused

import nora.atomic
from nora.training import TrainConfig, TrainingError, train
from nora.training.checkpoint import read_checkpoint
from nora.training.rundir import RunDir


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> Path:
    return save_tiny_llm(tmp_path_factory.mktemp("base") / "llm")


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.json"
    path.write_text(json.dumps(RECORDS))
    return path


def settings(llm_dir: Path, data: Path, out: Path, **overrides) -> dict:
    values = dict(
        model=str(llm_dir), data=str(data), output_dir=str(out), batch_size=8, max_steps=2, logging_steps=1,
        progress=False, plot=False, method="nora", adapter={"r": 8, "inner_r": 2},
    )  # fmt: skip
    return {**values, **overrides}


def files_of(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory and its bytes."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def siblings(run_dir: Path) -> list[str]:
    """What nora left beside a run directory (lock, staging, replaced run)."""
    return sorted(p.name for p in run_dir.parent.iterdir() if p.name.startswith(f".{run_dir.name}."))


def train_cli(llm_dir: Path, data: Path, out: Path, *extra: object) -> list[object]:
    return ["train", "--model", llm_dir, "--data", data, "-o", out, "--no-progress", "--no-plot", "--rank", 8,
            "--inner-rank", 2, "--batch-size", 8, *extra]  # fmt: skip


# ---- one writer at a time -------------------------------------------------------------------------------------
@pytest.mark.bad_input("train", "unwritable")
def test_a_second_writer_is_refused_at_once(llm_dir, data_file, tmp_path):
    out = tmp_path / "run"
    holder = RunDir(out)
    holder.claim(overwrite=False, resume=False)  # what a running `nora train -o run` holds
    try:
        start = time.perf_counter()
        refused(
            train_cli(llm_dir, data_file, out, "--max-steps", 1),
            rf"output dir .*run is in use by another nora train \(pid {os.getpid()} on ",
            "another --output-dir",
        )
        assert time.perf_counter() - start < 15
        assert not out.exists()
    finally:
        holder.close()
    assert siblings(out) == []  # the lock file goes with its holder
    train(TrainConfig(**settings(llm_dir, data_file, out)))  # free again


@pytest.mark.bad_input("train", "interrupted")
def test_a_lock_left_by_a_killed_run_is_taken_over_saying_so(llm_dir, data_file, tmp_path, capfd):
    out = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that was a process and is no more
    lock = tmp_path / ".run.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": "here", "started": "2024-01-01 00:00:00"}))
    train(TrainConfig(**settings(llm_dir, data_file, out)))
    err = capfd.readouterr().err
    assert f"taking over the lock of a run that is gone (pid {dead.pid} on here" in err, err
    assert (out / "adapter").is_dir() and siblings(out) == []


# ---- --overwrite --------------------------------------------------------------------------------------------------
@pytest.mark.bad_input("train", "interrupted")
def test_overwrite_replaces_a_run_only_with_a_finished_one(llm_dir, data_file, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**settings(llm_dir, data_file, out)))
    before = files_of(out)
    assert {"adapter/adapter_model.safetensors", "log.jsonl", "summary.json", "train_config.json"} <= set(before)
    diverging = settings(llm_dir, data_file, out, overwrite=True, method="lora", adapter={"r": 4},
                         learning_rate=1e8, max_grad_norm=None, max_steps=50, save_steps=1)  # fmt: skip
    with pytest.raises(TrainingError, match=rf"loss became .*the previous run in {out} is unchanged"):
        train(TrainConfig(**diverging))
    assert files_of(out) == before and siblings(out) == []
    finished = train(TrainConfig(**settings(llm_dir, data_file, out, overwrite=True, method="lora", adapter={"r": 4})))
    assert finished.run_dir == out and finished.adapter_dir == out / "adapter"
    assert json.loads((out / "train_config.json").read_text())["method"] == "lora"
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["method"] == "lora"
    assert siblings(out) == []


def _write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.bad_input("train", "interrupted")
def test_kill_9_during_overwrite_leaves_the_previous_run_and_the_next_command_says_so(llm_dir, data_file, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**settings(llm_dir, data_file, out)))
    before = files_of(out)
    long_run = settings(llm_dir, data_file, out, overwrite=True, max_steps=100_000, save_steps=1, batch_size=4)
    proc = subprocess.Popen(
        [sys.executable, "-m", "nora", "train", "--config", str(_write_yaml(tmp_path / "run.yaml", long_run))],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    staging = tmp_path / ".run.staging"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not list(staging.glob("checkpoints/checkpoint-*")):
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert files_of(out) == before  # the new run trains beside the previous one
        # a second writer meanwhile is refused at once, naming the first (both exited 0, logs interleaved)
        refused(train_cli(llm_dir, data_file, out, "--overwrite"), rf"in use by another nora train \(pid {proc.pid} ")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert files_of(out) == before and staging.is_dir()
    text = refused(train_cli(llm_dir, data_file, out), "already holds files")  # the next command, whatever it is
    assert f"taking over the lock of a run that is gone (pid {proc.pid} " in text, text
    assert f"removed {staging}, left by a run killed during --overwrite" in text
    assert f"the previous run in {out} is intact" in text
    assert files_of(out) == before and siblings(out) == []


@pytest.mark.bad_input("train", "interrupted")
def test_a_swap_cut_between_its_renames_is_finished_by_the_next_run(llm_dir, data_file, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**settings(llm_dir, data_file, out, method="lora", adapter={"r": 4})))
    finished = files_of(out)
    os.replace(out, tmp_path / ".run.staging")  # the finished new run, not yet in place
    (tmp_path / ".run.replaced").mkdir()  # the previous run, set aside
    refused(train_cli(llm_dir, data_file, out), f"finished replacing {out} with the run that had completed", "already")
    assert files_of(out) == finished and siblings(out) == []


# ---- --resume -----------------------------------------------------------------------------------------------------
@pytest.mark.bad_input("train", "malformed")
def test_resume_refuses_changed_settings_naming_each(llm_dir, data_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(TrainConfig(**settings(llm_dir, data_file, out, save_steps=1, max_steps=2)))
    recorded = (out / "train_config.json").read_text()
    other = tmp_path / "other.json"
    other.write_text(json.dumps(RECORDS[:24]))
    changed = ["train", "--model", llm_dir, "--data", other, "-o", out, "--no-progress", "--no-plot", "--rank", 4,
               "--inner-rank", 2, "--batch-size", 4, "--max-steps", 4, "--resume", "latest"]  # fmt: skip
    differ = rf"--resume continues the run recorded in {out}/train_config.json, but these settings differ"
    named = [rf"data '{data_file}' → '{other}'", r"adapter.r 8 → 4", r"batch_size 8 → 4", "--resume-changes"]
    refused(changed, differ, *named)
    assert (out / "train_config.json").read_text() == recorded

    # the same run spelt otherwise (a relative path) and given more steps resumes
    monkeypatch.chdir(tmp_path)
    same = settings(llm_dir, Path(data_file.name), out, save_steps=1, max_steps=3, resume="latest")
    assert train(TrainConfig(**same)).summary["steps"] == 3

    accepted = settings(llm_dir, other, out, max_steps=4, batch_size=4, resume="latest", resume_changes=True)
    assert train(TrainConfig(**accepted)).summary["steps"] == 4
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    (noted,) = [r for r in log if "resume_changes" in r]
    assert noted["step"] == 2  # resumed from the newest checkpoint, step 2 of the 3-step run
    assert noted["resume_changes"] == {"data": {"was": "train.json", "now": str(other)},
                                       "batch_size": {"was": 8, "now": 4}}  # fmt: skip
    assert json.loads((out / "train_config.json").read_text())["batch_size"] == 4


@pytest.mark.bad_input("train", "malformed")
def test_resume_changes_without_resume_is_refused(llm_dir, data_file, tmp_path):
    refused(train_cli(llm_dir, data_file, tmp_path / "run", "--resume-changes"), "add --resume latest")


# ---- a full disk ----------------------------------------------------------------------------------------------------
def _disk_fills_at(monkeypatch, nth: int) -> None:
    """safetensors' writes fail from the `nth` optimizer file on, as a full disk fails them (SafetensorError with
    the OS error inside, a partial file left behind)."""
    from safetensors import SafetensorError

    real, calls = nora.atomic.save_file, []

    def save_file(tensors, filename, metadata=None):
        if "optimizer.safetensors" in filename:
            calls.append(filename)
        if len(calls) >= nth:
            Path(filename).write_bytes(b"\0" * 10)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(nora.atomic, "save_file", save_file)


@pytest.mark.bad_input("train", "too large")
@pytest.mark.bad_input("train", "interrupted")
def test_a_full_disk_is_an_error_naming_the_folder_and_the_last_checkpoint_stays_intact(
    llm_dir, data_file, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    values = settings(llm_dir, data_file, out, save_steps=1, max_steps=5, save_total_limit=2)
    with monkeypatch.context() as m:
        _disk_fills_at(m, 3)
        with pytest.raises(TrainingError) as stopped:
            train(TrainConfig(**values))
    message = str(stopped.value)
    assert f"cannot write to {out} (the disk is full: No space left on device, writing " in message, message
    assert "training stopped at step 3: the last good checkpoint is " in message and "checkpoint-00000002" in message
    assert "Free some space there" in message
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["checkpoint-00000001", "checkpoint-00000002"]  # nothing half-written beside them
    read_checkpoint(out / "checkpoints" / "checkpoint-00000002", 0)
    assert train(TrainConfig(**values, resume="latest")).summary["steps"] == 5  # room again: it resumes

    # the command line says so, without a traceback; under --overwrite the previous run is what stays
    before = files_of(out)
    with monkeypatch.context() as m:
        _disk_fills_at(m, 1)
        text = refused(train_cli(llm_dir, data_file, out, "--overwrite", "--save-steps", 1, "--max-steps", 3),
                       rf"error: cannot write to {out} \(the disk is full", r"training stopped at step 1",
                       rf"the previous run in {out} is unchanged")  # fmt: skip
    assert "SafetensorError" not in text
    assert files_of(out) == before and siblings(out) == []


def _can_mount_tmpfs(where: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    where.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where}"],
                           capture_output=True)  # fmt: skip
    return probe.returncode == 0


@pytest.mark.bad_input("train", "too large")
@pytest.mark.bad_input("train", "interrupted")
def test_a_real_full_disk_on_a_small_tmpfs(llm_dir, data_file, tmp_path):
    """The same on a disk that really fills: a 256 KiB tmpfs, mounted in a private mount namespace (root only)."""
    disk = tmp_path / "disk"
    if not _can_mount_tmpfs(disk):
        pytest.skip("mounting a tmpfs needs root and unshare -m (the injected full disk above runs everywhere)")
    values = settings(llm_dir, data_file, disk / "run", save_steps=1, max_steps=10_000, save_total_limit=10_000,
                      batch_size=4)  # fmt: skip
    config = _write_yaml(tmp_path / "run.yaml", values)
    script = (f"mount -t tmpfs -o size=256k tmpfs {disk} && {{ {sys.executable} -m nora train --config {config}; "
              f"echo $? > {tmp_path}/rc; cp -a {disk}/run {tmp_path}/copy; }}")  # fmt: skip
    run = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, capture_output=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    err = run.stderr.decode()
    assert (tmp_path / "rc").read_text().strip() == "1", err[-3000:]
    assert f"error: cannot write to {disk / 'run'} (the disk is full: No space left on device" in err, err[-3000:]
    assert "Traceback" not in err
    copy = tmp_path / "copy"
    saved = sorted((copy / "checkpoints").iterdir())
    assert len(saved) >= 2 and all(p.name.startswith("checkpoint-") for p in saved), saved  # no temporary left
    assert f"the last good checkpoint is {disk / 'run' / 'checkpoints' / saved[-1].name}" in err
    for checkpoint in saved:
        read_checkpoint(checkpoint, 0)


# ---- unwritable outputs ---------------------------------------------------------------------------------------------
@pytest.mark.bad_input("train", "unwritable")
def test_a_read_only_output_folder_is_refused_before_the_data_is_read(llm_dir, tmp_path):
    out = tmp_path / "read-only"
    out.mkdir()
    bad_data = tmp_path / "bad.json"
    bad_data.write_text("[{")
    out.chmod(stat.S_IRUSR | stat.S_IXUSR)
    immutable = os.geteuid() == 0 and shutil.which("chattr") is not None
    if immutable:  # root writes anywhere a mode forbids; not into an immutable folder
        immutable = subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode == 0
    try:
        if os.access(out, os.W_OK) and not immutable:
            pytest.skip("this user can write to a read-only folder")
        refused(train_cli(llm_dir, bad_data, out), rf"cannot write to output dir {out} ", "writable --output-dir")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(out)], check=True)
        out.chmod(stat.S_IRWXU)
