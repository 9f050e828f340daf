"""Downpour's run protocol, the MPI side: the control block slots on shard 0 that a run uses
besides the parameter server's own (dbmpi.ps.control.Slot: STOPS, WARMED, CHECKPOINTS,
VERDICT, RELEASED; and each worker's DONE mark, on its home shard) and the point-to-point messages of its end
(Tag.CKPT_STATE, Tag.FINAL, Tag.OUTCOME).

- `ReplicaControl`: a worker's side, the `control` of dbmpi.algorithms.replica.ReplicaLoop.
- `FinalMessages`: shard 0's receipt of the workers' FINAL messages while it serves.
- `read_verdict`, `tell_outcome`: how every rank learns the way the run ends.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from mpi4py import MPI

from dbmpi.ps.control import DONE_MARK, FAILED_MARK, Slot, heartbeat_home
from dbmpi.runtime.comm import Tag, send

STOP_LOOK_S = 0.05  # a worker looks for a relayed stop at most this often (a round trip to shard 0)


class ReplicaControl:
    """A worker's calls on shard 0's control block and to its replica's partitions (the
    methods are documented in dbmpi.algorithms.replica)."""

    def __init__(self, windows, topo, liveness, clock: Callable[[], float] = time.monotonic):
        self.block, self.topo, self.liveness, self.clock = windows.block, topo, liveness, clock
        self.shard0 = topo.layout.shard_rank(0)
        self.flag = np.zeros(1, np.int32)
        self.looked = -float("inf")

    def relay_stop(self) -> None:
        self.block.add(self.shard0, Slot.STOPS)

    def stop_seen(self) -> bool:
        """Whether a stop was relayed; looked up at most every STOP_LOOK_S (a signal is a
        human's time scale, a training step may be a fraction of a millisecond)."""
        now = self.clock()
        if now - self.looked < STOP_LOOK_S:
            return False
        self.looked = now
        return self.block.read(self.shard0, Slot.STOPS) > 0

    def warmed(self) -> bool:
        return self.block.read(self.shard0, Slot.WARMED) > 0

    def mark_warmed(self) -> None:
        self.block.add(self.shard0, Slot.WARMED)

    def request_checkpoint(self, state: dict) -> None:
        """Give shard 0 the state, then ask it for a checkpoint (it orders the others)."""
        self.topo.world.send(state, dest=self.shard0, tag=Tag.CKPT_STATE)
        self.block.add(self.shard0, Slot.CHECKPOINTS)

    def any_partition(self, flag: bool) -> bool:
        """`flag` on any partition of this replica (collective over them when P > 1)."""
        self.flag[0] = flag
        if self.topo.layout.n_partitions > 1:
            self.topo.replica.Allreduce(MPI.IN_PLACE, self.flag, op=MPI.MAX)
        return bool(self.flag[0])

    def hand_in(self, final: dict) -> bool:
        """Send the records (and state) to shard 0; once they are delivered (and every push was
        flushed and counted before), the DONE mark counts this worker finished. True if shard 0
        had declared it failed meanwhile (it no longer counts this worker)."""
        send(self.topo.world, final, self.shard0, Tag.FINAL, self.liveness.wait)
        home, slot = heartbeat_home(self.topo.layout, self.topo.rank)
        old = self.block.add(self.topo.layout.shard_rank(home), slot, DONE_MARK)
        return bool(old & FAILED_MARK)


class FinalMessages:
    """Shard 0's receipt of the workers' FINAL messages (records and state) while it
    serves: a worker marks itself done only once its message is delivered, so the message of
    every done worker is here by the end, and one from a worker that dies meanwhile (counted
    failed) is left aside."""

    def __init__(self, comm: MPI.Intracomm):
        self.comm = comm
        self.pending: dict[int, MPI.Request] = {}
        self.received: dict[int, dict] = {}

    def poll(self) -> None:
        while True:
            status = MPI.Status()
            message = self.comm.improbe(source=MPI.ANY_SOURCE, tag=Tag.FINAL, status=status)
            if message is None:
                break
            self.pending[status.Get_source()] = message.irecv()
        for source, request in list(self.pending.items()):
            try:
                done, obj = request.test()
            except MPI.Exception:  # the worker died mid-transfer: its heartbeat stops too
                del self.pending[source]
                continue
            if done:
                self.received[source] = obj
                del self.pending[source]

    def of(self, workers, liveness) -> dict[int, dict]:
        """The messages of `workers` (all done: delivered before they marked themselves)."""
        def complete() -> bool:
            self.poll()
            return all(w in self.received for w in workers)

        liveness.wait(complete)
        return {w: self.received[w] for w in workers}


def read_verdict(windows, layout, liveness) -> int:
    """Wait for shard 0 to say how the run ends (everything is in the final checkpoint)."""
    shard0, seen = layout.shard_rank(0), []

    def decided() -> bool:
        seen.append(windows.block.read(shard0, Slot.VERDICT))
        return seen[-1] != 0

    liveness.wait(decided, high=0.02)
    return seen[-1]


def tell_outcome(world, layout, liveness, diverged: str | None) -> Callable[[], bool]:
    """Shard 0: send `diverged` (None: it did not) to every rank that reads the verdict, so
    each ends the same way; returns a test that the sends are done (a reader that died
    meanwhile counts as told)."""
    readers = sorted(liveness.done_workers) + list(layout.shard_ranks[1:])
    requests = [world.isend(diverged, dest=rank, tag=Tag.OUTCOME) for rank in readers]

    def told() -> bool:
        try:
            return MPI.Request.Testall(requests)
        except MPI.Exception:
            return True
    return told


def give_verdict(windows, verdict: int) -> None:
    """Shard 0: set how the run ends (VERDICT_CLEAN or VERDICT_FAILED) on its own block."""
    windows.block.add(windows.layout.shard_rank(0), Slot.VERDICT, verdict)


def count_released(windows) -> int:
    """Shard 0: how many ranks read a FAILED verdict and are leaving."""
    return windows.block.read(windows.layout.shard_rank(0), Slot.RELEASED)


def released(windows) -> None:
    """Any rank but shard 0, after a FAILED verdict: tell shard 0 it leaves."""
    windows.block.add(windows.layout.shard_rank(0), Slot.RELEASED)
