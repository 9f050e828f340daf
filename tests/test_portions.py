"""Sandblaster's portion scheduler, without MPI: replicas simulated in virtual time.

Each simulated replica does what dbmpi.algorithms.sandblaster's replicas do with a reply: discard its
accumulator when told, add the portion it reported when committed, flush when told, compute
the portion it is given. The checks are what the batch gradient relies on: every portion
counted exactly once, whatever the speeds, and a slow replica not holding up the batch
when backups are on.
"""
import heapq
import itertools
import sys

import numpy as np
import pytest

from dbmpi.algorithms import portions
from dbmpi.algorithms.portions import (
    MAX_BACKUPS,
    REPLY_FIELDS,
    REQUEST_FIELDS,
    STOPPED,
    Order,
    PortionScheduler,
    Reply,
    cut,
    decode_request,
    encode_request,
)

FAIL = -1  # an event that is the coordinator declaring a replica failed


def simulate(n_examples=1000, portion=25, speeds=(1.0, 1.0, 1.0), push_every=3, backups=True,
             cost=1.0, deaths=None, timeout=5.0):
    """Run one batch; returns (scheduler, finish time, flushed portion ids in order).
    `deaths`: replica -> the time it dies (nothing from it arrives after that); the
    coordinator declares it failed `timeout` later."""
    deaths = deaths or {}
    scheduler = PortionScheduler(cut(0, n_examples, portion), len(speeds), push_every, backups)
    accumulator = {r: [] for r in range(len(speeds))}
    counted = []
    parked = set()
    events = [(0.0, r, None) for r in range(len(speeds))]  # (time, replica, finished portion)
    events += [(t + timeout, r, FAIL) for r, t in deaths.items()]
    heapq.heapify(events)
    now = 0.0
    while events and not scheduler.complete:
        now, replica, done = heapq.heappop(events)
        flushed = None
        if done == FAIL:  # flushes report at once here, so the sums always stay exact
            assert scheduler.fail(replica) is True
            parked.discard(replica)
        while done != FAIL and now < deaths.get(replica, float("inf")):
            reply = scheduler.handle(replica, done, flushed)
            done, flushed = None, None
            if reply is None:
                parked.add(replica)
                break
            if reply.discard:
                accumulator[replica] = []
            if reply.commit:
                accumulator[replica].append(pending[replica])
            if reply.flush:
                flushed = {"portions": len(accumulator[replica]), "loss": 0.0}
                counted.extend(accumulator[replica])
                accumulator[replica] = []
                continue
            if reply.portion is None:
                continue  # a verdict without work: ask again
            index = reply.portion[0]
            pending[replica] = index
            heapq.heappush(events, (now + cost / speeds[replica], replica, index))
            break
        for other in sorted(parked):  # the coordinator serves parked replicas after each message
            reply = scheduler.handle(other)
            if reply is not None:
                parked.discard(other)
                assert reply.portion is not None and not reply.flush
                pending[other] = reply.portion[0]
                heapq.heappush(events, (now + cost / speeds[other], other, reply.portion[0]))
    return scheduler, now, counted


pending: dict[int, int] = {}


def test_cut_covers_the_batch_in_order():
    assert cut(10, 65, 20) == [(10, 30), (30, 50), (50, 65)]
    assert cut(0, 5, 100) == [(0, 5)]
    with pytest.raises(ValueError, match="portion_size"):
        cut(0, 5, 0)


@pytest.mark.parametrize("speeds", [(1.0,), (1.0, 1.0), (1.0, 0.7, 1.3), (1.0, 1.0, 0.1), (0.05, 1.0)])
@pytest.mark.parametrize("backups", [True, False])
@pytest.mark.parametrize("push_every", [1, 3, 8])
def test_every_portion_counts_exactly_once(speeds, backups, push_every):
    scheduler, _, counted = simulate(speeds=speeds, backups=backups, push_every=push_every)
    assert scheduler.complete
    assert sorted(counted) == list(range(len(scheduler.portions)))
    assert scheduler.stats.examples == 1000
    assert sum(scheduler.stats.committed_by.values()) == len(scheduler.portions)


