"""A worker's client of the shards: fetch, push, and the bound on a shard's backlog.

A fetch is `Rget_accumulate(NO_OP)` of the worker's segments (element-atomic: every value
read is one the element held, dbmpi.ps.store); a push is `Raccumulate(SUM)` into the
inboxes, completed at the next push or at the end (so it overlaps the next step), flushed,
then counted in the control block: the data is in the inbox before PUSHES says so.
Transfers go out as requests of at most FETCH_CHUNK values: MPICH slows down on single
accumulate-class transfers of hundreds of MB. Cost (bench/rma.py, MPICH 5.0.2, shared
memory, 64 MB): a fetch runs at 0.9-0.95x memcpy, a push (a read-modify-write) at 0.5-0.7x.

A shard that falls behind would merge its whole backlog into one update (one Adagrad step
the size of the learning rate in every coordinate), so a client given `max_backlog` waits
after a push while the shard's undrained pushes (PUSHES - ABSORBED) exceed it.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from mpi4py import MPI

from dbmpi import kernels
from dbmpi.ps.control import Slot, first_push_after, pushes_by_replica, staleness_bucket
from dbmpi.ps.windows import NO_ORIGIN, ParameterWindows
from dbmpi.runtime.layout import Segment

FETCH_CHUNK = 4 * 2**20  # values (16 MB) per fetch or push request


class ShardClient:
    """A worker's view of the shards that hold its parameter ranges.

    `ranges` are canonical [start, stop) ranges (a whole replica: [(0, n_params)]; a model
    partition: its own blocks of every layer). The worker's local vector is their
    concatenation, and only the shards holding them are read, written and counted.
    """

    def __init__(self, windows: ParameterWindows, replica: int, ranges, max_backlog: int | None = None,
                 wait: Callable[[Callable[[], bool]], object] | None = None):
        """`max_backlog`: after a push, wait with `wait(done)` (the caller's polite poll,
        e.g. dbmpi.runtime.failover.Liveness.wait) while a shard holds more than this many pushes it
        has not drained yet, so a shard that falls behind (busy, descheduled) never merges a
        long backlog into one update. None: never wait."""
        if max_backlog is not None and wait is None:
            raise ValueError("ShardClient: max_backlog needs a wait")
        self.windows = windows
        self.max_backlog = max_backlog
        self.wait = wait
        self.backlog_waits = 0  # pushes after which this worker waited for a shard
        self.layout = windows.layout
        self.replica = replica
        self.ranges = [(int(a), int(b)) for a, b in ranges]
        self.segments: list[Segment] = []
        local = 0
        for start, stop in self.ranges:
            for seg in self.layout.segments(start, stop):
                self.segments.append(Segment(seg.shard, seg.shard_offset, seg.count, local + seg.local_offset))
            local += stop - start
        self.size = local
        self.seg_ranks = [self.layout.shard_rank(seg.shard) for seg in self.segments]
        self.shards = sorted({seg.shard for seg in self.segments})
        self.ranks = [self.layout.shard_rank(k) for k in self.shards]  # each shard once
        self.versions = np.zeros(len(self.shards), np.int64)  # shard versions at last fetch
        self.fetches = 0
        self.pushes = 0
        self.rejected = 0
        self.bytes_fetched = 0
        self.bytes_pushed = 0
        self.staleness: list[int] = []
        self._pending: list[MPI.Request] = []
        self._pending_staleness = False
        windows.lock_shards()

    def fetch(self, out: np.ndarray) -> None:
        """Read the current values of the ranges into `out` (one-sided, element-atomic)."""
        self.finish_push()
        control, params = self.windows.block, self.windows.params
        for i, rank in enumerate(self.ranks):
            self.versions[i] = control.read(rank, Slot.VERSION)
        requests = []
        for seg, rank in zip(self.segments, self.seg_ranks, strict=True):
            # Pieces of at most FETCH_CHUNK values: MPICH slows down on very large
            # accumulate-class reads (bench/rma.py: 0.35x memcpy at 256 MB in one piece).
            for lo in range(0, seg.count, FETCH_CHUNK):
                count = min(FETCH_CHUNK, seg.count - lo)
                view = out[seg.local_offset + lo:seg.local_offset + lo + count]
                requests.append(params.Rget_accumulate(NO_ORIGIN, view, rank,
                                                       target=(seg.shard_offset + lo, count, MPI.FLOAT),
                                                       op=MPI.NO_OP))
        MPI.Request.Waitall(requests)
        self.fetches += 1
        self.bytes_fetched += 4 * self.size

    def push(self, grad: np.ndarray, nonfinite: int | None = None) -> bool:
        """Start adding `grad` (the accrued gradient of the ranges) into the shards' inboxes.

        A non-finite gradient is withheld and counted instead; `nonfinite`, when the caller
        already knows it (kernels.axpy_count_nonfinite while accruing), saves a pass. The
        push completes in finish_push (called by the next push, or finish), so it overlaps
        the next step's fetch and compute; `grad` must not change until then.
        """
        self.finish_push()
        if nonfinite is None:
            nonfinite = kernels.count_nonfinite(grad)
        if nonfinite:
            self.rejected += 1
            self.windows.block.add(self.ranks[0], Slot.REJECTED)
            return False
        inbox = self.windows.inbox
        for seg, rank in zip(self.segments, self.seg_ranks, strict=True):
            for lo in range(0, seg.count, FETCH_CHUNK):
                count = min(FETCH_CHUNK, seg.count - lo)
                view = grad[seg.local_offset + lo:seg.local_offset + lo + count]
                self._pending.append(inbox.Raccumulate(view, rank, target=(seg.shard_offset + lo, count, MPI.FLOAT),
                                                       op=MPI.SUM))
        self._pending_staleness = True
        self.bytes_pushed += 4 * self.size
        return True

    def finish_push(self) -> None:
        """Complete an outstanding push at the shards, then count it there."""
        if not self._pending_staleness:
            return
        MPI.Request.Waitall(self._pending)
        self._pending.clear()
        inbox, control = self.windows.inbox, self.windows.block
        for rank in self.ranks:
            inbox.Flush(rank)  # the data is in the inbox before the counter says so
        for i, rank in enumerate(self.ranks):
            staleness = control.read(rank, Slot.VERSION) - int(self.versions[i])
            self.staleness.append(staleness)
            control.add(rank, Slot.HIST + staleness_bucket(staleness))
            first = control.add(rank, pushes_by_replica(self.replica)) == 0
            before = control.add(rank, Slot.PUSHES)  # last: the shard may drain from here on
            if first:
                control.add(rank, first_push_after(self.replica), before + 1)
            if self.max_backlog is not None:
                self._bound_backlog(rank, before + 1 - self.max_backlog)
        self.pushes += 1
        self._pending_staleness = False

    def _bound_backlog(self, rank: int, absorbed: int) -> None:
        """Wait until shard `rank` has drained at least `absorbed` pushes."""
        control = self.windows.block
        if absorbed <= 0 or control.read(rank, Slot.ABSORBED) >= absorbed:
            return
        self.backlog_waits += 1
        self.wait(lambda: control.read(rank, Slot.ABSORBED) >= absorbed)

    def shard_versions(self) -> list[int]:
        """The update count of every shard (for progress lines)."""
        return [self.windows.block.read(self.layout.shard_rank(k), Slot.VERSION)
                for k in range(self.layout.n_shards)]

    def finish(self) -> None:
        """Complete everything and tell every shard this worker is done."""
        self.finish_push()
        control = self.windows.block
        for k in range(self.layout.n_shards):
            control.add(self.layout.shard_rank(k), Slot.WORKERS_DONE)

    def close(self) -> None:
        self.windows.unlock_shards()
