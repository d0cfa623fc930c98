"""A training run's output directory: one writer at a time, and a previous run replaced only by a finished one.

A lock file beside the directory (`.NAME.lock`, flock'ed for the run's life; the kernel drops the lock when its
process dies, however it dies) refuses a second `nora train` on the same directory at once. The file records the
holder's pid, host and start time, to name it; one left by a killed run is recognised and taken over, saying so.

`--overwrite` builds the new run in a sibling staging directory (`.NAME.staging`) and swaps it into place once its
adapter and summary are written: until then the previous run stays whole, and a run that fails or is killed
leaves it so. The swap is two renames (the old run aside to `.NAME.replaced`, the new one into place, then the old
one removed); the next `nora train` on the directory finishes a swap a kill interrupted and removes a staging
directory a killed run left, saying so.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import time
import weakref
from pathlib import Path

from ..atomic import plain_mode
from ..errors import AdapterError


class TrainingError(AdapterError):
    """Training cannot go on (diverged, no data, unusable output directory)."""


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


class DirLock:
    """This process's exclusive claim on `directory`: an flock'ed file beside it, removed on release."""

    def __init__(self, directory: Path, path: Path) -> None:
        self.directory = directory  # as the user named it
        self.path = path
        self._release = None

    @classmethod
    def beside(cls, directory: str | os.PathLike) -> DirLock:
        """The lock of `directory`: `.NAME.lock` in its (real) parent folder."""
        real = Path(directory).expanduser().resolve()
        return cls(Path(directory), real.with_name(f".{real.name}.lock"))

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, plain_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(_record(fd))
                os.close(fd)
                raise TrainingError(
                    f"output dir {self.directory} is in use by another nora train{holder}; wait for it to finish, "
                    "or choose another --output-dir."
                ) from None
            except OSError as e:  # a filesystem without flock: train on, unguarded
                os.close(fd)
                note(f"cannot lock {self.path} ({e.strerror}): a second nora train on {self.directory} would not be "
                     "refused.")  # fmt: skip
                return
            if _same_file(fd, self.path):
                break
            os.close(fd)  # its holder released and removed it meanwhile: lock the file there now
        left = _record(fd)
        if left and left.get("pid") != os.getpid():
            note(f"{self.directory}: taking over the lock of a run that is gone{_holder(left)}; it was killed or "
                 "crashed.")  # fmt: skip
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._release = weakref.finalize(self, _unlock, fd, self.path)

    def release(self) -> None:
        if self._release is not None:
            self._release()


def _record(fd: int) -> dict | None:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _holder(record: dict | None) -> str:
    if not record:
        return ""
    return f" (pid {record.get('pid')} on {record.get('host')}, started {record.get('started')})"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _unlock(fd: int, path: Path) -> None:
    if _same_file(fd, path):
        path.unlink()  # while still locked: a waiting process then finds its file gone and makes a new one
    os.close(fd)


class RunDir:
    """Where a run writes (`work`) and where it ends up (`final`): the same directory, or under --overwrite of a
    previous run, a staging directory beside it until `finish`."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.final = Path(output_dir).expanduser()
        self.work = self.final
        self.real = self.final.resolve()  # a symlinked run directory is replaced where it really is
        self.staging = self.real.with_name(f".{self.real.name}.staging")
        self.replaced = self.real.with_name(f".{self.real.name}.replaced")
        self.lock = DirLock.beside(self.final)
        self._made: list[Path] = []  # parent folders made for the lock file, removed again if the run never starts

    @property
    def staged(self) -> bool:
        return self.work != self.final

    def claim(self, overwrite: bool, resume: bool) -> None:
        """Lock the directory, tidy what a killed run left, and refuse what this run cannot write: a file, a run
        it would replace without --overwrite, a folder it cannot write to. Nothing is created but the lock."""
        final, real = self.final, self.real
        if final.exists() and not final.is_dir():
            raise TrainingError(f"output dir {final} is a file; choose another --output-dir.")
        if overwrite and (real == Path.cwd() or real in Path.cwd().parents):
            raise TrainingError(f"--overwrite would replace {final}, which holds the current directory; run from "
                                "elsewhere or choose another --output-dir.")  # fmt: skip
        self._made = [p for p in (real.parent, *real.parent.parents) if not p.exists()]
        try:
            real.parent.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
        except PermissionError as e:
            raise TrainingError(f"cannot write to output dir {final}: its folder {final.parent} is not writable "
                                f"({e.strerror}); choose a writable --output-dir.") from e  # fmt: skip
        except OSError as e:
            raise TrainingError(f"cannot write to output dir {final} ({e}); choose a writable --output-dir.") from e
        self._tidy()
        occupied = final.is_dir() and any(final.iterdir()) and not resume
        if occupied and not overwrite:
            raise TrainingError(
                f"output dir {final} already holds files; pass --resume to continue that run, --overwrite to "
                "start over in it, or choose another --output-dir."
            )
        if occupied:
            self.work = self.staging
        elif final.is_dir():
            _probe(final)

    def _tidy(self) -> None:
        """Finish or undo what a run killed during --overwrite left (we hold the lock: no live run owns it)."""
        final, real, staging, replaced = self.final, self.real, self.staging, self.replaced
        if replaced.exists():
            if not real.exists() and staging.exists():  # killed between the swap's renames: the new run finished
                os.replace(staging, real)
                note(f"finished replacing {final} with the run that had completed before it was interrupted.")
            elif not real.exists():
                os.replace(replaced, real)
            shutil.rmtree(replaced, ignore_errors=True)
        if staging.exists():
            shutil.rmtree(staging)
            note(f"removed {staging}, left by a run killed during --overwrite before it finished; the previous run "
                 f"in {final} is intact.")  # fmt: skip

    def prepare(self) -> Path:
        """Make the directory this run writes (a fresh staging directory under --overwrite)."""
        if self.staged:
            shutil.rmtree(self.staging, ignore_errors=True)
        try:
            self.work.mkdir(parents=True, exist_ok=True)
            _probe(self.work)
        except OSError as e:
            raise TrainingError(f"cannot write to output dir {self.work} ({e}); choose a writable --output-dir.") from e
        return self.work

    def finish(self) -> None:
        """Swap a staged run into place; the previous run is removed only once the new one stands there."""
        if self.staged:
            os.replace(self.real, self.replaced)
            os.replace(self.staging, self.real)
            shutil.rmtree(self.replaced, ignore_errors=True)
            self.work = self.final

    def close(self) -> None:
        """Drop a staged run that did not finish, and release the lock."""
        if self.staged:
            shutil.rmtree(self.staging, ignore_errors=True)
        self.lock.release()
        for folder in self._made:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()


def _probe(directory: Path) -> None:
    try:
        probe = directory / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"cannot write to output dir {directory} ({e}); choose a writable --output-dir.") from e
