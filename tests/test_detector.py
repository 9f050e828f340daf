"""The control plane's cost per event, counted on fake windows that hold real int64 blocks
(no MPI ranks): at S = 100 shards, a push, a heartbeat, a detector round, a failure and the
count of finished workers cost the same number of RMA calls at W = 100, 1,000 and 10,000
workers (issue 14: the detector used to read W slots per round at shard 0 and a failure
cost W x W reads). Also what the detector decides: silent replicas failed (all partitions,
once), finished workers counted once, a DONE mark that lands first wins."""
from __future__ import annotations

import socket
from collections import Counter

import numpy as np
import pytest
from mpi4py import MPI

from dbmpi.ps.control import DONE_MARK, FAILED_MARK, Slot, control_size, heartbeat_home, home_workers
from dbmpi.runtime import procfs
from dbmpi.runtime.detector import FailureDetector
from dbmpi.runtime.failover import Liveness
from dbmpi.runtime.layout import Layout
from tests.rma_count import CountingWindows, count_step_calls

S = 100
WORKER_COUNTS = (100, 1_000, 10_000)
TIMEOUT_S = 5.0


class MemoryWin:
    """The control window of every shard as numpy blocks: accumulate-class calls act on
    them as MPI would (SUM or NO_OP, old values returned) and each call is recorded as
    tests/rma_count.py does: (window, call, target rank)."""

    def __init__(self, layout: Layout, calls: list):
        self.calls = calls
        self.blocks = {layout.shard_rank(k): np.zeros(control_size(len(home_workers(layout, k))), np.int64)
                       for k in range(layout.n_shards)}

    def _apply(self, rank: int, disp: int, amounts, result: np.ndarray, op) -> None:
        target = self.blocks[rank][disp:disp + result.size]
        result[:] = target
        if op == MPI.SUM:
            target += amounts
        else:
            assert op == MPI.NO_OP

    def Fetch_and_op(self, origin, result, rank, disp, op):  # noqa: N802 (MPI's names)
        self.calls.append(("control", "Fetch_and_op", rank))
        self._apply(rank, disp, origin, result, op)

    def Get_accumulate(self, origin, result, rank, target, op):  # noqa: N802
        self.calls.append(("control", "Get_accumulate", rank))
        self._apply(rank, target[0], origin[0], result[0], op)

    def Flush(self, rank):  # noqa: N802
        self.calls.append(("control", "Flush", rank))


class MemoryWindows(CountingWindows):
    """CountingWindows whose control window holds real blocks (MemoryWin)."""

    def __init__(self, layout: Layout, rank: int):
        super().__init__(layout, rank)
        self.control = MemoryWin(layout, self.calls)
        self.block.win = self.control

    def slot(self, worker: int) -> int:
        """The current value of `worker`'s heartbeat slot."""
        home, slot = heartbeat_home(self.layout, worker)
        return int(self.control.blocks[self.layout.shard_rank(home)][slot])

    def counts(self, slot: int) -> set[int]:
        """The values of a fixed slot over every shard."""
        return {int(block[slot]) for block in self.control.blocks.values()}

    def take(self) -> Counter:
        """The calls since the last take, by (call, target is this rank)."""
        taken = Counter((call, rank == self.comm.rank) for _, call, rank in self.calls)
        self.calls.clear()
        return taken


