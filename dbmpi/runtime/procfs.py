"""Processes on this host, seen through Linux's /proc: whether one is gone, and which MPICH
shared-memory files one maps. MPI-free (dbmpi.runtime.supervise uses it too).

A process is named by its pid and its start time (field 22 of /proc/PID/stat, in clock ticks
since boot), so a pid the kernel reuses for another process never passes for the old one. A
zombie (dead, not yet reaped by its parent) counts as gone.
"""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

SHM_DIR = "/dev/shm"
MPICH_SHM_PREFIXES = ("mpich_shm_", "mpich_vci_")
# The Slurm Prolog/Epilog that removes MPICH segments nothing uses; given paths, it handles
# exactly those (one implementation of "unused, so removed").
SHM_CLEANUP_SCRIPT = Path(__file__).resolve().parents[2] / "jobs" / "slurm" / "mpich-shm-cleanup.sh"


def start_time(pid: int) -> int | None:
    """The start time of a live process, or None when it is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def identity(pid: int | None = None) -> tuple[int, int | None]:
    """(pid, start time) of a process (this one by default)."""
    pid = os.getpid() if pid is None else pid
    return pid, start_time(pid)


def gone(ident: tuple[int, int | None]) -> bool:
    """Whether the process named by `identity()` has ended (or its pid names another one)."""
    pid, started = ident
    return started is None or start_time(pid) != started


def host_peers(comm) -> dict[int, tuple[int, int | None]]:
    """Collective over `comm` (an mpi4py communicator): rank -> identity of every rank on
    this host whose process this one can see (not in another PID namespace)."""
    peers = comm.allgather((socket.gethostname(), identity()))
    host = peers[comm.rank][0]
    return {r: ident for r, (name, ident) in enumerate(peers) if name == host and not gone(ident)}


def lowest_alive(peers: dict[int, tuple[int, int | None]], me: int) -> int:
    """The lowest rank of `peers` (host_peers) still alive, `me` included: the one that
    speaks for the host when a peer dies, so that the job gets one line."""
    return min(r for r, ident in peers.items() if r == me or not gone(ident))


def mpich_shm_files(pid: int) -> set[str]:
    """The MPICH shared-memory files (/dev/shm/mpich_shm_*, mpich_vci_*) a process maps."""
    found = set()
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(None, 5)[-1]  # " (deleted)" once unlinked: skipped
                if path.startswith(SHM_DIR + "/") and Path(path).name.startswith(MPICH_SHM_PREFIXES) \
                        and not path.endswith(" (deleted)"):
                    found.add(path)
    except OSError:
        pass
    return found


def remove_unused(paths, script: Path = SHM_CLEANUP_SCRIPT) -> str:
    """Remove those of `paths` that no process maps or holds open, with the Slurm cleanup
    script (jobs/slurm/mpich-shm-cleanup.sh); returns its report ('' if there is no script,
    e.g. a wheel install without the jobs/ folder)."""
    paths = sorted(paths)
    if not paths or not script.is_file():
        return ""
    done = subprocess.run(["bash", str(script), *paths], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, check=False)
    return done.stdout