def test_a_slow_replica_does_not_hold_up_the_batch_with_backups():
    """8 replicas, one 10x slower: with backups the batch costs about the lost capacity
    (1 - 7.1/8 of the replicas' throughput, 13%); without, it waits for the slow one."""
    kw = dict(n_examples=3750, portion=25, push_every=3)
    _, no_straggler, _ = simulate(speeds=(1.0,) * 8, **kw)
    slow = (1.0,) * 7 + (0.1,)
    with_backups, t_backup, _ = simulate(speeds=slow, **kw)
    without, t_plain, _ = simulate(speeds=slow, backups=False, **kw)
    assert t_backup <= 1.2 * no_straggler, (t_backup, no_straggler)
    assert t_plain >= t_backup + 4.0, (t_plain, t_backup)  # a slow portion takes 10 units
    assert with_backups.stats.backups_issued >= 1 and with_backups.stats.backups_won >= 1
    assert without.stats.backups_issued == 0


def test_a_replica_that_never_answers_cannot_stall_the_batch():
    """Speed 1e-9: its first portion never finishes; backups and revocation finish the batch."""
    scheduler, t, counted = simulate(speeds=(1.0, 1e-9, 1.0), push_every=4)
    assert scheduler.complete and t < 100
    assert sorted(counted) == list(range(len(scheduler.portions)))


def test_revoked_commits_are_recomputed_not_lost():
    """A replica holding committed, unflushed portions while it computes a very slow one
    has them revoked, recomputed by the others and never counted twice."""
    s = PortionScheduler(cut(0, 40, 10), 2, push_every=4, backups=True)  # nothing flushes early
    a = s.handle(0).portion[0]
    b = s.handle(1).portion[0]
    reply = s.handle(0, done=a)  # replica 0 commits and takes a third portion, c
    assert reply.commit is True
    c = reply.portion[0]
    reply = s.handle(1, done=b)
    assert reply.commit
    d = reply.portion[0]
    assert sorted({a, b, c, d}) == [0, 1, 2, 3]
    reply = s.handle(1, done=d)  # no free portion left: replica 1 must flush first
    assert reply.commit and reply.flush and reply.portion is None
    reply = s.handle(1, flushed={"portions": 2, "loss": 0.5})
    assert reply.portion[0] == c and reply.backup  # c is outstanding at replica 0
    reply = s.handle(1, done=c)
    assert reply.commit and reply.flush
    reply = s.handle(1, flushed={"portions": 1, "loss": 0.25})
    # Only a is missing, committed at replica 0, which is busy with c: revoked and re-issued.
    assert reply is not None and reply.portion[0] == a and s.stats.revoked == 1
    reply = s.handle(1, done=a)
    assert reply.commit and reply.flush
    s.handle(1, flushed={"portions": 1, "loss": 0.25})
    assert s.complete and s.stats.examples == 40 and s.stats.loss == pytest.approx(1.0)
    assert s.stats.backups_won == 1
    # The slow replica comes back: c is a duplicate and its accumulator (a) is void.
    late = s.handle(0, done=c)
    assert late.commit is False and late.discard is True


def test_data_affinity_gives_sequential_portions():
    """Replicas start far apart and each continues with the portion after its last."""
    s = PortionScheduler(cut(0, 100, 10), 2, push_every=100)
    got = {0: [], 1: []}
    done = {0: None, 1: None}
    for _ in range(5):
        for r in (0, 1):
            reply = s.handle(r, done=done[r])
            got[r].append(reply.portion[0])
            done[r] = reply.portion[0]
    sequential = sum(b == a + 1 for r in (0, 1) for a, b in itertools.pairwise(got[r]))
    assert sequential >= 6, got
    assert abs(got[0][0] - got[1][0]) >= 3