class FakeComm:
    """What Liveness needs of its communicator: every rank on this host, this process."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

    def allgather(self, item):
        return [(socket.gethostname(), procfs.identity())] * self.size

    def Abort(self, code):  # noqa: N802
        raise AssertionError(f"MPI_Abort({code})")


def layout_for(n_workers: int, n_partitions: int = 1) -> Layout:
    return Layout(10_000, S, n_workers // n_partitions, n_partitions=n_partitions)


def beat_everyone(windows: MemoryWindows, except_replica: int | None = None) -> None:
    """Every worker's beat lands (what their own Liveness.beat adds), but `except_replica`'s."""
    layout = windows.layout
    for w in range(layout.n_workers):
        if layout.role(w).replica != except_replica:
            home, slot = heartbeat_home(layout, w)
            windows.control.blocks[layout.shard_rank(home)][slot] += 1


def detector_on(windows: MemoryWindows, shard: int) -> FailureDetector:
    return FailureDetector(windows.block, windows.layout, shard, TIMEOUT_S, started=0.0)


def test_heartbeats_are_spread_in_whole_replicas_over_every_shard():
    for R, P in ((3, 1), (1, 8), (10, 2), (250, 8), (10_000, 1), (7, 3)):
        layout = Layout(10_000, S, R, n_partitions=P)
        blocks = [home_workers(layout, k) for k in range(S)]
        assert [w for b in blocks for w in b] == list(range(layout.n_workers))  # each once, in order
        assert max(map(len, blocks)) == P * -(-R // S)
        for k, block in enumerate(blocks):
            assert all(heartbeat_home(layout, w) == (k, Slot.HEARTBEATS + i) for i, w in enumerate(block))
            assert all(len(block) % P == 0 and w // P == block[i - i % P] // P for i, w in enumerate(block))


def step_calls_per_shard(n_workers: int) -> Counter:
    """A steady-state replica step's calls on each shard (tests/test_client_rma.py's count)."""
    layout = layout_for(n_workers)
    per_target = count_step_calls(layout, n_workers - 1, [(0, layout.n_params)], steps=3)
    assert sorted(per_target) == layout.shard_ranks
    assert len(set(map(frozenset, (c.items() for c in per_target.values())))) == 1
    return per_target[layout.shard_rank(0)]


def test_a_push_costs_the_same_per_shard_at_any_worker_count():
    assert len({frozenset(step_calls_per_shard(w).items()) for w in WORKER_COUNTS}) == 1


def worker_beat_calls(n_workers: int) -> tuple[Counter, int]:
    """The calls of one due heartbeat of the last worker, and the ranks they reached."""
    layout = layout_for(n_workers)
    me = layout.n_workers - 1
    windows = MemoryWindows(layout, me)
    liveness = Liveness(windows, layout, FakeComm(me, layout.world_size), 30.0, layout.role(me)).start()
    try:
        windows.calls.clear()
        liveness.beat(force=True)
        targets = {rank for _, _, rank in windows.calls}
        assert windows.slot(me) == 2  # start()'s beat and this one, on its home shard
        return windows.take(), len(targets)
    finally:
        liveness.close()


def test_a_heartbeat_is_one_round_trip_to_one_shard_at_any_worker_count():
    """The beat and the look at its home shard's own beat: two atomics and one flush."""
    for n in WORKER_COUNTS:
        calls, targets = worker_beat_calls(n)
        assert targets == 1 and calls == Counter({("Fetch_and_op", False): 2, ("Flush", False): 1}), (n, calls)


def shard_round_calls(n_workers: int) -> Counter:
    """The calls of one due beat of shard 0 (its beat, its detector's round, its look at the next shard)."""
    layout = layout_for(n_workers)
    me = layout.shard_rank(0)
    windows = MemoryWindows(layout, me)
    liveness = Liveness(windows, layout, FakeComm(me, layout.world_size), 30.0, layout.role(me)).start()
    try:
        beat_everyone(windows)
        windows.calls.clear()
        liveness.beat(force=True)
        return windows.take()
    finally:
        liveness.close()


def test_a_shards_round_reads_all_its_heartbeats_in_one_operation_at_any_worker_count():
    expected = Counter({("Fetch_and_op", True): 1, ("Get_accumulate", True): 1, ("Flush", True): 2,
                        ("Fetch_and_op", False): 1, ("Flush", False): 1})
    for n in WORKER_COUNTS:
        assert shard_round_calls(n) == expected, n


def failure_calls(n_workers: int, n_partitions: int) -> Counter:
    """Declare the last replica failed on its home shard: the calls of that round."""
    layout = layout_for(n_workers, n_partitions)
    victim = layout.n_replicas - 1
    home = heartbeat_home(layout, layout.worker_rank(victim))[0]
    windows = MemoryWindows(layout, layout.shard_rank(home))
    detector = detector_on(windows, home)
    beat_everyone(windows)
    detector.round(0.0)
    beat_everyone(windows, except_replica=victim)
    windows.calls.clear()
    detector.round(TIMEOUT_S + 1)
    calls = windows.take()
    assert detector.failed == set(range(victim * n_partitions, (victim + 1) * n_partitions))
    assert all(windows.slot(w) & FAILED_MARK for w in detector.failed)
    assert windows.counts(Slot.WORKERS_FAILED) == {n_partitions}
    assert detector.events[0]["replica"] == victim and detector.events[0]["ranks"] == sorted(detector.failed)
    return calls


@pytest.mark.parametrize("n_partitions", [1, 4])
def test_a_failure_costs_operations_in_the_shards_and_partitions_only(n_partitions):
    """Per failure: the round's read, a FAILED mark per partition on the home shard's own
    block, WORKERS_FAILED on every shard and REPLICAS_FAILED on shard 0, each flushed:
    P + S + 1 atomics whatever the number of workers (it used to be W x W reads)."""
    P = n_partitions
    expected = Counter({("Get_accumulate", True): 1, ("Fetch_and_op", True): P + 1, ("Flush", True): P + 2,
                        ("Fetch_and_op", False): S, ("Flush", False): S})  # shard 0 is not the home here
    for n in WORKER_COUNTS:
        assert failure_calls(n, P) == expected, n


