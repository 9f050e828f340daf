"""The control block: every shard's window of int64 counters, read and bumped with
one-sided atomics.

The parameter server's own counters come first (what a shard applied and what was pushed
to it), then the run protocol that shard 0 hosts for everyone (warmstart, checkpoints,
stops, the end of the run), then a pair of slots per replica and a heartbeat per worker.
Every slot is named by `Slot`; the per-replica and per-worker ones by the methods below.

Atomicity: every access is MPI_Fetch_and_op on one int64 (MPI_SUM to add, MPI_NO_OP to
read) followed by a flush, so concurrent updates from any number of ranks never lose an
increment, and a value read is one that was there. Ordering between a push's data and its
count comes from the flush: a worker flushes its accumulate into the inbox before it adds
to PUSHES, so a shard that reads the count finds the data (dbmpi.ps.client).
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np
from mpi4py import MPI

N_BUCKETS = 16  # histograms: 0, 1, 2-3, 4-7, ..., >= 2**14


class Slot(IntEnum):
    """Fixed slots of a shard's control block."""

    # The parameter server (on every shard)
    VERSION = 0  # updates the shard applied
    PUSHES = 1  # pushes completed into the inbox (a worker adds 1 after its data is flushed)
    ABSORBED = 2  # the PUSHES count as of the shard's last drain: PUSHES - ABSORBED is the backlog
    WORKERS_DONE = 3  # workers that finished for good (in Downpour counted by shard 0)
    WORKERS_FAILED = 4  # workers shard 0 declared failed (they count as finished)
    REJECTED = 5  # pushes replicas withheld because the gradient was not finite
    DROPPED = 6  # drains the shard dropped because they were not finite
    DRAINS = 7  # drains that found data
    SHARD_BEAT = 8  # this shard's heartbeat, bumped from its own loops
    HIST = 9  # N_BUCKETS slots: the staleness histogram of the pushes
    # The run protocol (read on shard 0)
    CHECKPOINTS = HIST + N_BUCKETS  # checkpoints the lead has asked for
    STOPS = CHECKPOINTS + 1  # stop requests (signals) any rank has relayed
    WARMED = STOPS + 1  # 1 once replica 0 has finished warmstart: the other replicas start
    VERDICT = WARMED + 1  # how the run ends, set by shard 0 once everything is written
    RELEASED = VERDICT + 1  # ranks that read a FAILED verdict and are leaving
    PER_REPLICA = RELEASED + 1  # first per-replica slot


VERDICT_CLEAN, VERDICT_FAILED = 1, 2  # no failure: collective teardown; else point to point only
# A worker's heartbeat slot (on shard 0) counts its beats; these marks are added to it once.
FAILED_MARK = 1 << 40  # shard 0 declared the worker failed
DONE_MARK = 1 << 50  # the worker finished and sent its records
BEATS = FAILED_MARK - 1  # the mask of the beat count


def control_size(n_replicas: int, n_workers: int = 0) -> int:
    """int64 slots: the fixed ones, then per replica its pushes and the number of pushes (of
    anyone) the shard had received before its first one, plus one (0 until it pushes): the
    record that shows warmstart was honoured; then per worker its heartbeat."""
    return Slot.PER_REPLICA + 2 * n_replicas + n_workers


def pushes_by_replica(replica: int) -> int:
    return Slot.PER_REPLICA + 2 * replica


def first_push_after(replica: int) -> int:
    return Slot.PER_REPLICA + 2 * replica + 1


def staleness_bucket(staleness: int) -> int:
    """Histogram bucket: 0 -> 0, 1 -> 1, 2-3 -> 2, 4-7 -> 3, ... capped at N_BUCKETS - 1."""
    return min(max(int(staleness), 0).bit_length(), N_BUCKETS - 1)


def bucket_label(bucket: int) -> str:
    if bucket <= 1:
        return str(bucket)
    lo, hi = 2 ** (bucket - 1), 2**bucket - 1
    return f">={lo}" if bucket == N_BUCKETS - 1 else f"{lo}-{hi}"


_ZERO = np.zeros(1, np.int64)


class ControlBlock:
    """The control window of every shard (inside an open passive-target epoch)."""

    def __init__(self, win: MPI.Win, n_replicas: int):
        self.win = win
        self.n_replicas = n_replicas

    def _fetch_op(self, rank: int, slot: int, value: np.ndarray, op) -> int:
        result = np.empty(1, np.int64)
        self.win.Fetch_and_op(value, result, rank, slot, op)
        self.win.Flush(rank)
        return int(result[0])

    def read(self, rank: int, slot: int) -> int:
        """Atomically read one slot of the block on `rank`."""
        return self._fetch_op(rank, slot, _ZERO, MPI.NO_OP)

    def add(self, rank: int, slot: int, amount: int = 1) -> int:
        """Atomically add to one slot of the block on `rank`; returns the old value."""
        return self._fetch_op(rank, slot, np.array([amount], np.int64), MPI.SUM)

    def heartbeat(self, worker_rank: int) -> int:
        """The slot of a worker's heartbeat (meaningful on shard 0)."""
        return Slot.PER_REPLICA + 2 * self.n_replicas + worker_rank

    def read_all(self, rank: int, n_workers: int) -> np.ndarray:
        """The whole block on `rank` at once (element-atomic)."""
        values = np.empty(control_size(self.n_replicas, n_workers), np.int64)
        self.win.Get_accumulate([None, 0, MPI.INT64_T], values, rank, target=(0, values.size, MPI.INT64_T),
                                op=MPI.NO_OP)
        self.win.Flush(rank)
        return values
