"""Sandblaster's load balancing: a batch cut into portions, handed out on request.

Pure and MPI-free: the coordinator feeds it the replicas' messages and sends back what it
decides. The paper's scheme, plus the bookkeeping that makes the batch gradient exact:

- A batch is cut into many more portions than there are replicas. A replica that asks gets
  the portion after the one it did last if that one is free (data affinity: sequential
  reads), else it starts in the middle of the longest run of free portions.
- When no portion is free, an idle replica gets a backup copy of an outstanding one (the
  one with the fewest copies, then the oldest), so a slow replica cannot hold up the end
  of the batch.
- Commit protocol: a replica that finishes a portion asks to commit it; only the first
  finisher is told yes, so a duplicate never counts. A committed portion's gradient stays
  in the replica's accumulator until the coordinator tells it to flush (after
  `push_every` portions, at once when the batch has no free portion left, or at once for
  a replica that is much slower than the others); the flush
  pushes it to the shards, and the portion is counted done when the replica reports it.
- A replica busy with a slow portion may still hold committed, unflushed portions. If the
  rest of the batch is waiting only for those, they are revoked: handed out again, and the
  replica is told to discard its accumulator before it adds anything else.

The batch is complete when every portion is committed and flushed; its loss and example
count are the sums the flushes reported.

Failed replicas (`fail`, decided by the coordinator with `Silence`): a replica that died
gets no more work, and what it held goes back to the queue for the others: the portion it
was computing (unless another copy is out) and the portions it committed but had not
flushed. What it flushed (pushed, then reported) stays counted, so no portion counts twice
or never. One case cannot be repaired portion by portion: a replica told to flush that dies
before its report may have landed part of its push in the shards' inboxes; `fail` then
says so and the coordinator computes the batch again (dbmpi.algorithms.sandblaster).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

FREE, ASSIGNED, COMMITTED, FLUSHED = "free", "assigned", "committed", "flushed"


def cut(start: int, stop: int, portion_size: int) -> list[tuple[int, int]]:
    """Example ranges [a, b) of at most portion_size covering [start, stop) in order."""
    if portion_size < 1:
        raise ValueError(f"portion_size: must be positive, got {portion_size}")
    return [(a, min(a + portion_size, stop)) for a in range(start, stop, portion_size)]


@dataclass
class Reply:
    """What the coordinator tells a replica; exactly one of portion / flush / stop / park."""

    commit: bool | None = None  # verdict on the portion the replica just finished
    discard: bool = False  # drop the accumulator (its commits were revoked) before adding
    flush: bool = False  # push the accumulator now and report it
    portion: tuple[int, int, int] | None = None  # (index, start, stop) to compute
    backup: bool = False  # the portion is a backup copy of an outstanding one

    def as_message(self, batch: int) -> dict:
        return {"batch": batch, "commit": self.commit, "discard": self.discard,
                "flush": self.flush, "portion": self.portion, "backup": self.backup}


@dataclass
class BatchStats:
    portions: int = 0
    examples: int = 0
    loss: float = 0.0
    nonfinite: int = 0
    backups_issued: int = 0
    backups_won: int = 0  # portions committed from a backup copy
    duplicates_rejected: int = 0
    revoked: int = 0
    committed_by: dict[int, int] = field(default_factory=dict)
    reissued: int = 0  # portions handed out again because the replica holding them failed


class PortionScheduler:
    """Portions of one batch and who has what; `handle` turns a request into a Reply or
    None (park the replica until `wake` says there is work)."""

    def __init__(self, portions: list[tuple[int, int]], n_replicas: int, push_every: int = 4,
                 backups: bool = True, failed: Iterable[int] = ()):
        if push_every < 1:
            raise ValueError(f"push_every: must be positive, got {push_every}")
        self.portions = list(portions)
        self.state = [FREE] * len(self.portions)
        self.copies: list[set[int]] = [set() for _ in self.portions]  # replicas computing it
        self.backup_copies: list[set[int]] = [set() for _ in self.portions]
        self.issued_at = [0] * len(self.portions)  # order of first issue (for backups)
        self.owner: list[int | None] = [None] * len(self.portions)  # who committed it
        self.n_replicas = n_replicas
        self.push_every = push_every
        self.backups = backups
        self.unflushed: dict[int, list[int]] = {r: [] for r in range(n_replicas)}
        self.revoked: set[int] = set()  # replicas that must discard before adding
        self.working: dict[int, int | None] = dict.fromkeys(range(n_replicas))
        self.last: dict[int, int] = {}  # the portion a replica did last (affinity)
        self._clock = 0
        self.commits = 0
        self.started_at: dict[int, int] = {}  # commits (by anyone) when a replica began its portion
        self.stats = BatchStats(portions=len(self.portions))
        self.failed: set[int] = set()  # replicas that died: never handed anything again
        self.flushing: set[int] = set()  # told to flush, report not in yet
        for replica in failed:
            self.fail(replica)

    # Queries ------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return all(s == FLUSHED for s in self.state)

    def _free(self) -> list[int]:
        return [i for i, s in enumerate(self.state) if s == FREE]

    # Requests -----------------------------------------------------------------------------
    def handle(self, replica: int, done: int | None = None, flushed: dict | None = None) -> Reply | None:
        """A replica reports (a finished portion `done`, and/or the result of a flush) and
        asks for work."""
        if replica in self.failed:
            raise ValueError(f"replica {replica} failed: it has no say any more")
        self.flushing.discard(replica)
        reply = self._handle(replica, done, flushed)
        if reply is not None and reply.flush:
            self.flushing.add(replica)
        return reply

    def fail(self, replica: int) -> bool:
        """The replica died: nothing more for it, and what it held goes back to the queue
        (its current portion unless another copy is out; its committed, unflushed ones).
        True if the flushed sums stay exact; False if it was told to flush and had not
        reported: part of its push may have landed, so the batch must be computed again."""
        intact = replica not in self.flushing
        self.failed.add(replica)
        self.flushing.discard(replica)
        self.revoked.discard(replica)
        for index in range(len(self.portions)):
            self.copies[index].discard(replica)
            self.backup_copies[index].discard(replica)
            if self.state[index] == ASSIGNED and not self.copies[index]:
                self.state[index] = FREE
                self.stats.reissued += 1
        for index in self.unflushed[replica]:
            self.state[index] = FREE
            self.owner[index] = None
            self.stats.reissued += 1
        self.unflushed[replica] = []
        self.working[replica] = None
        return intact

    def _handle(self, replica: int, done: int | None, flushed: dict | None) -> Reply | None:
        reply = Reply()
        if flushed is not None:
            self._flushed(replica, flushed)
        if replica in self.revoked:
            self.revoked.discard(replica)
            reply.discard = True
        slow = False
        if done is not None:
            reply.commit = self._commit(replica, done)
            # Others committed many portions while this one computed its own: a straggler
            # flushes at once, so its commits never wait in it (nor get revoked).
            slow = self.commits - self.started_at.get(replica, self.commits) > 2 * self.n_replicas
        self.working[replica] = None
        if slow and self.unflushed[replica]:
            reply.flush = True
            return reply
        return self._next(replica, reply)

    def _commit(self, replica: int, index: int) -> bool:
        self.copies[index].discard(replica)
        was_backup = replica in self.backup_copies[index]
        self.backup_copies[index].discard(replica)
        if self.state[index] != ASSIGNED:
            self.stats.duplicates_rejected += 1
            return False
        self.state[index] = COMMITTED
        self.commits += 1
        self.owner[index] = replica
        self.unflushed[replica].append(index)
        self.stats.backups_won += was_backup
        return True

    def _flushed(self, replica: int, report: dict) -> None:
        for index in report["portions"]:
            if self.state[index] == COMMITTED and self.owner[index] == replica:
                self.state[index] = FLUSHED
                a, b = self.portions[index]
                self.stats.examples += b - a
                self.stats.committed_by[replica] = self.stats.committed_by.get(replica, 0) + 1
        self.unflushed[replica] = [i for i in self.unflushed[replica] if self.state[i] == COMMITTED]
        self.stats.loss += report["loss"]
        self.stats.nonfinite += int(report.get("nonfinite", 0))

    def _next(self, replica: int, reply: Reply) -> Reply | None:
        held = self.unflushed[replica]
        free = self._free()
        if held and (len(held) >= self.push_every or not free):
            reply.flush = True
            return reply
        if free:
            after = self.last.get(replica, -2) + 1
            index = after if 0 <= after < len(self.state) and self.state[after] == FREE else self._split(free)
            return self._give(replica, index, reply, backup=False)
        if self.backups:
            index = self._backup_for(replica)
            if index is not None:
                self.stats.backups_issued += 1
                return self._give(replica, index, reply, backup=True)
        # Nothing to compute: if the batch now waits only for commits held by replicas busy
        # elsewhere, take those back and hand them out again.
        if self._revoke_stuck(exclude=replica):
            free = self._free()
            return self._give(replica, free[0], reply, backup=False)
        if reply.commit is not None or reply.discard:
            # The verdict must reach it even if there is no work: nothing to compute yet.
            return reply
        return None  # park

    @staticmethod
    def _split(free: list[int]) -> int:
        """Where a replica with no next portion starts: the middle of the longest run of
        free portions (the first of a run of one or two), so every replica then reads
        long sequential stretches."""
        best_start, best_len, start = free[0], 0, free[0]
        for prev, cur in zip(free, free[1:] + [None], strict=True):
            if cur != prev + 1:
                length = prev - start + 1
                if length > best_len:
                    best_start, best_len = start, length
                start = cur
        return best_start + best_len // 2

    def _give(self, replica: int, index: int, reply: Reply, backup: bool) -> Reply:
        if self.state[index] == FREE:
            self.state[index] = ASSIGNED
            self._clock += 1
            self.issued_at[index] = self._clock
        self.copies[index].add(replica)
        if backup:
            self.backup_copies[index].add(replica)
        self.working[replica] = index
        self.started_at[replica] = self.commits
        self.last[replica] = index
        a, b = self.portions[index]
        reply.portion, reply.backup = (index, a, b), backup
        return reply

    def _backup_for(self, replica: int) -> int | None:
        outstanding = [i for i, s in enumerate(self.state)
                       if s == ASSIGNED and replica not in self.copies[i]]
        if not outstanding:
            return None
        return min(outstanding, key=lambda i: (len(self.copies[i]), self.issued_at[i]))

    def _revoke_stuck(self, exclude: int) -> bool:
        if any(s in (FREE, ASSIGNED) for s in self.state):
            return False  # work is still going on elsewhere (or could be backed up)
        revoked_any = False
        for replica, held in self.unflushed.items():
            if replica == exclude or not held or self.working[replica] is None:
                continue  # an idle holder is about to be told to flush
            for index in held:
                self.state[index] = FREE
                self.owner[index] = None
                self.stats.revoked += 1
            self.unflushed[replica] = []
            self.revoked.add(replica)
            revoked_any = True
        return revoked_any


class Silence:
    """Which replicas owe the coordinator a message, and since when. A replica owes one
    from the moment it is sent anything but a stop (work, a verdict, a flush order, a test
    evaluation) until its next message; parked and waiting replicas owe nothing. One that
    owes a message for longer than `timeout_s` is taken for dead. Pure: the caller passes
    the clock (time.monotonic()); at the start every replica owes its first request."""

    def __init__(self, n_replicas: int, timeout_s: float, now: float):
        self.n_replicas = n_replicas
        self.timeout_s = float(timeout_s)
        self.owed: dict[int, float] = dict.fromkeys(range(n_replicas), now)
        self.failed: set[int] = set()

    @property
    def live(self) -> list[int]:
        return [r for r in range(self.n_replicas) if r not in self.failed]

    def asked(self, replica: int, now: float) -> None:
        if replica not in self.failed:
            self.owed[replica] = now

    def heard(self, replica: int) -> None:
        self.owed.pop(replica, None)

    def overdue(self, now: float) -> list[tuple[int, float]]:
        """(replica, seconds silent) of the live replicas silent past the timeout."""
        return [(r, now - since) for r, since in sorted(self.owed.items()) if now - since > self.timeout_s]

    def fail(self, replica: int) -> None:
        self.failed.add(replica)
        self.owed.pop(replica, None)


__all__ = ["BatchStats", "PortionScheduler", "Reply", "Silence", "cut"]
