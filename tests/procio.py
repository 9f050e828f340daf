"""Bytes a process reads, from Linux's /proc/self/io: `rchar` counts every byte that read()
and pread() returned (page cache included), so it measures what a process asks of the
file, not what the disk served."""
from __future__ import annotations

from pathlib import Path

import pytest

PROC_IO = Path("/proc/self/io")


def bytes_read() -> int:
    """This process's `rchar` so far (skips the test where /proc/self/io is missing)."""
    if not PROC_IO.exists():
        pytest.skip("no /proc/self/io")
    for line in PROC_IO.read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    pytest.skip("/proc/self/io has no rchar")
