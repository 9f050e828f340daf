"""A Downpour parameter-server shard: the serving loop over its store, optimizer and counters.

The loop polls its push counter through MPI (each poll is an RMA call, which also drives
progress of passive-target operations on implementations without a progress thread) and
sleeps with exponential back-off when idle, so it never spins a core. When pushes were
announced it drains the inbox (dbmpi.ps.store) and hands the sum to the optimizer, then
publishes the result. It records ABSORBED (the PUSHES count as of the drain) so that clients
can bound its backlog (dbmpi.ps.client), and how many pushes each update merged.

NaN or Inf never reach the parameters: replicas withhold non-finite pushes and count them;
a shard that still drains a non-finite value drops that drain and counts it. (Such a value
cannot be cleared from the inbox while pushes may land, so a shard that ever drains one
keeps dropping the affected drains: the parameters stay finite and the counters say so.
Only a push that bypasses the replica's check can cause this.)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from dbmpi import kernels
from dbmpi.ps.control import N_BUCKETS, Slot, first_push_after, pushes_by_replica, staleness_bucket
from dbmpi.ps.store import ShardStore
from dbmpi.ps.windows import ParameterWindows
from dbmpi.runtime.poll import Backoff


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
    """One Downpour shard: drains its inbox and applies the update itself (the optimizer is
    the handler, as in a key-value server)."""

    def __init__(self, windows: ParameterWindows, index: int, initial: np.ndarray, optimizer,
                 poll_min_s: float = 5e-5, poll_max_s: float = 2e-3):
        self.windows = windows
        self.layout = windows.layout
        self.index = index
        self.me = windows.comm.rank
        self.optimizer = optimizer  # the handler: applies a drained gradient to the slice
        self.work = np.array(initial, dtype=np.float32, copy=True)  # private working copy
        self.drained = np.empty_like(self.work)
        self.poll_min_s, self.poll_max_s = poll_min_s, poll_max_s
        self.stats = ShardStats(shard=index)
        self.seen = 0  # the PUSHES count at the last drain
        self.max_merged_since = 0  # the most pushes one update merged since a caller reset it
        self.store = ShardStore(windows, self.work.size)
        self.store.publish(self.work)

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
        if not self.store.drain(self.drained):  # their data came with the last drain (it lands before the count)
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
        self.store.publish(self.work)
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
        backoff = Backoff(self.poll_min_s, self.poll_max_s)
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
                backoff.reset()
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
            backoff.pause()
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
        self.store.close()
