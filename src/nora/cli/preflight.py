"""Checks a command makes before any slow step, so that a mistake costs seconds, not a finished run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import AdapterError


def check_writable(path: Path, flag: str) -> None:
    """Refuse now an output `path` (a file, or a directory written whole) that could not be written at the end.
    nora writes outputs atomically, through a temporary sibling, so the folder that holds `path` (or the nearest one
    above it that exists, where the rest will be created) must take new files; a probe file is made and removed."""
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise AdapterError(f"{flag} {path}: {folder} is a file, not a folder; give a path in a folder.")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".nora-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise AdapterError(
            f"{flag} {path}: nothing can be written in {folder} ({e.strerror or e}); choose a folder you can write "
            "to, or change its permissions, before the run rather than after it."
        ) from e
