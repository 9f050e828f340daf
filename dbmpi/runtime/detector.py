"""A shard's failure detector: it watches the workers whose heartbeat slots it holds.

Each shard holds the heartbeats of a contiguous block of whole replicas
(dbmpi.ps.control.heartbeat_home). One `round()` reads all of them in one operation on the
shard's own window and decides, with array arithmetic over the block:

- a worker whose DONE mark is in gets counted finished: WORKERS_DONE on every shard, the
  round's new ones added at once (S operations per round that has any);
- a worker whose beat count has not moved for the timeout gets its whole replica declared
  failed (a replica split into P partitions cannot step without all of them, and all P are
  in this block, so one shard alone decides): FAILED_MARK into each of the replica's
  unfinished slots (Fetch_and_op: the old value says whether its DONE mark landed first, in
  which case the mark is taken back and the worker counts done), then WORKERS_FAILED on
  every shard and REPLICAS_FAILED on shard 0 (for the line saying how many train on).

So a round is one read, a failure P + S + 1 operations, whatever the number of workers W;
nothing here grows with W but the size of one read (W / S slots).
"""
from __future__ import annotations

import time

import numpy as np

from dbmpi.ps.control import BEATS, DONE_MARK, FAILED_MARK, Slot, home_workers
from dbmpi.runtime.comm import stderr_line


class FailureDetector:
    """Shard `shard`'s watch over its block of heartbeats (`home_workers`)."""

    def __init__(self, block, layout, shard: int, timeout_s: float, started: float):
        self.block, self.layout, self.timeout, self.started = block, layout, float(timeout_s), started
        self.me = layout.shard_rank(shard)
        self.workers = home_workers(layout, shard)
        n = len(self.workers)
        self.values = np.zeros(n, np.int64)
        self.beats = np.full(n, -1, np.int64)  # the beat count last seen (-1: none yet)
        self.changed = np.zeros(n)  # when it last changed (monotonic seconds)
        self.counted = np.zeros(n, bool)  # done or declared failed: no longer watched
        self.done: set[int] = set()
        self.failed: set[int] = set()
        self.events: list[dict] = []  # one replica_failed record per replica declared

    def forget(self) -> None:
        """This rank was too busy to watch: what it saw says nothing about the workers now."""
        self.beats[:] = -1

    def round(self, now: float) -> None:
        """Read the block once; count the workers that finished, declare the silent ones."""
        if not self.workers:
            return
        self.block.start_read(self.me, Slot.HEARTBEATS, self.values)
        self.block.flush(self.me)
        beats = self.values & BEATS
        moved = beats != self.beats
        self.changed[moved] = now
        self.beats[:] = beats
        finished = np.flatnonzero(((self.values & DONE_MARK) != 0) & ~self.counted)
        if finished.size:
            self.counted[finished] = True
            self.done.update(self.workers[i] for i in finished)
            self._count(Slot.WORKERS_DONE, int(finished.size))
        silent = np.flatnonzero(~self.counted & (now - self.changed > self.timeout))
        for replica in sorted({self.workers[i] // self.layout.n_partitions for i in silent}):
            self._declare(replica, now)

    def _count(self, slot: int, amount: int) -> None:
        for rank in self.layout.shard_ranks:
            self.block.add(rank, slot, amount)

    def _declare(self, replica: int, now: float) -> None:
        """Declare `replica` failed: each of its workers not finished yet (its DONE mark not
        in) counts failed instead. The partitions of a replica whose partner died fall
        silent too (they wait in a collective), so which of them died cannot be told from
        here: the record lists every silent one."""
        P = self.layout.n_partitions
        first = replica * P - self.workers.start
        members = range(first, first + P)
        silent = {self.workers[i]: now - self.changed[i] for i in members
                  if self.beats[i] >= 0 and now - self.changed[i] > self.timeout / 2}
        declared, done = [], []
        for i in members:
            if self.counted[i]:
                continue
            self.counted[i] = True
            slot = Slot.HEARTBEATS + i
            if self.block.add(self.me, slot, FAILED_MARK) & DONE_MARK:  # it finished just now
                self.block.add(self.me, slot, -FAILED_MARK)  # done, not failed (its mark came first)
                done.append(self.workers[i])
            else:
                declared.append(self.workers[i])
        self.done.update(done)
        self.failed.update(declared)
        if done:
            self._count(Slot.WORKERS_DONE, len(done))
        if declared:
            self._count(Slot.WORKERS_FAILED, len(declared))
            before = self.block.add(self.layout.shard_rank(0), Slot.REPLICAS_FAILED)
            self._report(replica, declared, silent, now, self.layout.n_replicas - before - 1)

    def _report(self, replica: int, declared: list[int], silent: dict, now: float, live: int) -> None:
        """The replica_failed record and the one line on stderr."""
        elapsed = now - self.started
        silent_s = max(silent.values(), default=self.timeout)
        self.events.append({"kind": "replica_failed", "replica": replica, "ranks": declared,
                            "silent_ranks": sorted(silent), "silent_s": round(float(silent_s), 2),
                            "detected_s": round(elapsed, 2), "detected_unix": round(time.time(), 3),
                            "detected_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        who = "rank" + ("s " if len(silent) > 1 else " ") + ", ".join(map(str, sorted(silent)))
        stderr_line(f"dbmpi: replica {replica} failed (no heartbeat from {who} for {silent_s:.1f} s) "
                    f"{elapsed:.1f} s into the run; {live} replica(s) train on")
