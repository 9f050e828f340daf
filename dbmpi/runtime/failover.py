"""Surviving a failed Downpour replica: heartbeats, the shards' verdict and a watchdog.

Every rank of a Downpour run has a `Liveness` once the windows exist. Its `beat()` is
called from the rank's own loops (every training step, every round of a shard's serve
loop, every round of a polled wait) and does MPI work at most every `interval` seconds
(timeout / 10, clamped to 0.05-1 s):

- a worker adds one to its heartbeat slot on its home shard (dbmpi.ps.control.heartbeat_home:
  the replicas are split into S contiguous blocks, one per shard, a replica's partitions
  side by side); the old value also says whether that shard declared it failed meanwhile
  (FAILED_MARK). In the same round trip it reads that shard's own beat;
- a shard adds one to its own Slot.SHARD_BEAT slot and reads the next shard's (a ring);
- so every shard is watched by its workers and by the shard before it, and no rank reads
  more than one other rank per beat: a shard silent for `train.replica_timeout_s` cannot be
  survived (its parameters are gone), so whoever notices prints one line and calls
  MPI_Abort(ABORT_SHARD_LOST), which ends every rank; checkpoints are written atomically,
  so the last one stays intact;
- a shard that *dies* is seen sooner, by the ranks on its host: each knows every local
  rank's process (pid and start time, exchanged when the windows are made) and its
  watchdog thread looks at the shards' processes every 0.25 s (dbmpi.runtime.procfs). RMA on a dead
  shard does not fail on one node (MPICH's shared-memory windows stay mapped: the replicas
  would push into an inbox nobody drains until the heartbeat timeout), and a silence-based
  timeout short enough to help would misjudge a busy shard (a long update, a checkpoint
  write); a process that has ended is never a busy one. The main thread takes over at its
  next beat: unless shard 0 already gave its verdict (the run is ending and ranks leave on
  their own), the lowest live rank on the host prints one line (`dbmpi: shard K (rank R)
  died ...`) and calls MPI_Abort(ABORT_SHARD_LOST); the others wait quietly for it (at most
  the timeout, then they abort too). Measured: the line within 0.03-1.1 s, the job gone
  within 0.5-1.6 s. A main thread stuck in MPI (the shard died holding a window mutex)
  does not take over within SHARD_GRACE_S: the watchdog then ends its rank itself (status
  4, the line from the reporter). Shards on other hosts are noticed by their heartbeat;
- on every shard, a failure detector (dbmpi.runtime.detector) reads the slots of its block
  of workers in one operation per round. A worker whose count has not moved for the timeout
  gets its whole replica declared failed (a replica split into P partitions cannot step
  without all of them; all P are in the same block, so one shard decides, once): its
  workers count as finished on every shard (Slot.WORKERS_FAILED), so the shards stop
  waiting for them, and the other replicas train on. The shard also counts workers finished
  (Slot.WORKERS_DONE on every shard) when it sees their DONE mark, so each worker is counted
  exactly once, as done or as failed, whichever mark landed first (both are Fetch_and_op SUM
  on one slot: the old value says who won; a FAILED mark that came second is taken back).
  A round costs one read, a failure P + S + 1 atomics, whatever the number of workers W
  (tests/test_detector.py counts them at W = 10,000). Shard 0 learns who finished and who
  failed once, at the end, from the marks (`census()`: one read per shard); a worker asks
  whether a replica failed (warmstart, the acting lead) with one read of that replica's
  marks, at most once per interval.

Heartbeats come from the training loops, not from a thread: a second thread making RMA
calls next to the training loop, with per-target epochs, made MPICH 5.0.2's shards fall far
behind under load (drains of dozens of pushes at once; a run ended at 22% accuracy), which
a watchdog must not cost. So a rank is alive to the others while its loops run:
`train.replica_timeout_s` must exceed the longest stretch without a beat (one training
step, one evaluation by replica 0).

A watchdog thread that makes no MPI call ends this process when the main thread has made
no progress (no `tick()`) for 2 x timeout outside a `busy()` section (a partitioned
replica's evaluation is none: it waits on the partner): a partition whose partner died waits
in a collective forever, and a process killed inside an MPI accumulate can leave MPICH's
shared-memory window mutex locked, after which every access to that window blocks.
The job then ends in bounded time instead of hanging.

A partition whose partner died may instead get an MPI error from the collective, where MPI
reports the dead peer. `partition_errors()` turns that into the watchdog's outcome (one
line, EXIT_FROZEN, no MPI_Abort, which would end the surviving replicas too), so either path
ends the same way. One such error MPICH does not return: reading a large message straight
from the dying partner's memory (CMA, `process_vm_readv failed (errno 3)` in Allgatherv) is
fatal, and MPICH aborts the whole job itself; dbmpi.runtime.supervise turns CMA off for that reason.

A live worker that learns its replica was declared failed (it was silent that long without
dying) prints one line and leaves with EXIT_REPLICA_LOST: it must not count itself
finished after the shards stopped counting it.

The end of a run (dbmpi.algorithms.downpour) goes without collectives when a failure was declared (a
collective over a dead rank never returns): shard 0 sets VERDICT_FAILED, every live rank
adds one to RELEASED and leaves with os._exit(0) (no window free, no MPI_Finalize: both are
collective); without failures it is VERDICT_CLEAN and the usual collective teardown.

With MPICH's hydra launcher, surviving also needs `mpiexec -disable-auto-cleanup` and each
rank under `python -m dbmpi.runtime.supervise` (see there): otherwise hydra kills every rank when
one dies.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np
from mpi4py import MPI

from dbmpi.ps.control import DONE_MARK, FAILED_MARK, Slot, heartbeat_home, home_workers
from dbmpi.ps.windows import ParameterWindows
from dbmpi.runtime import procfs
from dbmpi.runtime.comm import poll, stderr_line
from dbmpi.runtime.detector import FailureDetector
from dbmpi.runtime.layout import Layout

EXIT_REPLICA_LOST = 1  # a live rank of a replica the shards declared failed
ABORT_SHARD_LOST = 4  # MPI_Abort error code when a shard stopped responding
EXIT_FROZEN = 5  # no progress for 2 x timeout: stuck inside MPI
EXIT_ALL_REPLICAS_FAILED = 6  # shard 0 when no replica survived: nothing could finish
# A main thread that has not ticked this long (outside busy()) is stuck: a live one ticks every step and poll.
STUCK_S = 1.0
SHARD_GRACE_S = 3.0  # a shard died: the main thread has this long to notice before the watchdog acts


def leave(status: int) -> None:
    """End this process now, without MPI_Finalize (collective) or Python's teardown."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def heartbeat_interval(timeout_s: float) -> float:
    return min(1.0, max(0.05, timeout_s / 10))


