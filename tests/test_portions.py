"""Sandblaster's portion scheduler, without MPI: replicas simulated in virtual time.

Each simulated replica does what dbmpi.sandblaster's replicas do with a reply: discard its
accumulator when told, add the portion it reported when committed, flush when told, compute
the portion it is given. The checks are what the batch gradient relies on: every portion
counted exactly once, whatever the speeds, and a slow replica not holding up the batch
when backups are on.
"""
import heapq

import pytest

from dbmpi.portions import PortionScheduler, cut


def simulate(n_examples=1000, portion=25, speeds=(1.0, 1.0, 1.0), push_every=3, backups=True,
             cost=1.0):
    """Run one batch; returns (scheduler, finish time, flushed portion ids in order)."""
    scheduler = PortionScheduler(cut(0, n_examples, portion), len(speeds), push_every, backups)
    accumulator = {r: [] for r in range(len(speeds))}
    counted = []
    parked = set()
    events = [(0.0, r, None) for r in range(len(speeds))]  # (time, replica, finished portion)
    heapq.heapify(events)
    now = 0.0
    while events and not scheduler.complete:
        now, replica, done = heapq.heappop(events)
        flushed = None
        while True:
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
                flushed = {"portions": list(accumulator[replica]), "loss": 0.0}
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
    reply = s.handle(1, flushed={"portions": [b, d], "loss": 0.5})
    assert reply.portion[0] == c and reply.backup  # c is outstanding at replica 0
    reply = s.handle(1, done=c)
    assert reply.commit and reply.flush
    reply = s.handle(1, flushed={"portions": [c], "loss": 0.25})
    # Only a is missing, committed at replica 0, which is busy with c: revoked and re-issued.
    assert reply is not None and reply.portion[0] == a and s.stats.revoked == 1
    reply = s.handle(1, done=a)
    assert reply.commit and reply.flush
    s.handle(1, flushed={"portions": [a], "loss": 0.25})
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
    sequential = sum(b == a + 1 for r in (0, 1) for a, b in zip(got[r], got[r][1:]))
    assert sequential >= 6, got
    assert abs(got[0][0] - got[1][0]) >= 3
