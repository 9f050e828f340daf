"""The control block: every shard's window of int64 counters, read and bumped with
one-sided atomics.

The parameter server's own counters come first (what a shard applied and what was pushed
to it), then the run protocol that shard 0 hosts for everyone (warmstart, checkpoints,
stops, the end of the run), then the heartbeats of the workers this shard watches. Every
fixed slot is named by `Slot`.

Heartbeats are spread over the shards (`heartbeat_home`): the replicas are split into S
contiguous, balanced blocks (as the parameters are), and shard k holds one slot per worker
of its block, a replica's P workers side by side. So each shard's failure detector reads
all of its workers in one operation on its own window, one shard decides alone (and once)
that a whole replica failed, and a worker's beat is one operation on one shard. No shard
holds more than ceil(R / S) x P heartbeats.

Atomicity: every access is an accumulate-class operation on int64 slots with MPI_SUM (to
add) or MPI_NO_OP (to read), followed by a flush, so concurrent updates from any number of
ranks never lose an increment, and every value read is one that was there. An operation
may span several consecutive slots (`exchange`, `read_fixed`): it is atomic per slot, not
across them. Ordering between a push's data and its count comes from the flush: a worker
flushes its accumulate into the inbox before it adds to PUSHES, so a shard that reads the
count finds the data (dbmpi.ps.client).

A push's count is one `exchange` over VERSION, PUSHES, ABSORBED and FETCHED: it adds one to
PUSHES and the shard version its worker last fetched to FETCHED, and returns the old values
(the shard's version for the push's staleness, the pushes before it, and what the shard has
drained, for the backlog bound): one round trip per shard and push. FETCHED lets the shard
measure the mean staleness of the pushes each drain merges (dbmpi.ps.staleness).
What used to be counted per push at the shard (the staleness histogram, the pushes by
replica) is counted by each worker and reported in its records.
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np
from mpi4py import MPI

N_BUCKETS = 16  # histograms: 0, 1, 2-3, 4-7, ..., >= 2**14


class Slot(IntEnum):
    """Fixed slots of a shard's control block."""

    # The parameter server (on every shard); VERSION, PUSHES, ABSORBED, FETCHED stay consecutive
    # (a push's exchange, push_amounts).
    VERSION = 0  # updates the shard applied
    PUSHES = 1  # pushes completed into the inbox (a worker adds 1 after its data is flushed)
    ABSORBED = 2  # the PUSHES count as of the shard's last drain: PUSHES - ABSORBED is the backlog
    FETCHED = 3  # the sum over counted pushes of the VERSION their worker had fetched (staleness)
    WORKERS_DONE = 4  # workers that finished for good (in Downpour counted by shard 0)
    WORKERS_FAILED = 5  # workers shard 0 declared failed (they count as finished)
    REJECTED = 6  # pushes replicas withheld because the gradient was not finite
    DROPPED = 7  # drains in which the shard dropped a chunk because it was not finite
    DRAINS = 8  # drains that found data
    SHARD_BEAT = 9  # this shard's heartbeat, bumped from its own loops
    # The run protocol (read on shard 0)
    CHECKPOINTS = 10  # checkpoints the lead has asked for
    STOPS = 11  # stop requests (signals) any rank has relayed
    WARMED = 12  # 1 once replica 0 has finished warmstart: the other replicas start
    VERDICT = 13  # how the run ends, set by shard 0 once everything is written
    RELEASED = 14  # ranks that read a FAILED verdict and are leaving
    REPLICAS_FAILED = 15  # replicas declared failed, by whichever shard declared them
    HEARTBEATS = 16  # first heartbeat slot of the workers this shard watches (heartbeat_home)


N_FIXED = int(Slot.HEARTBEATS)  # the slots before the heartbeats: what read_fixed returns
# A push's exchange spans VERSION .. FETCHED: it adds one to PUSHES and the version the worker
# fetched to FETCHED, and reads VERSION and ABSORBED beside them.
PUSH_SLOTS = int(Slot.FETCHED) - int(Slot.VERSION) + 1
assert (Slot.VERSION, Slot.PUSHES, Slot.ABSORBED, Slot.FETCHED) == (0, 1, 2, 3)


def push_amounts(n_shards: int) -> np.ndarray:
    """The origin of a push's exchange per shard, (n_shards, PUSH_SLOTS): one for PUSHES;
    the caller writes each shard's fetched version into column Slot.FETCHED before a push."""
    amounts = np.zeros((n_shards, PUSH_SLOTS), np.int64)
    amounts[:, Slot.PUSHES] = 1
    return amounts


VERDICT_CLEAN, VERDICT_FAILED = 1, 2  # no failure: collective teardown; else point to point only
# A worker's heartbeat slot (on its home shard) counts its beats; these marks are added to it once.
FAILED_MARK = 1 << 40  # its home shard declared the worker failed
DONE_MARK = 1 << 50  # the worker finished and sent its records
BEATS = FAILED_MARK - 1  # the mask of the beat count


def control_size(n_heartbeats: int = 0) -> int:
    """int64 slots: the fixed ones, then the heartbeats a shard holds (`home_workers`)."""
    return N_FIXED + n_heartbeats


def _first_replica(shard: int, n_replicas: int, n_shards: int) -> int:
    """The first replica whose heartbeats shard `shard` holds (runtime.layout.balanced_ranges' split)."""
    base, extra = divmod(n_replicas, n_shards)
    return shard * base + min(shard, extra)