class Liveness:
    """One rank's heartbeat (called from its loops) and watchdog (a thread, no MPI)."""

    def __init__(self, windows: ParameterWindows, layout: Layout, comm, timeout_s: float, role):
        self.windows, self.layout, self.comm, self.role = windows, layout, comm, role
        self.rank = comm.rank
        self.timeout = float(timeout_s)
        self.interval = heartbeat_interval(self.timeout)
        self.shard0 = layout.shard_rank(0)
        self.period = min(self.interval, 0.1) if role.is_shard else self.interval
        self.started = self.last_tick = self.last_beat = time.monotonic()
        self._busy = 0
        self._beating = False
        self._closed = threading.Event()
        # A worker beats into its slot on its home shard; a shard watches its workers there.
        self.home = heartbeat_home(layout, self.rank) if role.is_worker else None
        self.detector = FailureDetector(windows.block, layout, role.shard, self.timeout, self.started) \
            if role.is_shard and home_workers(layout, role.shard) else None
        # The one shard this rank watches for silence: a worker its home shard, a shard the next one.
        self.watched = self._watched_shard()
        self._watched_beat: tuple[int, float] | None = None  # (its beat count, when it last changed)
        # Workers known to be declared failed, and (shard 0 after `census()`) those done.
        self.failed_workers: set[int] = set()
        self.done_workers: set[int] = set()
        self._looked: dict[int, float] = {}  # replica -> when this rank last read its marks
        # The processes of the ranks on this host (collective): a shard among them that ends
        # is seen at once (_watch_loop), whatever its heartbeat says.
        self.local = procfs.host_peers(comm)
        self.watch_period = min(self.interval, 0.25)
        self.dead_shard: tuple[int, float] | None = None  # (shard, when the watchdog saw it end)
        self._run_ending = False  # shard 0 gave its verdict: shards leave on their own now
        self._said, self._say_lock = False, threading.Lock()

    # The main thread -----------------------------------------------------------------------
    def start(self) -> Liveness:
        self.started = self.last_tick = self.last_beat = time.monotonic()
        if self.detector is not None:
            self.detector.started = self.started
        self._beating = True
        threading.Thread(target=self._watch_loop, name="dbmpi-watchdog", daemon=True).start()
        self.beat(force=True)
        return self

    def tick(self) -> None:
        """The main thread is making progress (for the watchdog)."""
        self.last_tick = time.monotonic()

    @contextmanager
    def busy(self, alone: bool = True):
        """A long local computation: the watchdog does not count it as a stall (it is not a
        heartbeat: it must stay shorter than the timeout if others are watching). Not so one
        that is not done `alone` (a partitioned replica's evaluation, collective over its
        partitions): a partner dying there leaves this rank waiting for good, which the
        watchdog must end."""
        if not alone:
            yield
            return
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            self.tick()

    def beat(self, force: bool = False) -> None:
        """Heartbeat and failure checks, if one is due (cheap otherwise)."""
        now = time.monotonic()
        self.last_tick = now
        if not self._beating:
            return
        if self.dead_shard is not None and not self._run_ending:
            self._shard_ended()
        if not force and now - self.last_beat < self.period:
            return
        if now - self.last_beat > self.timeout / 2:
            # This rank was busy: it saw nobody meanwhile, which says nothing about them.
            self._watched_beat = None
            if self.detector is not None:
                self.detector.forget()
        control = self.windows.block
        if self.role.is_shard:
            control.add(self.rank, Slot.SHARD_BEAT)
            if self.detector is not None:
                self.detector.round(now)
            if self.watched is not None:
                self._watch_shard(now, control.read(self.layout.shard_rank(self.watched), Slot.SHARD_BEAT))
        else:
            old, shard_beat = control.beat(self.layout.shard_rank(self.home[0]), self.home[1], Slot.SHARD_BEAT)
            if old & FAILED_MARK:
                self.leave_released()
            self._watch_shard(now, shard_beat)
        self.last_beat = time.monotonic()

    def stop(self) -> None:
        """No more heartbeats or checks (the run is ending); the watchdog still watches the
        main thread until close()."""
        self._beating = False
        self.tick()

    def close(self) -> None:
        self.stop()
        self._closed.set()

    @property
    def events(self) -> list[dict]:
        """The replica_failed records of the replicas this shard declared failed."""
        return self.detector.events if self.detector is not None else []

    def replica_failed(self, replica: int) -> bool:
        """Whether `replica` was declared failed: its workers' marks on its home shard, read
        in one operation at most once per heartbeat interval (a failure is for good)."""
        layout = self.layout
        first = layout.worker_rank(replica, 0)
        if first in self.failed_workers:
            return True
        now = time.monotonic()
        if now - self._looked.get(replica, -float("inf")) < self.interval:
            return False
        self._looked[replica] = now
        home, slot = heartbeat_home(layout, first)
        marks = self.windows.block.read_slots(layout.shard_rank(home), slot, layout.n_partitions)
        if not (marks & FAILED_MARK).any():
            return False
        self.failed_workers.update(range(first, first + layout.n_partitions))
        return True

    def failed_replicas(self) -> list[int]:
        return sorted({w // self.layout.n_partitions for w in self.failed_workers})

    def census(self) -> None:
        """Shard 0, once every worker is counted finished or failed: which were which, read
        from their marks on every shard (one operation per shard). A worker whose DONE mark
        landed first has no FAILED mark (its shard took it back)."""
        layout, block = self.layout, self.windows.block
        for k in range(layout.n_shards):
            workers = home_workers(layout, k)
            if not workers:
                continue
            marks = block.read_slots(layout.shard_rank(k), Slot.HEARTBEATS, len(workers))
            failed = (marks & FAILED_MARK) != 0
            ranks = np.arange(workers.start, workers.stop)
            self.failed_workers.update(ranks[failed].tolist())
            self.done_workers.update(ranks[((marks & DONE_MARK) != 0) & ~failed].tolist())

    def wait(self, done, low: float = 5e-5, high: float = 0.05, limit_s: float | None = None) -> bool:
        """Poll `done()` with exponential back-off (no spinning: ranks share cores),
        beating meanwhile; False if `limit_s` passed first."""
        if not poll(done, low=low, high=high, beat=self.beat, limit_s=limit_s):
            return False
        self.tick()
        return True

    def complete(self, request) -> None:
        """Wait for an MPI request politely (dbmpi.ps.checkpoint's progress protocol)."""
        self.wait(request.Test)

    @contextmanager
    def partition_errors(self):
        """A worker's training. Under the failover launcher (dbmpi.runtime.supervise) with P > 1, an
        MPI error there means a peer died mid-exchange, typically a partition of this replica
        (where MPI reports it; on one node the collective just never returns: the watchdog).
        This rank then leaves with EXIT_FROZEN and one line, as the watchdog would, instead of
        MPI_Abort ending the whole job: the shards declare the replica failed and the others
        train on."""
        try:
            yield
        except MPI.Exception as exc:
            if self.layout.n_partitions > 1 and os.environ.get("DBMPI_SUPERVISED") == "1":
                stderr_line(f"dbmpi: rank {self.rank} ({self.role}): MPI error ({str(exc).splitlines()[0]}) "
                            "with a peer that died (a partition of this replica); leaving")
                leave(EXIT_FROZEN)
            raise

    def leave_released(self) -> None:
        role = self.role
        stderr_line(f"dbmpi: rank {self.rank} (replica {role.replica}, partition {role.partition}): the "
                    f"shards declared replica {role.replica} failed; this rank leaves, the others train on")
        leave(EXIT_REPLICA_LOST)

    # Checks ----------------------------------------------------------------------------------
    def _watched_shard(self) -> int | None:
        """The shard whose silence this rank watches for: a worker's home shard, the next
        shard in a ring for a shard (none when it is the only one). Every shard is watched
        by another shard and by its own workers, and no rank watches more than one."""
        if self.role.is_worker:
            return self.home[0]
        S = self.layout.n_shards
        return (self.role.shard + 1) % S if S > 1 else None

    def _watch_shard(self, now: float, value: int) -> None:
        """The watched shard's beat count is `value`: a shard silent for the timeout is lost."""
        seen = self._watched_beat
        if seen is None or seen[0] != value:
            self._watched_beat = (value, now)
        elif now - seen[1] > self.timeout:
            self.shard_lost(self.watched, f"sent no heartbeat for {now - seen[1]:.1f} s "
                                          f"(train.replica_timeout_s = {self.timeout:g})")

    def shard_lost(self, shard: int, what: str) -> None:
        """A shard is gone: its parameters cannot be recovered, so the whole job ends. When
        its process on this host has ended, the lowest live rank here says so (one line) and
        aborts the job; the others wait for that, quietly (up to the timeout)."""
        if self._ended(self.layout.shard_rank(shard)):
            what = self._died(shard)
            # No MPI meanwhile: the reporter's MPI_Abort ends this rank.
            poll(lambda: self._reporter() == self.rank, low=0.05, high=0.05, beat=self.tick,
                 limit_s=self.timeout)
        self._say_once(self._lost_line(shard, what))
        time.sleep(0.5)  # let the launcher forward the line
        self.comm.Abort(ABORT_SHARD_LOST)

    def _say_once(self, line: str) -> None:
        """The shard-lost line, once per rank (the main thread or the watchdog says it)."""
        with self._say_lock:
            if not self._said:
                stderr_line(line)
                self._said = True

    def _lost_line(self, shard: int, what: str) -> str:
        return (f"dbmpi: shard {shard} (rank {self.layout.shard_rank(shard)}) {what}: a shard's parameters "
                "cannot be recovered, so the job ends; resume from the last checkpoint")

    def _died(self, shard: int) -> str:
        return f"died (its process {self.local[self.layout.shard_rank(shard)][0]} ended)"

    def _ended(self, rank: int) -> bool:
        """Whether `rank` runs on this host and its process has ended (never a live one)."""
        return rank != self.rank and rank in self.local and procfs.gone(self.local[rank])

    def _reporter(self) -> int:
        """The rank that reports a dead shard here: the lowest one on this host still alive."""
        return procfs.lowest_alive(self.local, self.rank)

    def _shard_ended(self) -> None:
        """Main thread, the watchdog having seen a shard's process end: unless the run is
        ending (shard 0 gave its verdict, after which ranks leave), the job ends."""
        if self.windows.block.read(self.shard0, Slot.VERDICT):
            self._run_ending = True
            return
        self.shard_lost(self.dead_shard[0], "")

    # The watchdog thread (no MPI) --------------------------------------------------------------
    def _watch_loop(self) -> None:
        limit = 2 * self.timeout
        while not self._closed.wait(self.watch_period):
            now = time.monotonic()
            self._watch_local_shards(now)
            if not self._busy and now - self.last_tick > limit:
                stderr_line(f"dbmpi: rank {self.rank} ({self.role}): no progress for {now - self.last_tick:.0f} s "
                            "(2 x train.replica_timeout_s): waiting on a peer that died (a partition of this "
                            "replica, or a process killed inside an MPI call); leaving")
                leave(EXIT_FROZEN)

    def _watch_local_shards(self, now: float) -> None:
        """A shard process on this host that ended is told to the main thread (next beat);
        if the main thread does not tick within SHARD_GRACE_S (stuck in MPI, e.g. on a
        window mutex the dead shard held), the watchdog ends this rank itself. Not when the
        main thread was already stuck when the shard ended (no tick for STUCK_S outside a
        busy() section: on a dead partner, say, while the shards ended the run without it and
        left): the frozen check ends that one, with its own line."""
        if not self._beating or self._run_ending:
            return
        if self.dead_shard is None:
            dead = [k for k, rank in enumerate(self.layout.shard_ranks) if self._ended(rank)]
            if dead:
                self.dead_shard = (dead[0], now)
            return
        seen = self.dead_shard[1]
        stuck_before = not self._busy and seen - self.last_tick > STUCK_S
        if now - seen > SHARD_GRACE_S and (self.last_tick < seen or self._said) and not stuck_before:
            if self._reporter() == self.rank:  # the main thread is stuck, or its MPI_Abort is
                self._say_once(self._lost_line(self.dead_shard[0], self._died(self.dead_shard[0])))
            leave(ABORT_SHARD_LOST)