@pytest.mark.parametrize("speeds", [(1.0, 1.0, 1.0), (1.0, 0.3, 1.0), (0.2, 1.0)])
@pytest.mark.parametrize("backups", [True, False])
@pytest.mark.parametrize("push_every", [1, 4])
@pytest.mark.parametrize("dies_at", [0.0, 2.5, 7.5])
def test_a_dead_replicas_portions_are_reissued_and_each_counts_once(speeds, backups, push_every, dies_at):
    """Replica 1 dies (at the start, or mid-batch while it computes and holds unflushed
    commits); declared failed 5 units later, its portions go to the others: the batch
    completes with every portion counted once (its earlier flushes included)."""
    scheduler, _, counted = simulate(speeds=speeds, backups=backups, push_every=push_every,
                                     deaths={1: dies_at})
    assert scheduler.complete and scheduler.failed == {1}
    assert sorted(counted) == list(range(len(scheduler.portions)))
    assert scheduler.stats.examples == 1000
    if dies_at > 0 and not backups:  # it held a portion nobody else had (with backups, maybe)
        assert scheduler.stats.reissued >= 1


def test_every_replica_but_one_dying_still_completes_the_batch():
    scheduler, _, counted = simulate(speeds=(1.0, 1.0, 1.0, 1.0), deaths={0: 3.5, 2: 6.5, 3: 0.0})
    assert scheduler.complete and scheduler.failed == {0, 2, 3}
    assert sorted(counted) == list(range(len(scheduler.portions)))


def test_a_replica_dying_between_its_flush_and_its_report_spoils_the_sums():
    """Told to flush, it may have pushed part of its accumulator before dying: `fail` says
    the batch must be computed again. A replica that dies while computing does not."""
    s = PortionScheduler(cut(0, 30, 10), 2, push_every=1)
    a = s.handle(0).portion[0]
    s.handle(1)
    reply = s.handle(0, done=a)
    assert reply.commit and reply.flush  # push_every = 1
    assert s.fail(0) is False
    assert s.state[a] == "free" and s.stats.reissued == 1
    with pytest.raises(ValueError, match="failed"):
        s.handle(0)
    # Replica 1 dies while computing: its portion goes back, the sums are intact.
    assert s.fail(1) is True
    assert [i for i, st in enumerate(s.state) if st == "free"] == [0, 1, 2] and s.free.count == 3
    assert s.stats.reissued == 2
    # A new batch that knows of the failures gives them nothing and counts on the rest.
    t = PortionScheduler(cut(0, 30, 10), 3, push_every=1, failed=[0, 1])
    assert t.failed == {0, 1} and t.handle(2).portion is not None


def test_silence_takes_a_replica_that_owes_a_message_too_long_for_dead():
    from dbmpi.algorithms.portions import Silence

    watch = Silence(3, timeout_s=10.0, now=0.0)  # every replica owes its first request
    assert watch.overdue(9.0) == []
    watch.heard(0)  # it asked for work, and was parked: it owes nothing
    watch.heard(1)
    watch.asked(1, now=5.0)  # given work at t = 5
    assert watch.overdue(12.0) == [(2, 12.0)]
    assert watch.overdue(16.0) == [(1, 11.0), (2, 16.0)]
    watch.fail(2)
    assert watch.live == [0, 1] and watch.overdue(16.0) == [(1, 11.0)]
    watch.asked(2, now=16.0)  # a failed replica is never waited for again
    assert watch.overdue(100.0) == [(1, 95.0)]


