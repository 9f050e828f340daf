"""Sandblaster's point-to-point messages between the coordinator and the other ranks, and
within a replica, so dbmpi.algorithms.sandblaster never touches MPI itself.

- `CoordinatorChannel`: the coordinator's end (over `world`): the replicas' requests (fixed-size
  int64 buffers on preposted receives) and the replies to their leads, the end-of-run
  verdicts, a probe for the next pickled message with a tag (results, records).
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
    """The coordinator's messages to and from the other ranks. Requests and replies are
    fixed-size int64 buffers (their fields: dbmpi.algorithms.portions): a ring of `ring`
    receives from any source stays posted, so a request lands without a probe or a pickle,
    and is taken in the order MPI matched it (the oldest posted receive matches first)."""

    def __init__(self, world: MPI.Intracomm, request_fields: int, reply_fields: int, ring: int = 16):
        self.world = world
        self.requests = np.zeros((ring, request_fields), np.int64)
        self.posted = [self._post(slot) for slot in range(ring)]
        self.head = 0  # the slot posted first
        self.status = MPI.Status()
        self.outgoing = np.zeros(reply_fields, np.int64)
        # Replies sent to ranks that may be dead: never waited for, so kept (with their buffers).
        self.unwaited: list[tuple[MPI.Request, np.ndarray]] = []

    def _post(self, slot: int) -> MPI.Request:
        return self.world.Irecv(self.requests[slot], source=ANY_SOURCE, tag=Tag.REQUEST)

    def request(self) -> tuple[int, np.ndarray] | None:
        """(sender, fields) of the next request if one is in; its slot is posted again."""
        slot = self.head
        if not self.posted[slot].Test(self.status):
            return None
        fields = self.requests[slot].copy()
        self.posted[slot] = self._post(slot)
        self.head = (slot + 1) % len(self.posted)
        return self.status.Get_source(), fields

    def reply(self, rank: int, fields) -> None:
        """A reply (REPLY_FIELDS integers) to a replica lead's request: work, a test, stop."""
        self.outgoing[:] = fields
        self.world.Send(self.outgoing, dest=rank, tag=Tag.REPLY)

    def reply_unwaited(self, rank: int, fields) -> None:
        """A reply to a rank that may be dead (a dismissal): sent, never waited for."""
        buffer = np.array(fields, np.int64)
        self.unwaited.append((self.world.Isend(buffer, dest=rank, tag=Tag.REPLY), buffer))

    def close(self) -> None:
        """Withdraw the posted receives (no more requests are served)."""
        for posted in self.posted:
            posted.Cancel()
            posted.Wait()
        self.posted = []

    def verdict(self, rank: int, clean: bool) -> None:
        """How `rank` ends, in answer to its records (True: the collective teardown)."""
        self.world.send(clean, dest=rank, tag=Tag.VERDICT)

    def receive(self, tag: int, source: int = ANY_SOURCE) -> tuple[int, object] | None:
        """(sender, message) of a pickled message with `tag` (a result, records) from
        `source` if one is in, else None. Requests come through `request`."""
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

    def ask(self, request: np.ndarray, reply: np.ndarray) -> np.ndarray:
        """A replica lead's request (int64 fields: what it did, and for more work); the
        coordinator's reply lands in `reply` (received posted before the request goes)."""
        answer = self.world.Irecv(reply, source=self.coordinator, tag=Tag.REPLY)
        self.world.Send(request, dest=self.coordinator, tag=Tag.REQUEST)
        Wait(answer)
        return reply

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
