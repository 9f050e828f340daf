"""A Downpour parameter-server shard: the serving loop over its store, optimizer and counters.

The loop reads its fixed control slots in one RMA call per round (pushes announced,
checkpoints asked for, workers finished); each call also drives MPI progress, and so does
the back-off between rounds, which is kept short (at most `poll_max_s`, SERVE_PAUSE_S): off-node a
fetch or push to an idle shard waits for the shard's next MPI call. When pushes were
announced it applies them in one pass over the slice, chunk by chunk (dbmpi.ps.store.CHUNK):
drain the chunk, apply the optimizer to it, publish it, settle (flush, and let MPI progress
other ranks' requests). So a shard never computes more than a chunk's worth (about 0.4 ms)
without serving the network, and each chunk is touched while in cache. It
records ABSORBED (the PUSHES count as of the drain) so that clients can bound its backlog
(dbmpi.ps.client), and how many pushes each update merged.

NaN or Inf never reach the parameters: replicas withhold non-finite pushes and count them;
a shard that still drains a non-finite value drops that chunk of the drain and counts the
drain as dropped. (Such a value cannot be cleared from the inbox while pushes may land, so
a shard that ever drains one keeps dropping the affected chunk: the parameters stay finite
and the counters say so. Only a push that bypasses the replica's check can cause this.)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from dbmpi import kernels
from dbmpi.ps.control import N_BUCKETS, Slot, staleness_bucket
from dbmpi.ps.staleness import StalenessScale
from dbmpi.ps.store import CHUNK, SERVE_PAUSE_S, ShardStore
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
    workers_failed: int = 0
    busy_s: float = 0.0
    wall_s: float = 0.0
    # Pushes each update merged (bucketed like staleness: 1, 2-3, 4-7, ...); bucket 0 counts
    # drains that found data no counted push had announced yet.
    merged_histogram: list[int] = field(default_factory=lambda: [0] * N_BUCKETS)
    max_merged: int = 0
    # The pushes' mean staleness at the update that applied them, and the mean step scale of
    # the updates (1 unless staleness_aware: dbmpi.ps.staleness).
    mean_staleness: float = 0.0
    mean_step_scale: float = 1.0


class Shard:
    """One Downpour shard: drains its inbox and applies the update itself (the optimizer is
    the handler, as in a key-value server). `chunk`: values per chunk of the update (None:
    the whole slice at once, for benchmarks). `staleness_aware`: scale each update's step by
    1 / the mean staleness of the pushes it merges (dbmpi.ps.staleness)."""

    def __init__(self, windows: ParameterWindows, index: int, initial: np.ndarray, optimizer,
                 poll_min_s: float = 5e-5, poll_max_s: float = SERVE_PAUSE_S, chunk: int | None = CHUNK,
                 staleness_aware: bool = False):
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
        self.staleness = StalenessScale(staleness_aware)
        self.version_now = 0  # updates applied (this shard's VERSION slot, which only it writes)
        self.step_scale = 1.0  # multiplies the learning rate of the next update (staleness)
        self.store = ShardStore(windows, self.work.size, chunk)
        self.store.publish(self.work)

    def _counter(self, slot: int) -> int:
        return self.windows.block.read(self.me, slot)

    def _announced(self) -> tuple[int, int]:
        """(PUSHES, FETCHED) in one read (atomic per slot)."""
        values = self.windows.block.read_slots(self.me, Slot.PUSHES, Slot.FETCHED - Slot.PUSHES + 1)
        return int(values[0]), int(values[-1])

    # The loop -----------------------------------------------------------------------------
    def step(self, announced: int | None = None, fetched: int | None = None) -> bool:
        """Drain once and apply the update where the gradient is finite; True if applied.
        `announced`, `fetched`: the PUSHES and FETCHED counts, when the caller just read them
        (`fetched` None: the update's step scale is the last measured)."""
        if announced is None:
            announced, fetched = self._announced()
        merged = max(announced - self.seen, 0)  # pushes counted since the last drain
        if merged:
            self.seen = announced
            self.windows.block.add(self.me, Slot.ABSORBED, merged)  # before the drain: a
            # replica may push again now; its data lands in the next drain at the latest
        self.step_scale = self.staleness.scale(self.version_now, announced, fetched)
        found, applied, dropped = self._update()
        if not found:  # their data came with the last drain (it lands before the count)
            return False
        self.stats.merged_histogram[staleness_bucket(merged)] += 1
        self.stats.max_merged = max(self.stats.max_merged, merged)
        self.max_merged_since = max(self.max_merged_since, merged)
        counts = np.zeros(Slot.DRAINS + 1, np.int64)  # one exchange from VERSION to DRAINS
        counts[Slot.DRAINS], counts[Slot.DROPPED], counts[Slot.VERSION] = 1, int(dropped), int(applied)
        old = self.windows.block.exchange(self.me, 0, counts)
        self.version_now = int(old[Slot.VERSION]) + int(applied)
        if applied:
            self.staleness.applied(self.step_scale)
        return applied

    def _update(self) -> tuple[bool, bool, bool]:
        """One pass over the slice: per chunk drain, apply, publish, settle. Returns whether
        any chunk held data, whether any was applied, whether any was dropped (not finite)."""
        store, work, drained, optimizer = self.store, self.work, self.drained, self.optimizer
        found = applied = dropped = False
        optimizer.begin_update()
        for lo, hi in store.chunks():
            grad = drained[lo:hi]
            if store.drain_part(grad, lo):
                found = True
                if kernels.count_nonfinite(grad):
                    dropped = True
                else:
                    optimizer.step(work[lo:hi], grad, slice(lo, hi), scale=self.step_scale)
                    store.publish_part(work[lo:hi], lo)
                    applied = True
            store.settle()
        return found, applied, dropped

    def apply_pending(self, announced: int | None = None, fetched: int | None = None) -> bool:
        """One round of serving: if pushes were announced since the last drain, drain and
        apply them; True if it did. Also called from the waits of a checkpoint, so updates
        go on while one is written (a backlog never piles up into one giant step)."""
        if announced is None:
            announced, fetched = self._announced()
        if announced == self.seen:
            self.windows.progress()
            return False
        t0 = time.perf_counter()
        self.step(announced, fetched)
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
            fixed = self.windows.block.read_fixed(self.me)
            if checkpoint is not None and fixed[Slot.CHECKPOINTS] > written:
                for _ in range(int(fixed[Slot.CHECKPOINTS]) - written):
                    checkpoint()
                written = int(fixed[Slot.CHECKPOINTS])
                continue
            if self.apply_pending(int(fixed[Slot.PUSHES]), int(fixed[Slot.FETCHED])):
                backoff.reset()
                continue
            if fixed[Slot.WORKERS_DONE] + fixed[Slot.WORKERS_FAILED] >= n_workers:
                # Workers flush every push before they count themselves done: one last
                # look at the counter and the inbox, then stop.
                announced, fetched = self._announced()
                if announced == self.seen:
                    self.step(announced, fetched)
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
        fixed = self.windows.block.read_fixed(self.me)
        s = self.stats
        s.updates, s.pushes, s.drains = int(fixed[Slot.VERSION]), int(fixed[Slot.PUSHES]), int(fixed[Slot.DRAINS])
        s.dropped, s.rejected = int(fixed[Slot.DROPPED]), int(fixed[Slot.REJECTED])
        s.workers_failed = int(fixed[Slot.WORKERS_FAILED])
        s.mean_staleness, s.mean_step_scale = self.staleness.mean_staleness(), self.staleness.mean_scale()

    def close(self) -> None:
        self.store.close()
