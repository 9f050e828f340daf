"""Sandblaster's point-to-point messages between the coordinator and the other ranks, and
within a replica, so dbmpi.algorithms.sandblaster never touches MPI itself.

- `CoordinatorChannel`: the coordinator's end (over `world`): replies to the replicas'
  leads, the end-of-run verdicts, a probe for the next message with a tag.
- `RankChannel`: a worker's or a shard's end (over `world`): a replica lead's requests and
  test results, every rank's records and the verdict that answers them.
- `PartitionRelay`: within a replica (over `topo.replica`): the lead passes each reply on to
  the other partitions, and the partitions share a stop signal at a flush.

Waiting is polite (dbmpi.runtime.comm.wait / Wait): ranks share cores with the ones computing.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from dbmpi.runtime.comm import Tag, Wait, wait

ANY_SOURCE = MPI.ANY_SOURCE


class CoordinatorChannel:
    """The coordinator's messages to and from the other ranks."""

    def __init__(self, world: MPI.Intracomm):
        self.world = world
        # Replies sent to ranks that may be dead: never waited for, so kept, not freed.
        self.unwaited: list[MPI.Request] = []

    def reply(self, rank: int, message: dict) -> None:
        """A reply to a replica lead's request (work, a test, stop)."""
        self.world.send(message, dest=rank, tag=Tag.REPLY)

    def reply_unwaited(self, rank: int, message: dict) -> None:
        """A reply to a rank that may be dead (a dismissal): sent, never waited for."""
        self.unwaited.append(self.world.isend(message, dest=rank, tag=Tag.REPLY))

    def verdict(self, rank: int, clean: bool) -> None:
        """How `rank` ends, in answer to its records (True: the collective teardown)."""
        self.world.send(clean, dest=rank, tag=Tag.VERDICT)

    def receive(self, tag: int, source: int = ANY_SOURCE) -> tuple[int, object] | None:
        """(sender, message) of a message with `tag` from `source` if one is in, else None."""
        status = MPI.Status()
        found = self.world.improbe(source=source, tag=tag, status=status)
        if found is None:
            return None
        message = found.recv()
        return status.Get_source(), message

    def abort(self, code: int) -> None:
        """End the whole job with `code` (nothing can finish)."""
        self.world.Abort(code)


class RankChannel:
    """A worker's or a shard's messages to and from the coordinator."""

    def __init__(self, world: MPI.Intracomm, coordinator: int):
        self.world, self.coordinator = world, coordinator

    def ask(self, request: dict) -> dict:
        """A replica lead's request (what it did, and for more work); the coordinator's reply."""
        self.world.send(request, dest=self.coordinator, tag=Tag.REQUEST)
        return wait(self.world.irecv(source=self.coordinator, tag=Tag.REPLY))

    def send_result(self, result) -> None:
        """A test evaluation's result."""
        self.world.send(result, dest=self.coordinator, tag=Tag.RESULT)

    def send_records(self, message: dict) -> None:
        """This rank's records, once its part of the run is over."""
        self.world.send(message, dest=self.coordinator, tag=Tag.RECORDS)

    def verdict(self) -> bool:
        """The coordinator's answer to the records: True, end with the collective teardown;
        False, a replica failed (leave without collectives)."""
        return wait(self.world.irecv(source=self.coordinator, tag=Tag.VERDICT), high=0.05)


class PartitionRelay:
    """A replica's partitions (its rank in `replica` is its partition; the lead is 0)."""

    def __init__(self, replica: MPI.Intracomm):
        self.replica = replica
        self.signalled = np.zeros(1, np.int64)

    def share(self, reply: np.ndarray) -> None:
        """The lead sends `reply` to the other partitions; they receive it into `reply`
        (point to point: polled nonblocking collectives are slow)."""
        if self.replica.rank == 0:
            for other in range(1, self.replica.size):
                self.replica.Send(reply, dest=other, tag=Tag.REPLY)
        else:
            Wait(self.replica.Irecv(reply, source=0, tag=Tag.REPLY))

    def any_signalled(self, signalled: bool) -> bool:
        """Whether a stop signal reached any partition (collective over the replica)."""
        self.replica.Allreduce(np.array([int(signalled)]), self.signalled, op=MPI.MAX)
        return bool(self.signalled[0])
