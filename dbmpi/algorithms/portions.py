"""Sandblaster's load balancing: a batch cut into portions, handed out on request.

Pure and MPI-free: the coordinator feeds it the replicas' messages and sends back what it
decides. The paper's scheme, plus the bookkeeping that makes the batch gradient exact, at a
cost per request that does not grow with the portions or the replicas (`FreeRuns` and the
backup heaps below; `tests/test_portions.py` counts it):

- A batch is cut into many more portions than there are replicas. A replica that asks gets
  the portion after the one it did last if that one is free (data affinity: sequential
  reads), else it starts in the middle of the longest run of free portions.
- When no portion is free, an idle replica gets a backup copy of an outstanding one (the
  one with the fewest backups, then the oldest), so a slow replica cannot hold up the end
  of the batch. A portion gets at most `MAX_BACKUPS` late copies while it is out; when any
  copy commits, the others are cancelled: their replicas are told no at their next request,
  and their gradients for it never count.
- Commit protocol: a replica that finishes a portion asks to commit it; only the first
  finisher holding a live copy is told yes, so a duplicate never counts. A committed
  portion's gradient stays in the replica's accumulator until the coordinator tells it to
  flush (after `push_every` portions, at once when the batch has no free portion left, or
  at once for a replica that is much slower than the others); the flush pushes it to the
  shards, and the portions are counted done when the replica reports it (with their number,
  which must match what the coordinator committed to it).
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

import heapq
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

FREE, ASSIGNED, COMMITTED, FLUSHED = "free", "assigned", "committed", "flushed"
MAX_BACKUPS = 2  # late copies of one portion while it is out


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


@dataclass
class BatchStats:
    portions: int = 0
    examples: int = 0
    loss: float = 0.0
    nonfinite: int = 0
    backups_issued: int = 0
    backups_won: int = 0  # portions committed from a backup copy
    backups_cancelled: int = 0  # copies (backup or original) cancelled because another committed
    duplicates_rejected: int = 0  # reports of a copy that was cancelled or is stale: never counted
    revoked: int = 0
    committed_by: dict[int, int] = field(default_factory=dict)
    reissued: int = 0  # portions handed out again because the replica holding them failed


class FreeRuns:
    """The free portions as runs of consecutive indices: take the first of a given run
    (a replica reading on) or split the longest one, in O(log n) (a heap of runs by length,
    entries checked when popped). Portions given back are runs of one (never merged)."""

    def __init__(self, n: int):
        self.stop_of: dict[int, int] = {}  # run start -> run stop
        self.heap: list[tuple[int, int]] = []  # (-length, start), some of them stale
        self.count = 0
        self.add(0, n)

    def add(self, start: int, stop: int) -> None:
        if stop > start:
            self.stop_of[start] = stop
            heapq.heappush(self.heap, (start - stop, start))
            self.count += stop - start

    def take_first(self, index: int) -> bool:
        """Take `index` if a run starts there."""
        stop = self.stop_of.pop(index, None)
        if stop is None:
            return False
        self.count -= stop - index
        self.add(index + 1, stop)
        return True

    def take_split(self) -> int:
        """The middle of the longest run (the first of a run of one or two), so every
        replica then reads long sequential stretches."""
        while True:
            negative_length, start = heapq.heappop(self.heap)
            if self.stop_of.get(start) == start - negative_length:
                break
        stop = self.stop_of.pop(start)
        self.count -= stop - start
        index = start + ((stop - start) // 2 if stop - start > 2 else 0)
        self.add(start, index)
        self.add(index + 1, stop)
        return index


class PortionScheduler:
    """Portions of one batch and who has what; `handle` turns a request into a Reply or
    None (park the replica until there is work: the coordinator asks again)."""

    def __init__(self, portions: list[tuple[int, int]], n_replicas: int, push_every: int = 4,
                 backups: bool = True, failed: Iterable[int] = ()):
        if push_every < 1:
            raise ValueError(f"push_every: must be positive, got {push_every}")
        n = len(portions)
        self.portions = list(portions)
        self.state = [FREE] * n
        self.counts = {FREE: n, ASSIGNED: 0, COMMITTED: 0, FLUSHED: 0}
        self.free = FreeRuns(n)
        self.copies: list[set[int]] = [set() for _ in range(n)]  # replicas computing a live copy
        self.backup_copies: list[set[int]] = [set() for _ in range(n)]
        self.backups_of = [0] * n  # late copies issued since the portion was last handed out
        self.issued_at = [0] * n  # order of its last first issue (the oldest is backed up first)
        # (issued_at, index) of outstanding portions by how many backups they have: checked when popped
        self.candidates: list[list[tuple[int, int]]] = [[] for _ in range(MAX_BACKUPS)]
        self.owner: list[int | None] = [None] * n  # who committed it
        self.n_replicas = n_replicas
        self.push_every = push_every
        self.backups = backups
        self.unflushed: dict[int, list[int]] = {r: [] for r in range(n_replicas)}
        self.revoked: set[int] = set()  # replicas that must discard before adding
        self.working: dict[int, int | None] = dict.fromkeys(range(n_replicas))
        self.busy_holders: set[int] = set()  # working while holding unflushed commits
        self.cancelled: dict[int, int] = {}  # replica -> the portion whose copy it computes was cancelled
        self.last: dict[int, int] = {}  # the portion a replica did last (affinity)
        self._clock = 0
        self.commits = 0
        self.started_at: dict[int, int] = {}  # commits (by anyone) when a replica began its portion
        self.stats = BatchStats(portions=n)
        self.failed: set[int] = set()  # replicas that died: never handed anything again
        self.flushing: set[int] = set()  # told to flush, report not in yet
        for replica in failed:
            self.fail(replica)

    # Queries ------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self.counts[FLUSHED] == len(self.portions)

    def _set(self, index: int, state: str) -> None:
        self.counts[self.state[index]] -= 1
        self.counts[state] += 1
        self.state[index] = state

    def _release(self, index: int) -> None:
        """Back to the free portions (a failed holder, revoked commits)."""
        self._set(index, FREE)
        self.owner[index] = None
        self.copies[index].clear()
        self.backup_copies[index].clear()
        self.backups_of[index] = 0
        self.free.add(index, index + 1)

    # Requests -----------------------------------------------------------------------------
    def handle(self, replica: int, done: int | None = None, flushed: dict | None = None) -> Reply | None:
        """A replica reports (a finished portion `done`, and/or the result of a flush:
        {"portions": how many, "loss", "nonfinite"}) and asks for work."""
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
        self._stop_working(replica, done=None)
        for index in self.unflushed[replica]:
            self._release(index)
            self.stats.reissued += 1
        self.unflushed[replica] = []
        return intact

    def _stop_working(self, replica: int, done: int | None) -> None:
        """The replica is no longer computing; a live copy it did not report (it died, or
        asked without reporting it) is dropped, and the portion freed if no copy is left."""
        index = self.working[replica]
        self.working[replica] = None
        self.busy_holders.discard(replica)
        if index is None or index == done:
            return
        self.cancelled.pop(replica, None)
        if replica not in self.copies[index]:
            return
        self.copies[index].discard(replica)
        self.backup_copies[index].discard(replica)
        if self.state[index] == ASSIGNED and not self.copies[index]:
            self._release(index)
            self.stats.reissued += 1

    def _handle(self, replica: int, done: int | None, flushed: dict | None) -> Reply | None:
        reply = Reply()
        self._stop_working(replica, done)
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
        if slow and self.unflushed[replica]:
            reply.flush = True
            return reply
        return self._next(replica, reply)

    def _commit(self, replica: int, index: int) -> bool:
        """Yes to the first live copy reported; the other copies are cancelled."""
        self.cancelled.pop(replica, None)
        live = replica in self.copies[index]
        was_backup = replica in self.backup_copies[index]
        if self.state[index] != ASSIGNED or not live:
            self.stats.duplicates_rejected += 1
            return False
        self.copies[index].discard(replica)
        for other in self.copies[index]:  # told no at their next request
            self.cancelled[other] = index
        self.stats.backups_cancelled += len(self.copies[index])
        self.copies[index].clear()
        self.backup_copies[index].clear()
        self._set(index, COMMITTED)
        self.commits += 1
        self.owner[index] = replica
        self.unflushed[replica].append(index)
        self.stats.backups_won += was_backup
        return True

    def _flushed(self, replica: int, report: dict) -> None:
        held = self.unflushed[replica]
        if report["portions"] != len(held):  # the commit protocol's invariant; never expected
            raise ValueError(f"replica {replica} reported a flush of {report['portions']} portions; "
                             f"{len(held)} were committed to it")
        for index in held:
            self._set(index, FLUSHED)
            a, b = self.portions[index]
            self.stats.examples += b - a
        self.stats.committed_by[replica] = self.stats.committed_by.get(replica, 0) + len(held)
        self.unflushed[replica] = []
        self.stats.loss += report["loss"]
        self.stats.nonfinite += int(report.get("nonfinite", 0))

    def _next(self, replica: int, reply: Reply) -> Reply | None:
        held = self.unflushed[replica]
        if held and (len(held) >= self.push_every or not self.free.count):
            reply.flush = True
            return reply
        if self.free.count:
            after = self.last.get(replica, -2) + 1
            index = after if self.free.take_first(after) else self.free.take_split()
            return self._give(replica, index, reply, backup=False)
        if self.backups:
            index = self._backup_for(replica)
            if index is not None:
                self.stats.backups_issued += 1
                return self._give(replica, index, reply, backup=True)
        # Nothing to compute: if the batch now waits only for commits held by replicas busy
        # elsewhere, take those back and hand them out again.
        if self._revoke_stuck():
            return self._give(replica, self.free.take_split(), reply, backup=False)
        if reply.commit is not None or reply.discard:
            # The verdict must reach it even if there is no work: nothing to compute yet.
            return reply
        return None  # park

    def _give(self, replica: int, index: int, reply: Reply, backup: bool) -> Reply:
        if backup:
            self.backups_of[index] += 1
            self.backup_copies[index].add(replica)
        else:
            self._set(index, ASSIGNED)
            self._clock += 1
            self.issued_at[index] = self._clock
        if self.backups_of[index] < MAX_BACKUPS:
            heapq.heappush(self.candidates[self.backups_of[index]], (self.issued_at[index], index))
        self.copies[index].add(replica)
        self.working[replica] = index
        if self.unflushed[replica]:
            self.busy_holders.add(replica)
        self.started_at[replica] = self.commits
        self.last[replica] = index
        a, b = self.portions[index]
        reply.portion, reply.backup = (index, a, b), backup
        return reply

    def _backup_for(self, replica: int) -> int | None:
        """The outstanding portion with the fewest backups, then the oldest, that `replica`
        is not computing: the heaps' stale entries (committed, reissued, backed up since)
        are dropped as they surface, so each entry is popped once."""
        for level, heap in enumerate(self.candidates):
            aside = []
            chosen = None
            while heap and chosen is None:
                issued, index = heapq.heappop(heap)
                if (self.state[index] != ASSIGNED or self.backups_of[index] != level
                        or self.issued_at[index] != issued):
                    continue
                if replica in self.copies[index]:
                    aside.append((issued, index))
                else:
                    chosen = index
            for entry in aside:
                heapq.heappush(heap, entry)
            if chosen is not None:
                return chosen
        return None

    def _revoke_stuck(self) -> bool:
        if self.counts[FREE] or self.counts[ASSIGNED]:
            return False  # work is still going on elsewhere (or could be backed up)
        revoked_any = False
        for replica in self.busy_holders:  # an idle holder is about to be told to flush
            for index in self.unflushed[replica]:
                self._release(index)
                self.stats.revoked += 1
            self.unflushed[replica] = []
            self.revoked.add(replica)
            revoked_any = True
        self.busy_holders.clear()
        return revoked_any


class Silence:
    """Which replicas owe the coordinator a message, and since when. A replica owes one
    from the moment it is sent anything but a stop (work, a verdict, a flush order, a test
    evaluation) until its next message; parked and waiting replicas owe nothing. One that
    owes a message for longer than `timeout_s` is taken for dead. Pure: the caller passes
    the clock (time.monotonic(), never decreasing), so the replicas owing a message are kept
    oldest first and `overdue` looks only at those past the timeout; at the start every
    replica owes its first request."""

    def __init__(self, n_replicas: int, timeout_s: float, now: float):
        self.n_replicas = n_replicas
        self.timeout_s = float(timeout_s)
        self.owed: OrderedDict[int, float] = OrderedDict.fromkeys(range(n_replicas), now)
        self.failed: set[int] = set()

    @property
    def live(self) -> list[int]:
        return [r for r in range(self.n_replicas) if r not in self.failed]

    def asked(self, replica: int, now: float) -> None:
        if replica not in self.failed:
            self.owed[replica] = now
            self.owed.move_to_end(replica)

    def heard(self, replica: int) -> None:
        self.owed.pop(replica, None)

    def overdue(self, now: float) -> list[tuple[int, float]]:
        """(replica, seconds silent) of the live replicas silent past the timeout, by replica."""
        late = []
        for replica, since in self.owed.items():
            if now - since <= self.timeout_s:
                break
            late.append((replica, now - since))
        return sorted(late)

    def fail(self, replica: int) -> None:
        self.failed.add(replica)
        self.owed.pop(replica, None)


# The messages --------------------------------------------------------------------------------
# Requests and replies travel as fixed-size int64 buffers (dbmpi.runtime.portion_channel): no
# pickling, preposted receives. A request: replica, evaluation of the portion reported, that
# portion (-1: none), portions flushed (-1: no flush report), the flush's loss (float64 bits),
# its non-finite gradient entries, a stop signal seen (0/1).
REQUEST_FIELDS = 7
REPLY_FIELDS = 10  # Order's fields
STOPPED, DISMISSED = 1, 2  # a stop reply's first field: the run is over / declared failed


def encode_request(out: np.ndarray, replica: int, evaluation: int, done: int | None, flushed: dict | None,
                   signal: bool) -> np.ndarray:
    """A replica lead's request into `out` (REQUEST_FIELDS int64s)."""
    out[:] = (replica, evaluation, -1 if done is None else done, -1 if flushed is None else flushed["portions"],
              0, 0 if flushed is None else flushed["nonfinite"], int(signal))
    out.view(np.float64)[4] = 0.0 if flushed is None else flushed["loss"]
    return out