def test_finished_workers_are_counted_with_one_operation_per_shard_per_round():
    for n in WORKER_COUNTS:
        layout = layout_for(n)
        windows = MemoryWindows(layout, layout.shard_rank(S - 1))
        detector = detector_on(windows, S - 1)
        for w in home_workers(layout, S - 1):
            windows.block.add(layout.shard_rank(S - 1), heartbeat_home(layout, w)[1], DONE_MARK)
        windows.calls.clear()
        detector.round(1.0)
        calls = windows.take()
        assert calls[("Fetch_and_op", False)] + calls[("Fetch_and_op", True)] == S, (n, calls)
        assert windows.counts(Slot.WORKERS_DONE) == {len(home_workers(layout, S - 1))}
        detector.round(2.0)  # counted once
        assert windows.counts(Slot.WORKERS_DONE) == {len(home_workers(layout, S - 1))}


def test_a_worker_whose_done_mark_landed_first_counts_done_not_failed():
    """The race the marks decide: silent for the timeout, but its DONE mark is in by the time
    the shard marks it failed (after the round's read). The shard takes its mark back."""
    layout = Layout(1000, 2, 3, n_partitions=2)
    windows = MemoryWindows(layout, layout.shard_rank(1))
    detector = detector_on(windows, 1)
    beat_everyone(windows)
    detector.round(0.0)
    real_read = windows.block.start_read

    def read_then_finish(rank, slot, out):  # worker 5 hands in right after the read
        real_read(rank, slot, out)
        windows.block.win.blocks[rank][heartbeat_home(layout, 5)[1]] += DONE_MARK

    windows.block.start_read = read_then_finish
    detector.round(TIMEOUT_S + 1)  # replica 2 (workers 4, 5) silent
    assert detector.failed == {4} and detector.done == {5}
    assert windows.slot(5) & FAILED_MARK == 0 and windows.slot(4) & FAILED_MARK
    assert windows.counts(Slot.WORKERS_FAILED) == {1} and windows.counts(Slot.WORKERS_DONE) == {1}
    assert windows.counts(Slot.REPLICAS_FAILED) <= {0, 1} and len(detector.events) == 1


def test_a_replica_is_declared_once_and_a_worker_learns_it_in_one_read():
    layout = layout_for(1000, 4)
    victim = 123
    home = heartbeat_home(layout, layout.worker_rank(victim))[0]
    windows = MemoryWindows(layout, layout.shard_rank(home))
    detector = detector_on(windows, home)
    beat_everyone(windows)
    detector.round(0.0)
    for now in (TIMEOUT_S + 1, TIMEOUT_S + 2, 3 * TIMEOUT_S):
        beat_everyone(windows, except_replica=victim)
        detector.round(now)
    assert len(detector.events) == 1 and windows.counts(Slot.WORKERS_FAILED) == {4}
    assert int(windows.control.blocks[layout.shard_rank(0)][Slot.REPLICAS_FAILED]) == 1
    # Another replica's worker asks whether replica 123 failed: one read on its home shard.
    me = layout.worker_rank(7)
    other = MemoryWindows(layout, me)
    other.control.blocks = windows.control.blocks
    liveness = Liveness(other, layout, FakeComm(me, layout.world_size), 30.0, layout.role(me))
    other.calls.clear()
    assert liveness.replica_failed(victim) and liveness.replica_failed(victim)
    assert not liveness.replica_failed(victim - 1)
    assert other.take() == Counter({("Get_accumulate", False): 2, ("Flush", False): 2})


def test_shard_0s_census_reads_each_shard_once():
    layout = layout_for(1000)
    me = layout.shard_rank(0)
    windows = MemoryWindows(layout, me)
    for w in range(layout.n_workers):
        home, slot = heartbeat_home(layout, w)
        windows.control.blocks[layout.shard_rank(home)][slot] += 7 + (FAILED_MARK if w % 3 == 0 else DONE_MARK)
    liveness = Liveness(windows, layout, FakeComm(me, layout.world_size), 30.0, layout.role(me))
    windows.calls.clear()
    liveness.census()
    assert liveness.failed_workers == set(range(0, 1000, 3))
    assert liveness.done_workers == set(range(1000)) - liveness.failed_workers
    assert windows.take() == Counter({("Get_accumulate", False): S - 1, ("Get_accumulate", True): 1,
                                      ("Flush", False): S - 1, ("Flush", True): 1})
