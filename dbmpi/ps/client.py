"""A worker's client of the shards: fetch, push, and the bound on a shard's backlog.

Round trips per shard (counted in tests/test_client_rma.py; independent of the numbers of
replicas, shards and workers):

- a fetch issues the version read and the data reads together (`Get_accumulate(NO_OP)`,
  element-atomic: every value read is one the element held, dbmpi.ps.store), then flushes:
  one round trip, none before it. The version is read in the same round trip, so the
  staleness of a push (the shard's version at the push minus the version at the fetch) is
  exact up to the updates the shard published during the fetch itself;
- a push is its `Accumulate(SUM)` into the inbox, completed at the next push or fetch,
  flushed, then one `exchange` on the control block that adds one to PUSHES and the
  shard version the gradient was computed from to FETCHED, and returns VERSION and ABSORBED
  beside them (dbmpi.ps.control): the data is in the inbox before PUSHES says so, the
  push's staleness and the shard's backlog come back with the count, and the shard can
  measure the staleness of what it drains (dbmpi.ps.staleness). At a
  fetch the exchange goes out with the fetch's reads, so a step that pushes and fetches
  waits for two round trips per shard: the push's data, then the count and the fetch. The
  operations to all shards are issued before any is waited for.

Transfers go out as operations of at most FETCH_CHUNK values: MPICH slows down on single
accumulate-class transfers of hundreds of MB. The worker counts what the shards used to
count per push (the staleness histogram, the pushes before its first one): it reports
them in its records (`counts()`).

A shard that falls behind would merge its whole backlog into one update (one Adagrad step
the size of the learning rate in every coordinate), so a client given `max_backlog` waits
after a push while the shard's undrained pushes (PUSHES - ABSORBED) exceed it.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from mpi4py import MPI

from dbmpi import kernels
from dbmpi.ps.control import N_BUCKETS, PUSH_SLOTS, Slot, push_amounts, staleness_bucket
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
        self._fetched_versions = np.zeros(len(self.shards), np.int64)
        self.fetches = 0
        self.pushes = 0
        self.rejected = 0
        self.bytes_fetched = 0
        self.bytes_pushed = 0
        self.staleness: list[int] = []
        # Per shard of self.shards: the staleness histogram of this worker's pushes, and the
        # pushes (of anyone) the shard had counted before this worker's first one (-1: none yet).
        self.histograms = np.zeros((len(self.shards), N_BUCKETS), np.int64)
        self.first_push_after = np.full(len(self.shards), -1, np.int64)
        self._exchanged = np.zeros((len(self.shards), PUSH_SLOTS), np.int64)
        self._amounts = push_amounts(len(self.shards))  # each shard's exchange origin
        self._pending = False
        windows.lock_shards()

    def fetch(self, out: np.ndarray) -> None:
        """Read the current values of the ranges into `out` (one-sided, element-atomic).
        A pending push is counted in the same round trip: its data flushed first, then its
        exchange issued beside the version and data reads."""
        counting = self._start_count()
        control, params = self.windows.block, self.windows.params
        for i, rank in enumerate(self.ranks):
            control.start_read(rank, Slot.VERSION, self._fetched_versions[i:i + 1])
        for seg, rank in zip(self.segments, self.seg_ranks, strict=True):
            # Pieces of at most FETCH_CHUNK values: MPICH slows down on very large
            # accumulate-class reads (bench/rma.py: 0.35x memcpy at 256 MB in one piece).
            for lo in range(0, seg.count, FETCH_CHUNK):
                count = min(FETCH_CHUNK, seg.count - lo)
                view = out[seg.local_offset + lo:seg.local_offset + lo + count]
                params.Get_accumulate(NO_ORIGIN, view, rank, target=(seg.shard_offset + lo, count, MPI.FLOAT),
                                      op=MPI.NO_OP)
        for rank in self.ranks:
            params.Flush(rank)
            control.flush(rank)
        if counting:
            self._end_count()  # its staleness against the previous fetch's versions
        self.versions[:] = self._fetched_versions
        self.fetches += 1
        self.bytes_fetched += 4 * self.size

    def push(self, grad: np.ndarray, nonfinite: int | None = None) -> bool:
        """Start adding `grad` (the accrued gradient of the ranges) into the shards' inboxes.

        A non-finite gradient is withheld and counted instead; `nonfinite`, when the caller
        already knows it (kernels.axpy_count_nonfinite while accruing), saves a pass. The
        push completes in finish_push (called by the next push or fetch, or finish), so it
        overlaps the next step's compute; `grad` must not change until then.
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
                inbox.Accumulate(view, rank, target=(seg.shard_offset + lo, count, MPI.FLOAT), op=MPI.SUM)
        self._pending = True
        self.bytes_pushed += 4 * self.size
        return True

    def finish_push(self) -> None:
        """Complete an outstanding push at the shards, then count it there (one exchange
        per shard, issued together)."""
        if self._start_count():
            for rank in self.ranks:
                self.windows.block.flush(rank)
            self._end_count()

    def _start_count(self) -> bool:
        """If a push is pending: complete its data at the shards, then issue its exchanges
        (completed by the caller's flush of the control window). False if none is."""
        if not self._pending:
            return False
        inbox, control = self.windows.inbox, self.windows.block
        for rank in self.ranks:
            inbox.Flush(rank)  # the data is in the inbox before the counter says so
        self._amounts[:, Slot.FETCHED] = self.versions  # what the pushed gradient was computed from
        for i, rank in enumerate(self.ranks):
            control.start_exchange(rank, Slot.VERSION, self._amounts[i], self._exchanged[i])
        return True

    def _end_count(self) -> None:
        """Record the counted push: its staleness, the shards' first-push counts, and wait
        while a shard's backlog exceeds the bound."""
        for i, rank in enumerate(self.ranks):
            version, before, absorbed = (int(v) for v in self._exchanged[i, :Slot.FETCHED])
            staleness = version - int(self.versions[i])
            self.staleness.append(staleness)
            self.histograms[i, staleness_bucket(staleness)] += 1
            if self.first_push_after[i] < 0:
                self.first_push_after[i] = before
            if self.max_backlog is not None:
                self._bound_backlog(rank, before + 1 - self.max_backlog, absorbed)
        self.pushes += 1
        self._pending = False

    def _bound_backlog(self, rank: int, absorbed: int, seen: int) -> None:
        """Wait until shard `rank` has drained at least `absorbed` pushes (`seen`: its
        ABSORBED count as the push was counted)."""
        control = self.windows.block
        if absorbed <= 0 or seen >= absorbed:
            return
        self.backlog_waits += 1
        self.wait(lambda: control.read(rank, Slot.ABSORBED) >= absorbed)

    def shard_versions(self) -> list[int]:
        """The update count of every shard (for progress lines)."""
        return [self.windows.block.read(self.layout.shard_rank(k), Slot.VERSION)
                for k in range(self.layout.n_shards)]

    def counts(self) -> dict:
        """What the shards used to count per push, for this worker's records: per shard
        (by index) its pushes, their staleness histogram and the pushes before the first."""
        return {"shards": self.shards, "pushes_by_shard": [self.pushes] * len(self.shards),
                "staleness_histogram_by_shard": self.histograms.tolist(),
                "first_push_after_by_shard": self.first_push_after.tolist()}

    def finish(self) -> None:
        """Complete everything and tell every shard this worker is done."""
        self.finish_push()
        control = self.windows.block
        for k in range(self.layout.n_shards):
            control.add(self.layout.shard_rank(k), Slot.WORKERS_DONE)

    def close(self) -> None:
        self.windows.unlock_shards()