# At scale: 2,000 virtual replicas --------------------------------------------------------
class VirtualBatch:
    """One batch of `n_portions` through `n_replicas` simulated replicas in virtual time, as
    the coordinator serves them (dbmpi.algorithms.sandblaster.ShardSpace): each message is
    handled, then parked replicas are offered work until one is refused. Portion i costs
    `durations[i] / speed` of the replica computing it; a flush costs nothing. Records what
    each replica accrued and flushed, the verdicts on cancelled copies, and the late copies
    each portion got while it was out."""

    def __init__(self, n_replicas, n_portions, speeds, durations, push_every=4):
        self.scheduler = PortionScheduler(cut(0, n_portions, 1), n_replicas, push_every)
        self.speeds, self.durations = speeds, durations
        self.accrued = {r: [] for r in range(n_replicas)}
        self.computing: dict[int, int] = {}
        self.counted: list[int] = []
        self.parked: set[int] = set()
        self.late_copies = [0] * n_portions
        self.cancelled_reports = 0  # reports of a copy cancelled meanwhile: all refused
        self.events = [(0.0, r, None) for r in range(n_replicas)]
        self.now = 0.0

    def run(self) -> float:
        """The batch's virtual duration."""
        heapq.heapify(self.events)
        while not self.scheduler.complete:
            self.now, replica, done = heapq.heappop(self.events)
            self.serve(replica, done)
            while self.parked:  # as ShardSpace._wake_parked
                other = self.parked.pop()
                if not self.serve(other, None):
                    break
        return self.now

    def serve(self, replica, done) -> bool:
        """The replica's requests until it computes or is parked; False if parked at once."""
        flushed = None
        while True:
            was_cancelled = done is not None and self.scheduler.cancelled.get(replica) == done
            reply = self.scheduler.handle(replica, done, flushed)
            if was_cancelled:
                assert reply.commit is False  # a cancelled copy never counts
                self.cancelled_reports += 1
            done, flushed = None, None
            if reply is None:
                self.parked.add(replica)
                return False
            if reply.discard:
                self.accrued[replica] = []
            if reply.commit:
                self.accrued[replica].append(self.computing[replica])
            if reply.flush:
                flushed = {"portions": len(self.accrued[replica]), "loss": 0.0}
                self.counted.extend(self.accrued[replica])
                self.accrued[replica] = []
                continue
            if reply.portion is None:
                continue
            index = reply.portion[0]
            self.late_copies[index] = self.late_copies[index] + 1 if reply.backup else 0
            assert self.late_copies[index] <= MAX_BACKUPS
            self.computing[replica] = index
            heapq.heappush(self.events, (self.now + self.durations[index] / self.speeds[replica], replica, index))
            return True


def straggling_batch(n_replicas, portions_per_replica=10, stragglers=5, seed=0):
    """Portions of random cost (uniform in [0.5, 1.5], mean 1), `stragglers` replicas 10x slow."""
    rng = np.random.default_rng(seed)
    n_portions = n_replicas * portions_per_replica
    speeds = np.ones(n_replicas)
    speeds[rng.choice(n_replicas, stragglers, replace=False)] = 0.1
    durations = rng.uniform(0.5, 1.5, n_portions)
    return VirtualBatch(n_replicas, n_portions, speeds.tolist(), durations.tolist()), float(durations.sum())


def scheduler_lines(batch: VirtualBatch) -> int:
    """Lines of dbmpi/algorithms/portions.py executed while the batch runs: the scheduler's
    operations, Python loops included (a scan over the portions or replicas per request
    shows up as lines per portion growing with the batch)."""
    count = 0

    def local(frame, event, arg):
        nonlocal count
        count += event == "line"
        return local

    def calls(frame, event, arg):
        return local if frame.f_code.co_filename == portions.__file__ else None

    sys.settrace(calls)
    try:
        batch.run()
    finally:
        sys.settrace(None)
    return count


def test_the_scheduler_costs_the_same_per_portion_at_200_and_2000_replicas():
    """Lines of scheduler code per portion, 10 portions per replica: the same (within 25%)
    at 200 replicas / 2,000 portions and 2,000 / 20,000. The scheduler before issue 14
    scanned the portions per request: 460 lines per portion at 20 / 200, 3,946 at 200 / 2,000."""
    per_portion = []
    for n_replicas in (200, 2000):
        batch, _ = straggling_batch(n_replicas)
        lines = scheduler_lines(batch)
        assert batch.scheduler.complete
        per_portion.append(lines / len(batch.scheduler.portions))
    assert per_portion[1] <= 1.25 * per_portion[0], per_portion
    assert per_portion[1] < 400, per_portion  # a few requests per portion, tens of lines each


