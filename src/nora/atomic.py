"""Atomic writes: a file or directory is either the old one or the complete new one, never half-written, and it
ends with the permissions a plain write would have given it (tempfile makes 0600 files and 0700 directories)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file


def umask() -> int:
    """The process umask (read without changing it where Linux reports it; os.umask alone can only set it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(directory: bool = False) -> int:
    """The mode open() or mkdir() would give a new file or directory under the current umask."""
    return (0o777 if directory else 0o666) & ~umask()


def _atomic(path: Path, write: Callable[[Path], None], mode: int | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, plain_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def write(tmp: Path) -> None:
        try:
            save_file(cpu, str(tmp), metadata=metadata)
        except SafetensorError as e:  # a full disk is an I/O error like any other write's: an OSError naming the file
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e

    _atomic(Path(path), write)


def atomic_write_bytes(data: bytes, path: str | os.PathLike, mode: int | None = None) -> None:
    """`data` into `path` atomically, with the mode a new file gets (or `mode`, e.g. 0o600 for a secret)."""
    _atomic(Path(path), lambda tmp: tmp.write_bytes(data), mode)


def atomic_write_json(obj: object, path: str | os.PathLike) -> None:
    _atomic(Path(path), lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def atomic_replace_dir(build: Callable[[Path], None], target: str | os.PathLike) -> None:
    """Build a directory in a sibling temp dir, then swap it into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        build(tmp)
        os.chmod(tmp, plain_mode(directory=True))
        if target.exists() or target.is_symlink():
            old = target.with_name(f".{target.name}.old")
            _remove(old)
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)  # a symlinked target: the link goes, what it pointed at stays
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)