def decode_request(fields: np.ndarray) -> dict:
    """The request `encode_request` wrote, as the coordinator reads it."""
    replica, evaluation, done, flushed, _, nonfinite, signal = fields.tolist()
    report = None if flushed < 0 else {"portions": flushed, "loss": float(fields.view(np.float64)[4]),
                                        "nonfinite": nonfinite}
    return {"replica": replica, "evaluation": evaluation, "done": None if done < 0 else done,
            "flushed": report, "signal": bool(signal)}


class Order(NamedTuple):
    """A reply as REPLY_FIELDS int64s, in this order: what the replica does next."""

    stop: int  # 0, STOPPED or DISMISSED
    discard: int  # drop the accrual (its commits were revoked)
    commit: int  # the portion just reported counts
    flush: int  # push the accrual and report it
    index: int  # the portion to compute (-1: none)
    begin: int  # its examples [begin, end)
    end: int
    evaluation: int
    n: int  # the batch's examples
    test: int  # evaluate the published point on the test set

    @classmethod
    def of(cls, reply: Reply, evaluation: int, n: int) -> Order:
        """The scheduler's reply during evaluation `evaluation` of a batch of `n` examples."""
        index, begin, end = reply.portion or (-1, 0, 0)
        return cls(0, int(reply.discard), int(bool(reply.commit)), int(reply.flush), index, begin, end,
                   evaluation, n, 0)

    @classmethod
    def stopped(cls, how: int = STOPPED) -> Order:
        return cls(how, 0, 0, 0, -1, 0, 0, 0, 1, 0)

    @classmethod
    def tested(cls, evaluation: int, discard: bool, begin: int, end: int) -> Order:
        """Score test rows [begin, end) of the published point (first dropping a void accrual)."""
        return cls(0, int(discard), 0, 0, -1, begin, end, evaluation, 1, 1)


__all__ = ["DISMISSED", "MAX_BACKUPS", "REPLY_FIELDS", "REQUEST_FIELDS", "STOPPED", "BatchStats", "FreeRuns",
           "Order", "PortionScheduler", "Reply", "Silence", "cut", "decode_request", "encode_request"]