def home_shard(replica: int, n_replicas: int, n_shards: int) -> int:
    """The shard holding the heartbeats of `replica`'s workers (O(1), the inverse of _first_replica)."""
    base, extra = divmod(n_replicas, n_shards)
    wide = extra * (base + 1)  # the first `extra` shards hold base + 1 replicas each
    return replica // (base + 1) if replica < wide else extra + (replica - wide) // base


def home_workers(layout, shard: int) -> range:
    """The worker ranks whose heartbeat slots shard `shard` holds, in slot order from
    Slot.HEARTBEATS (whole replicas; empty when there are fewer replicas than shards)."""
    R, P, S = layout.n_replicas, layout.n_partitions, layout.n_shards
    return range(P * _first_replica(shard, R, S), P * _first_replica(shard + 1, R, S))


def heartbeat_home(layout, worker: int) -> tuple[int, int]:
    """(shard index, slot) of worker rank `worker`'s heartbeat: its replica's block."""
    R, P, S = layout.n_replicas, layout.n_partitions, layout.n_shards
    k = home_shard(worker // P, R, S)
    return k, Slot.HEARTBEATS + worker - P * _first_replica(k, R, S)


def staleness_bucket(staleness: int) -> int:
    """Histogram bucket: 0 -> 0, 1 -> 1, 2-3 -> 2, 4-7 -> 3, ... capped at N_BUCKETS - 1."""
    return min(max(int(staleness), 0).bit_length(), N_BUCKETS - 1)


def bucket_label(bucket: int) -> str:
    if bucket <= 1:
        return str(bucket)
    lo, hi = 2 ** (bucket - 1), 2**bucket - 1
    return f">={lo}" if bucket == N_BUCKETS - 1 else f"{lo}-{hi}"


_ZERO = np.zeros(1, np.int64)


class ControlBlock:
    """The control window of every shard (inside an open passive-target epoch)."""

    def __init__(self, win: MPI.Win):
        self.win = win

    def _fetch_op(self, rank: int, slot: int, value: np.ndarray, op) -> int:
        result = np.empty(1, np.int64)
        self.win.Fetch_and_op(value, result, rank, slot, op)
        self.win.Flush(rank)
        return int(result[0])

    def read(self, rank: int, slot: int) -> int:
        """Atomically read one slot of the block on `rank`."""
        return self._fetch_op(rank, slot, _ZERO, MPI.NO_OP)

    def add(self, rank: int, slot: int, amount: int = 1) -> int:
        """Atomically add to one slot of the block on `rank`; returns the old value."""
        return self._fetch_op(rank, slot, np.array([amount], np.int64), MPI.SUM)

    def start_exchange(self, rank: int, slot: int, amounts: np.ndarray, old: np.ndarray) -> None:
        """Start adding `amounts` to the consecutive slots from `slot` on `rank`, their old
        values into `old` (atomic per slot) once `flush(rank)` returns."""
        # Buffers typed explicitly: mpi4py would send int64 arrays as MPI_LONG, which Open MPI
        # refuses beside an MPI_INT64_T target (MPI_ERR_ARG); MPICH accepts either.
        self.win.Get_accumulate([amounts, MPI.INT64_T], [old, MPI.INT64_T], rank,
                                target=(slot, amounts.size, MPI.INT64_T), op=MPI.SUM)

    def start_read(self, rank: int, slot: int, out: np.ndarray) -> None:
        """Start reading `out.size` consecutive slots from `slot` on `rank` (complete at `flush`)."""
        self.win.Get_accumulate([None, 0, MPI.INT64_T], [out, MPI.INT64_T], rank,
                                target=(slot, out.size, MPI.INT64_T), op=MPI.NO_OP)

    def flush(self, rank: int) -> None:
        self.win.Flush(rank)

    def exchange(self, rank: int, slot: int, amounts: np.ndarray) -> np.ndarray:
        """Add `amounts` to consecutive slots from `slot` on `rank`; their old values."""
        old = np.empty(amounts.size, np.int64)
        self.start_exchange(rank, slot, amounts, old)
        self.flush(rank)
        return old

    def read_slots(self, rank: int, slot: int, count: int) -> np.ndarray:
        """`count` consecutive slots from `slot` on `rank` in one operation (atomic per slot)."""
        values = np.empty(count, np.int64)
        self.start_read(rank, slot, values)
        self.flush(rank)
        return values

    def beat(self, rank: int, slot: int, watched: int) -> tuple[int, int]:
        """A worker's heartbeat: add one to `slot` on `rank` and read slot `watched` there
        (that shard's own beat) in one round trip; (old value of `slot`, `watched`)."""
        old, seen = np.empty(1, np.int64), np.empty(1, np.int64)
        self.win.Fetch_and_op(np.ones(1, np.int64), old, rank, slot, MPI.SUM)
        self.win.Fetch_and_op(_ZERO, seen, rank, watched, MPI.NO_OP)
        self.win.Flush(rank)
        return int(old[0]), int(seen[0])

    def read_fixed(self, rank: int) -> np.ndarray:
        """Every fixed slot of the block on `rank` in one operation (atomic per slot)."""
        return self.read_slots(rank, 0, N_FIXED)
