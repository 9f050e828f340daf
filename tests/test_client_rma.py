"""RMA operations per replica step, counted with counting windows (tests/rma_count.py):
per shard, a push is its accumulate plus one exchange on the control block, a fetch reads
version and data in one round trip (with the last push's exchange), and neither depends on
the numbers of replicas, shards or workers (issue 13)."""
from collections import Counter

import pytest

from dbmpi.runtime.layout import Layout
from tests.rma_count import BLOCKING, CountingWindows, count_step_calls

N_PARAMS = 10_007
STEPS = 5

# Per shard and step (n_fetch = n_push = 1): the fetch first completes the last push (flush
# of the inbox), then issues that push's exchange (Get_accumulate SUM over VERSION, PUSHES,
# ABSORBED) beside its own reads of VERSION and the data, and flushes both windows; the step
# ends with the next push's accumulate.
PER_SHARD_STEP = Counter({("control", "Get_accumulate"): 2, ("params", "Get_accumulate"): 1,
                          ("params", "Flush"): 1, ("control", "Flush"): 1,
                          ("inbox", "Accumulate"): 1, ("inbox", "Flush"): 1})


def step_counts(layout: Layout, worker_rank: int, ranges, max_backlog=None) -> dict[int, Counter]:
    return count_step_calls(layout, worker_rank, ranges, STEPS, max_backlog)


@pytest.mark.parametrize("n_replicas,n_shards", [(1, 1), (2, 2), (8, 3), (64, 5), (200, 8)])
def test_a_step_costs_the_same_per_shard_whatever_the_layout(n_replicas, n_shards):
    layout = Layout(N_PARAMS, n_shards, n_replicas)
    for worker in (0, layout.n_workers - 1):
        per_target = step_counts(layout, worker, [(0, N_PARAMS)])
        assert sorted(per_target) == layout.shard_ranks  # only shards are reached
        for rank, calls in per_target.items():
            assert calls == Counter({k: STEPS * v for k, v in PER_SHARD_STEP.items()}), (rank, calls)


def test_two_round_trips_per_shard_and_step():
    """What a step waits for, per shard: the push's data, then its count with the fetch."""
    layout = Layout(N_PARAMS, 2, 2)
    for calls in step_counts(layout, 0, [(0, N_PARAMS)]).values():
        blocking = sum(n for (window, call), n in calls.items() if call in BLOCKING)
        # the inbox; then params and control, flushed after everything was issued
        assert blocking == 3 * STEPS


def test_a_model_partition_reaches_only_the_shards_of_its_blocks():
    layout = Layout(N_PARAMS, 4, 3, n_partitions=2)
    ranges = [(0, 1000), (6000, 7000)]  # two blocks, in the first and third shard's ranges
    per_target = step_counts(layout, layout.n_workers - 1, ranges)
    shards = sorted({seg.shard for a, b in ranges for seg in layout.segments(a, b)})
    assert sorted(per_target) == [layout.shard_rank(k) for k in shards]
    for calls in per_target.values():
        assert calls == Counter({k: STEPS * v for k, v in PER_SHARD_STEP.items()})


def test_the_backlog_bound_costs_nothing_while_shards_keep_up():
    """The exchange brings ABSORBED back: no extra read unless a wait is needed."""
    layout = Layout(N_PARAMS, 2, 4)
    for calls in step_counts(layout, 1, [(0, N_PARAMS)], max_backlog=2).values():
        assert calls == Counter({k: STEPS * v for k, v in PER_SHARD_STEP.items()})


def test_a_worker_looks_for_a_relayed_stop_at_most_every_stop_look_s():
    """The stop flag on shard 0 is read on a human's time scale, not every step."""
    from types import SimpleNamespace

    from dbmpi.runtime.runcontrol import STOP_LOOK_S, ReplicaControl

    layout = Layout(N_PARAMS, 2, 2)
    windows = CountingWindows(layout, 0)
    now = [0.0]
    control = ReplicaControl(windows, SimpleNamespace(layout=layout), None, clock=lambda: now[0])
    for _ in range(100):  # 100 steps within one look
        control.stop_seen()
        now[0] += STOP_LOOK_S / 200
    assert len(windows.calls) == 2  # one Fetch_and_op(NO_OP) and its flush, on shard 0
    assert {rank for _, _, rank in windows.calls} == {layout.shard_rank(0)}
    now[0] += STOP_LOOK_S
    control.stop_seen()
    assert len(windows.calls) == 4