def test_2000_replicas_with_stragglers_finish_near_the_straggler_floor():
    """2,000 replicas, 20,000 portions of random cost (mean 1), 5 replicas 10x slower. The
    floor is the batch's work over the replicas' capacity: ideal x R / (R - 0.9 k), with
    ideal = work / R (every replica at full speed) and k = 5 replicas that each lose 0.9 of
    theirs (R / (R - 0.9) for one). No scheduler beats it; the last portions, each up to
    1.5 units, keep any from reaching it exactly. Every portion counts once, no portion
    has more than MAX_BACKUPS late copies out, and every cancelled copy reported is refused."""
    n_replicas, stragglers = 2000, 5
    batch, work = straggling_batch(n_replicas, stragglers=stragglers)
    elapsed = batch.run()
    ideal = work / n_replicas
    floor = ideal * n_replicas / (n_replicas - 0.9 * stragglers)
    assert elapsed <= 1.25 * floor, (elapsed, floor)
    stats = batch.scheduler.stats
    assert sorted(batch.counted) == list(range(len(batch.scheduler.portions)))
    assert stats.examples == len(batch.scheduler.portions)
    assert stats.backups_won >= 1 and stats.backups_cancelled >= 1
    # A cancelled copy is refused when reported, or still computing when the batch ends.
    assert batch.cancelled_reports + len(batch.scheduler.cancelled) == stats.backups_cancelled
    assert stats.backups_issued <= MAX_BACKUPS * len(batch.scheduler.portions)


def test_requests_and_replies_round_trip_through_fixed_size_int64_buffers():
    out = np.zeros(REQUEST_FIELDS, np.int64)
    flushed = {"portions": 3, "loss": 0.1 + 0.2, "nonfinite": 7}
    assert decode_request(encode_request(out, 5, 9, None, flushed, True)) == {
        "replica": 5, "evaluation": 9, "done": None, "flushed": flushed, "signal": True}
    assert decode_request(encode_request(out, 0, 1, 0, None, False))["done"] == 0  # portion 0 is not "none"
    order = Order.of(Reply(commit=False, discard=True, portion=(7, 70, 80)), evaluation=4, n=1000)
    fields = np.array(order, np.int64)
    assert fields.shape == (REPLY_FIELDS,) and Order(*fields.tolist()) == order
    assert (order.commit, order.discard, order.index, order.begin, order.end) == (0, 1, 7, 70, 80)
    assert Order.of(Reply(flush=True), 4, 1000).index == -1 and Order.stopped().stop == STOPPED


def test_a_portion_gets_at_most_two_late_copies_and_the_others_are_cancelled_when_one_commits():
    s = PortionScheduler(cut(0, 10, 10), 4, push_every=1)  # one portion, four replicas
    assert s.handle(0).portion[0] == 0
    first, second = s.handle(1), s.handle(2)
    assert first.backup and second.backup and first.portion[0] == second.portion[0] == 0
    assert s.handle(3) is None  # a third late copy is never issued: parked
    reply = s.handle(2, done=0)  # the second backup finishes first
    assert reply.commit is True and reply.flush
    assert s.cancelled == {0: 0, 1: 0} and s.stats.backups_cancelled == 2 and s.stats.backups_won == 1
    assert s.handle(0, done=0).commit is False  # the original, cancelled: told no, never counted
    s.handle(2, flushed={"portions": 1, "loss": 0.5})
    assert s.complete and s.stats.examples == 10 and s.stats.committed_by == {2: 1}
    assert s.handle(1, done=0).commit is False and s.stats.duplicates_rejected == 2
    with pytest.raises(ValueError, match="reported a flush of 3 portions"):
        s.handle(3, flushed={"portions": 3, "loss": 0.0})
