"""Atomic file replacement: readers see the old file or the whole new one, never a part.

The new content goes to `.NAME.tmp-PID` beside the target; on success it is fsynced, renamed
over the target and the directory is fsynced, so the rename survives a crash; on any error
(Ctrl-C included) the temp file is removed and the target is untouched.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable (where the platform can open directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # e.g. Windows: directories cannot be opened; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temp path to write `target`'s new content to; it replaces `target` when the
    block ends without error (the writer need not fsync: this does it after closing)."""
    target = Path(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace the text file at `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
