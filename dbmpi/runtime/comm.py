"""Point-to-point habits every role shares: how a rank waits, sends, receives, agrees and
gives up.

Ranks often share cores (more ranks than cores on a laptop, shards beside workers on a
node), and MPICH's blocking calls spin. So no rank waits inside a blocking MPI call for a
message that may take long: it polls a nonblocking one with `poll`, which spins briefly
(replies usually come that fast), then sleeps with exponential back-off
(dbmpi.runtime.poll, the only waiting loop of the package).

The message tags of the whole package are one enum, so no two protocols can collide.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from enum import IntEnum

from mpi4py import MPI

from dbmpi.runtime.poll import HIGH_S, LOW_S, poll

SPIN_S = 5e-5  # how long a waiting rank polls before it starts to sleep


class Tag(IntEnum):
    """Message tags. 10x: Sandblaster's replicas, coordinator and shards; 20x: Downpour's
    checkpoints and end of run; 30x: none is ever sent."""

    REQUEST = 101  # a replica asks the coordinator for work (and reports what it did)
    REPLY = 102  # the coordinator's answer: a portion, wait, or stop
    RESULT = 103  # a replica's loss and count for a batch
    WAKE = 104  # the coordinator wakes the shards after a batch
    RECORDS = 105  # every live rank's records at the end
    VERDICT = 106  # how a Sandblaster run ends
    CKPT_STATE = 201  # the acting lead's state to shard 0 (periodic checkpoints)
    SLICE = 202  # a shard's slice file record (name, range, checksums) to shard 0
    FINAL = 203  # every worker's records (and a replica's final state) to shard 0
    CKPT_ORDER = 204  # shard 0 orders the other shards to stream their slices (its step)
    CKPT_LAST = 205  # shard 0's last order: the final checkpoint's step, or False
    OUTCOME = 206  # shard 0 to every rank that reads the verdict: None, or why it diverged
    SLICE_VERSION = 207  # a shard's update count at its snapshot, sent before its slices
    EVAL = 208  # the final evaluation: shard 0's test rows to score (or None), a piece's scores back
    PROGRESS = 301  # never sent: an Iprobe for it only drives MPI progress (dbmpi.ps.store)


class ThreadSupportError(ValueError):
    """The MPI library does not give the thread support a run needs (a launch setting)."""


_THREAD_LEVELS = {MPI.THREAD_SINGLE: "MPI_THREAD_SINGLE", MPI.THREAD_FUNNELED: "MPI_THREAD_FUNNELED",
                  MPI.THREAD_SERIALIZED: "MPI_THREAD_SERIALIZED", MPI.THREAD_MULTIPLE: "MPI_THREAD_MULTIPLE"}


def require_thread_support(environ=os.environ) -> None:
    """Refuse a launch whose MPI thread level is below what the run needs, on every rank and
    before any collective. dbmpi's own design needs MPI_THREAD_FUNNELED: its watchdog
    threads make no MPI call, and shards drive MPI progress from their own loop
    (dbmpi.ps.store), not from a thread. MPICH's progress thread, if a user asks for it
    (MPIR_CVAR_ASYNC_PROGRESS=1), needs MPI_THREAD_MULTIPLE."""
    provided = MPI.Query_thread()
    need, who = MPI.THREAD_FUNNELED, "dbmpi's watchdog threads (they make no MPI calls)"
    if environ.get("MPIR_CVAR_ASYNC_PROGRESS", "0").strip() not in ("", "0"):
        need, who = MPI.THREAD_MULTIPLE, "MPIR_CVAR_ASYNC_PROGRESS=1 (MPICH's progress thread)"
    if provided < need:
        raise ThreadSupportError(
            f"{who} need {_THREAD_LEVELS[need]}, but MPI was initialised with {_THREAD_LEVELS[provided]}; "
            "launch with MPI4PY_RC_THREAD_LEVEL=multiple (mpi4py's default) or an MPI built with thread support")


Poll = Callable[[Callable[[], bool]], object]  # poll, or a heartbeat-keeping variant of it
Comm = MPI.Intracomm  # what the orchestrators (dbmpi.algorithms) name a communicator, without mpi4py


def world_comm() -> Comm:
    """The world communicator (MPI.COMM_WORLD): a run's default."""
    return MPI.COMM_WORLD


def wait(request: MPI.Request, spin: float = SPIN_S, low: float = LOW_S, high: float = HIGH_S):
    """Complete a pickled-object request (comm.irecv, ...) politely; returns its message."""
    result = []

    def test() -> bool:
        done, value = request.test()
        if done:
            result.append(value)
        return done

    poll(test, spin=spin, low=low, high=high)
    return result[0]


def Wait(request: MPI.Request, spin: float = SPIN_S, low: float = LOW_S, high: float = HIGH_S) -> None:
    """Complete a buffer request (Irecv, Isend, ...) politely."""
    poll(request.Test, spin=spin, low=low, high=high)


def send(comm: MPI.Intracomm, obj, dest: int, tag: int, wait_for: Poll = poll) -> None:
    """Send a pickled message (synchronous mode) and wait politely until a matching receive
    has taken it: what the sender does next (dying included) cannot lose it."""
    request = comm.issend(obj, dest=dest, tag=tag)
    wait_for(lambda: request.Test())


def receive(comm: MPI.Intracomm, source: int, tag: int, wait_for: Poll = poll):
    """A pickled message, waited for politely: a matched probe (any size fits), then a
    nonblocking receive, so a sender that dies mid-transfer never blocks this rank inside
    MPI (a heartbeat kept by `wait_for` notices)."""
    pending: list = []
    got: list = []

    def arrived() -> bool:
        if not pending:
            message = comm.improbe(source=source, tag=tag)
            if message is None:
                return False
            pending.append(message.irecv())
        done, obj = pending[0].test()
        if done:
            got.append(obj)
        return done

    wait_for(arrived)
    return got[0]


def agree(comm: MPI.Intracomm, action: Callable[[], object], errors: tuple[type[Exception], ...], root: int = 0):
    """Run `action` on `root` and share its outcome: every rank returns the same value or
    raises the same error (one of `errors`), so no rank is left waiting on one that gave up."""
    outcome = None
    if comm.rank == root:
        try:
            outcome = ("ok", action())
        except errors as exc:
            outcome = ("error", type(exc).__name__, str(exc))
    outcome = comm.bcast(outcome, root=root)
    if outcome[0] == "error":
        kind = {cls.__name__: cls for cls in errors}[outcome[1]]
        raise kind(outcome[2])
    return outcome[1]


def stderr_line(text: str) -> None:
    """Write one line to stderr at once (lines of different ranks do not interleave)."""
    sys.stderr.write(text.rstrip("\n") + "\n")
    sys.stderr.flush()


def abort_on_error(comm: MPI.Intracomm, exc: BaseException) -> None:
    """An unexpected error on one rank ends the whole job instead of leaving peers waiting."""
    stderr_line(f"dbmpi: error on rank {comm.rank}: {type(exc).__name__}: {exc}")
    time.sleep(0.5)  # let the launcher forward the message before the abort kills the job
    comm.Abort(1)
