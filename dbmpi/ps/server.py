"""Downpour's sharded parameter server on one-sided MPI RMA windows.

Each shard exposes three windows made by `MPI.Win.Allocate` on the window communicator
(shards and workers; a worker exposes zero bytes):

- `params` (float32, disp_unit 4): the shard's slice of the canonical parameter vector;
- `inbox` (float32): the gradients replicas push, summed in place;
- `control` (int64, disp_unit 8): counters (version, pushes, ...) and a staleness histogram.

Workers and shards open one passive-target epoch per window and shard rank (`Lock(rank,
LOCK_SHARED)`, shards only: workers expose nothing) for the whole run and complete each
operation with `Flush` or a request. Per-target epochs, not `Lock_all`: with MPICH, closing a
`Lock_all` epoch waits on every rank of the window, so one dead replica would block the
others at the end of a run; a per-target epoch involves only the shards (and after a failure
the survivors leave without closing anything: dbmpi.runtime.failover). A fetch is
`Rget_accumulate(NO_OP)` of the replica's segments; a push is `Raccumulate(SUM)` into the
inbox, flushed, then counted.

Why every concurrent access is well-defined. MPI lets accumulate operations on the same
location run concurrently when they use the same operation or MPI_NO_OP (the default
`accumulate_ops = same_op_no_op`), and each is atomic per element of a predefined type.
Every access to shard memory, the shard's own included, is such an operation; the shard
never loads or stores its window memory directly:

- inbox: workers `Accumulate(SUM)`; the shard drains it with `Get_accumulate(NO_OP)`, then
  `Accumulate(SUM)` of the negated values it read. A push that lands between the two stays
  in the inbox for the next drain, so no update is lost or counted twice;
- params: the shard updates a private working copy and publishes it with
  `Accumulate(REPLACE)`; workers read with `Get_accumulate(NO_OP)`. Every element a fetch
  returns is a value that element held (never a torn value), though one fetch may mix
  elements from before and after an update: the loose consistency Downpour accepts;
- control: only `Fetch_and_op` with SUM or NO_OP.

Cost (bench/rma.py, MPICH 5.0.2, shared memory, 64 MB): a fetch runs at 0.9-0.95x memcpy,
a push (a read-modify-write) at 0.5-0.7x, the shard's drain (four passes) at about 0.25x.
Plain Get measured within 5% of Get_accumulate(NO_OP) here, so being well-defined costs
little. Transfers go out as requests of at most FETCH_CHUNK values: MPICH slows down on
single accumulate-class transfers of hundreds of MB.

A shard that falls behind would merge its whole backlog into one update (one Adagrad step
the size of the learning rate in every coordinate), so a client given `max_backlog` waits
after a push while the shard's undrained pushes (PUSHES - ABSORBED) exceed it; each update
records how many pushes it merged.

The shard loop polls its push counter through MPI (each poll is an RMA call, which also
drives progress of passive-target operations on implementations without a progress
thread) and sleeps with exponential back-off when idle, so it never spins a core.
NaN or Inf never reach the parameters: replicas withhold non-finite pushes and count them;
a shard that still drains a non-finite value drops that drain and counts it. (Such a value
cannot be cleared from the inbox with the operations allowed concurrently with SUM, so a
shard that ever drains one keeps dropping the affected drains: the parameters stay finite
and the counters say so. Only a push that bypasses the replica's check can cause this.)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from mpi4py import MPI

from dbmpi import kernels
from dbmpi.ps.control import (
    N_BUCKETS,
    ControlBlock,
    Slot,
    control_size,
    first_push_after,
    pushes_by_replica,
    staleness_bucket,
)
from dbmpi.runtime.layout import Layout, Segment

FETCH_CHUNK = 4 * 2**20  # values (16 MB) per fetch or push request
# MPI ignores the origin buffer of a NO_OP read; a zero-count origin keeps it disjoint
# from the result buffer (the target must then be given explicitly).
NO_ORIGIN = [None, 0, MPI.FLOAT]


class ParameterWindows:
    """The params, inbox and control windows of every shard (collective over `comm`)."""

    def __init__(self, comm: MPI.Intracomm, layout: Layout, shard: int | None):
        self.comm = comm
        self.layout = layout
        self.locked = False
        n = layout.shard_size(shard) if shard is not None else 0
        n_control = control_size(layout.n_replicas, layout.n_workers) if shard is not None else 0
        self.params = MPI.Win.Allocate(4 * n, 4, comm=comm)
        self.inbox = MPI.Win.Allocate(4 * n, 4, comm=comm)
        self.control = MPI.Win.Allocate(8 * n_control, 8, comm=comm)
        self.block = ControlBlock(self.control, layout.n_replicas)
        if shard is not None:
            # Zero the fresh windows before anyone can reach them (a barrier follows).
            np.frombuffer(self.inbox.tomemory(), np.float32)[:] = 0
            np.frombuffer(self.control.tomemory(), np.int64)[:] = 0
            np.frombuffer(self.params.tomemory(), np.float32)[:] = 0

    def windows(self):
        return (self.params, self.inbox, self.control)

    def lock_shards(self) -> None:
        """Open a shared passive-target epoch on every shard rank of every window, for the
        run (once per process: the shard and client objects of a rank share it)."""
        if self.locked:
            return
        for win in self.windows():
            for rank in self.layout.shard_ranks:
                win.Lock(rank, MPI.LOCK_SHARED)
        self.locked = True

    def unlock_shards(self) -> None:
        """Close the epochs (every shard must be alive: an unlock waits for its target)."""
        if not self.locked:
            return
        for win in self.windows():
            for rank in self.layout.shard_ranks:
                win.Unlock(rank)
        self.locked = False

    def free(self) -> None:
        for win in self.windows():
            win.Free()


@dataclass
class ShardStats:
    """What a shard reports at the end of a run."""

    shard: int
    updates: int = 0
    pushes: int = 0
    drains: int = 0
    dropped: int = 0
    rejected: int = 0
    staleness_histogram: list[int] = field(default_factory=list)
    pushes_by_replica: list[int] = field(default_factory=list)
    first_push_after: list[int] = field(default_factory=list)
    workers_failed: int = 0
    busy_s: float = 0.0
    wall_s: float = 0.0
    # Pushes each update merged (bucketed like staleness: 1, 2-3, 4-7, ...); bucket 0 counts
    # drains that found data no counted push had announced yet.
    merged_histogram: list[int] = field(default_factory=lambda: [0] * N_BUCKETS)
    max_merged: int = 0


class Shard:
    """One parameter-server shard: drains its inbox and applies the update itself."""

    def __init__(self, windows: ParameterWindows, index: int, initial: np.ndarray, optimizer,
                 poll_min_s: float = 5e-5, poll_max_s: float = 2e-3):
        self.windows = windows
        self.layout = windows.layout
        self.index = index
        self.me = windows.comm.rank
        self.optimizer = optimizer
        self.work = np.array(initial, dtype=np.float32, copy=True)  # private working copy
        self.drained = np.empty_like(self.work)
        self.negated = np.empty_like(self.work)
        self.poll_min_s, self.poll_max_s = poll_min_s, poll_max_s
        self.stats = ShardStats(shard=index)
        self.seen = 0  # the PUSHES count at the last drain
        self.max_merged_since = 0  # the most pushes one update merged since a caller reset it
        windows.lock_shards()
        self._publish()

    # Self-targeted RMA --------------------------------------------------------------------
    def _publish(self) -> None:
        """Make the working copy visible to fetches (element-atomic REPLACE)."""
        self.windows.params.Accumulate(self.work, self.me, op=MPI.REPLACE)
        self.windows.params.Flush(self.me)

    def _drain(self) -> bool:
        """Move the inbox into self.drained atomically; False when it held nothing."""
        inbox = self.windows.inbox
        inbox.Get_accumulate(NO_ORIGIN, self.drained, self.me, target=(0, self.drained.size, MPI.FLOAT),
                             op=MPI.NO_OP)
        inbox.Flush(self.me)
        if not self.drained.any():
            return False
        np.negative(self.drained, out=self.negated)
        inbox.Accumulate(self.negated, self.me, op=MPI.SUM)
        inbox.Flush(self.me)
        return True

    def _counter(self, slot: int) -> int:
        return self.windows.block.read(self.me, slot)

    # The loop -----------------------------------------------------------------------------
    def step(self, announced: int | None = None) -> bool:
        """Drain once and apply the update if there was a finite gradient; True if applied.
        `announced`: the PUSHES count, when the caller just read it."""
        if announced is None:
            announced = self._counter(Slot.PUSHES)
        merged = max(announced - self.seen, 0)  # pushes counted since the last drain
        if merged:
            self.seen = announced
            self.windows.block.add(self.me, Slot.ABSORBED, merged)  # before the drain: a
            # replica may push again now; its data lands in the next drain at the latest
        if not self._drain():  # their data came with the last drain (it lands before the count)
            return False
        self.stats.merged_histogram[staleness_bucket(merged)] += 1
        self.stats.max_merged = max(self.stats.max_merged, merged)
        self.max_merged_since = max(self.max_merged_since, merged)
        control = self.windows.block
        control.add(self.me, Slot.DRAINS)
        if kernels.count_nonfinite(self.drained):
            control.add(self.me, Slot.DROPPED)
            return False
        self.optimizer.step(self.work, self.drained)
        self._publish()
        control.add(self.me, Slot.VERSION)
        return True

    def apply_pending(self) -> bool:
        """One round of serving: if pushes were announced since the last drain, drain and
        apply them; True if it did. Also called from the waits of a checkpoint, so updates
        go on while one is written (a backlog never piles up into one giant step)."""
        announced = self._counter(Slot.PUSHES)
        if announced == self.seen:
            return False
        t0 = time.perf_counter()
        self.step(announced)
        self.stats.busy_s += time.perf_counter() - t0
        return True

    def version(self) -> int:
        """Updates applied so far."""
        return self._counter(Slot.VERSION)

    def snapshot(self) -> list[tuple[str, np.ndarray]]:
        """Copies of this shard's slices (parameters, then the optimizer's state in a fixed
        order) as they are now: what a checkpoint records while updates go on."""
        state = [(f"{self.optimizer.name}/{key}", value.copy())
                 for key, value in sorted(self.optimizer.state.items())]
        return [("params", self.work.copy())] + state

    def serve(self, checkpoint=None, stop=None, tick=None) -> ShardStats:
        """Apply pushes until every worker has finished (or was declared failed: see
        dbmpi.runtime.failover) and the inbox is empty. Between drains, `checkpoint()` runs once for
        every checkpoint the lead has asked for; a stop signal this shard received
        (`stop.requested`) is relayed to the workers; `tick()` is called every round (a
        watchdog's sign of progress)."""
        started = time.perf_counter()
        n_workers = self.layout.n_workers
        backoff = self.poll_min_s
        written = 0
        relayed = False
        while True:
            if tick is not None:
                tick()
            if stop is not None and stop.requested and not relayed:
                self.windows.block.add(self.layout.shard_rank(0), Slot.STOPS)
                relayed = True
            if checkpoint is not None:
                while self._counter(Slot.CHECKPOINTS) > written:
                    checkpoint()
                    written += 1
            if self.apply_pending():
                backoff = self.poll_min_s
                continue
            if self._counter(Slot.WORKERS_DONE) + self._counter(Slot.WORKERS_FAILED) >= n_workers:
                # Workers flush every push before they count themselves done: one last
                # look at the counter and the inbox, then stop.
                announced = self._counter(Slot.PUSHES)
                if announced == self.seen:
                    self.step(announced)
                    while checkpoint is not None and self._counter(Slot.CHECKPOINTS) > written:
                        checkpoint()
                        written += 1
                    break
                continue
            time.sleep(backoff)
            backoff = min(backoff * 2, self.poll_max_s)
        self.stats.wall_s = time.perf_counter() - started
        self._collect_stats()
        return self.stats

    def _collect_stats(self) -> None:
        control = self.windows.block.read_all(self.me, self.layout.n_workers)
        s = self.stats
        s.updates, s.pushes, s.drains = int(control[Slot.VERSION]), int(control[Slot.PUSHES]), int(control[Slot.DRAINS])
        s.dropped, s.rejected = int(control[Slot.DROPPED]), int(control[Slot.REJECTED])
        s.workers_failed = int(control[Slot.WORKERS_FAILED])
        s.staleness_histogram = control[Slot.HIST:Slot.HIST + N_BUCKETS].tolist()
        s.pushes_by_replica = [int(control[pushes_by_replica(r)]) for r in range(self.layout.n_replicas)]
        s.first_push_after = [int(control[first_push_after(r)]) - 1 for r in range(self.layout.n_replicas)]

    def close(self) -> None:
        self.windows.unlock_shards()


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
        for seg, rank in zip(self.segments, self.seg_ranks):
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
        for seg, rank in zip(self.segments, self.seg_ranks):
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


def gather_parameters(comm: MPI.Intracomm, layout: Layout, my_slice: np.ndarray, root: int = 0):
    """Collect every shard's slice into the full canonical vector at `root` (collective
    over the window communicator; workers contribute nothing). Returns None elsewhere."""
    full = np.empty(layout.n_params if comm.rank == root else 0, np.float32)
    counts = [0] * comm.size
    displs = [0] * comm.size
    for k, (lo, hi) in enumerate(layout.shard_ranges):
        counts[layout.shard_rank(k)] = hi - lo
        displs[layout.shard_rank(k)] = lo
    send = my_slice if my_slice is not None else np.empty(0, np.float32)
    comm.Gatherv(send, [full, counts, displs, MPI.FLOAT], root=root)
    return full if comm.rank == root else None
