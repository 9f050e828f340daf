"""The RMA parameter server under concurrency: no lost updates, no torn reads, no NaN.

Each test carves a communicator of exactly the ranks its layout needs out of COMM_WORLD
(run with at least 6 ranks to cover every case; ranks left over skip the test).
"""
import time

import numpy as np
import pytest
from mpi4py import MPI

from dbmpi.algorithms.optimizers import SGD
from dbmpi.ps.client import ShardClient
from dbmpi.ps.control import Slot
from dbmpi.ps.shard import Shard
from dbmpi.ps.windows import ParameterWindows, gather_parameters
from dbmpi.runtime.layout import Layout
from tests.mpi import fetch_while_rising, sub_world

N_PARAMS = 1001  # odd, so shard boundaries fall inside what would be tensors


def run_server(comm, layout, initial, worker, chunk=None, counts=None, staleness_aware=False):
    """Shards serve with SGD at rate 1 (staleness-aware or not), updating in chunks of
    `chunk` values (None: the store's default); workers run `worker(client)`, and put their
    client's counts() in the list `counts`. Returns the final parameters (at rank 0) and the shard stats (at the
    shards)."""
    role = layout.role(comm.rank)
    windows = ParameterWindows(comm, layout, role.shard if role.is_shard else None)
    my_slice, stats, result = None, None, None
    if role.is_shard:
        lo, hi = layout.shard_ranges[role.shard]
        shard = Shard(windows, role.shard, initial[lo:hi], SGD(hi - lo, 1.0), staleness_aware=staleness_aware,
                      **({"chunk": chunk} if chunk else {}))
        comm.Barrier()
        stats = shard.serve()
        shard.close()
        my_slice = shard.work
    else:
        comm.Barrier()
        client = ShardClient(windows, role.replica, [(0, layout.n_params)])
        result = worker(client, windows)
        client.finish()
        if counts is not None:
            counts.append(client.counts())
        client.close()
    windows.free()
    final = gather_parameters(comm, layout, my_slice, root=0)
    return final, stats, result


def integer_gradient(replica, push):
    """Small integer-valued gradients: every partial sum is exact in float32."""
    rng = np.random.default_rng([replica, push])
    return rng.integers(-3, 4, N_PARAMS).astype(np.float32)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("n_shards", [1, 2, 3])
@pytest.mark.parametrize("n_replicas", [1, 2, 3])
@pytest.mark.parametrize("chunk", [None, 64])
def test_no_lost_updates(n_shards, n_replicas, chunk, monkeypatch):
    if chunk is not None:  # transfers split into many requests, updates into many chunks, as large shards' are
        import dbmpi.ps.client as client

        monkeypatch.setattr(client, "FETCH_CHUNK", chunk)
    comm = sub_world(n_shards + n_replicas)
    if comm is None:
        return
    layout = Layout(N_PARAMS, n_shards, n_replicas)
    initial = np.arange(N_PARAMS, dtype=np.float32)
    n_pushes = 60

    def worker(client, _windows):
        total = np.zeros(N_PARAMS, np.float64)
        buffers = [np.empty(N_PARAMS, np.float32) for _ in range(2)]
        for i in range(n_pushes):
            if i % 7 == 0:
                client.fetch(np.empty(N_PARAMS, np.float32))  # fetches interleave with pushes
            grad = buffers[i % 2]  # a pending push's buffer is not touched until it completes
            grad[:] = integer_gradient(client.replica, i)
            total += grad
            assert client.push(grad)
        return total

    counts = []
    final, stats, total = run_server(comm, layout, initial, worker, chunk, counts)
    sums = comm.gather(total, root=0)
    all_stats = comm.gather(stats, root=0)
    all_counts = [c for mine in comm.gather(counts, root=0) or [] for c in mine]
    if comm.rank == 0:
        expected = initial - sum(s for s in sums if s is not None)
        np.testing.assert_array_equal(final, expected.astype(np.float32))
        shard_stats = [s for s in all_stats if s is not None]
        assert all(s.pushes == n_pushes * n_replicas for s in shard_stats)
        assert all(1 <= s.updates <= n_pushes * n_replicas for s in shard_stats)
        assert len(all_counts) == n_replicas
        for c in all_counts:  # every worker counted every push at every shard
            assert c["shards"] == list(range(n_shards))
            assert c["pushes_by_shard"] == [n_pushes] * n_shards
            assert [sum(h) for h in c["staleness_histogram_by_shard"]] == [n_pushes] * n_shards
    comm.Free()


@pytest.mark.mpi(min_size=4)
@pytest.mark.timeout(120)
def test_concurrent_fetch_returns_values_elements_held():
    """One replica pushes -1 everywhere (parameters climb 0, 1, 2, ...); the other fetches
    meanwhile: every element it sees is an integer the element held, never decreasing."""
    comm = sub_world(4)
    if comm is None:
        return
    layout = Layout(N_PARAMS, 2, 2)
    n_pushes = 150

    def worker(client, _windows):
        if client.replica == 0:
            minus_one = [np.full(N_PARAMS, -1.0, np.float32) for _ in range(2)]
            for i in range(n_pushes):
                assert client.push(minus_one[i % 2])
            return None
        return fetch_while_rising(client, N_PARAMS, n_pushes)[1]

    final, _stats, fetches = run_server(comm, layout, np.zeros(N_PARAMS, np.float32), worker)
    if comm.rank == 0:
        np.testing.assert_array_equal(final, np.full(N_PARAMS, n_pushes, np.float32))
    if comm.rank == 1:
        assert fetches >= 1
    comm.Free()


@pytest.mark.mpi(min_size=4)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("staleness_aware", [False, True])
def test_a_stale_replicas_push_is_applied_with_a_smaller_step(staleness_aware):
    """Replica 0 fetches before each of its 4 pushes of ones and waits for it to be applied
    (staleness 0: step 1); replica 1 fetched version 0 and pushes ones after them
    (staleness 4): staleness-aware shards apply it with step 1/4, plain ones with step 1."""
    comm = sub_world(4)
    if comm is None:
        return
    layout = Layout(N_PARAMS, 2, 2)
    role = layout.role(comm.rank)
    workers = comm.Split(0 if role.is_worker else MPI.UNDEFINED, comm.rank)
    n_fresh = 4
    ones = np.ones(N_PARAMS, np.float32)

    def wait_for_version(windows, version):
        deadline = time.monotonic() + 60
        while any(windows.block.read(rank, Slot.VERSION) < version for rank in layout.shard_ranks):
            assert time.monotonic() < deadline, "the shards did not apply the push"
            time.sleep(0.001)

    def worker(client, windows):
        seen = np.empty(N_PARAMS, np.float32)
        client.fetch(seen)  # version 0 for both replicas
        workers.Barrier()
        if client.replica == 0:
            for i in range(n_fresh):
                client.fetch(seen)
                assert client.push(ones)
                client.finish_push()
                wait_for_version(windows, i + 1)
        workers.Barrier()
        if client.replica == 1:
            assert client.push(ones)
            client.finish_push()
            assert client.staleness == [n_fresh] * len(client.shards)
        return None

    final, stats, _ = run_server(comm, layout, np.zeros(N_PARAMS, np.float32), worker,
                                 staleness_aware=staleness_aware)
    stale_step = 1 / n_fresh if staleness_aware else 1.0
    if comm.rank == 0:
        np.testing.assert_array_equal(final, np.full(N_PARAMS, -(n_fresh + stale_step), np.float32))
    if stats is not None:
        assert stats.updates == n_fresh + 1
        assert stats.mean_staleness == pytest.approx(n_fresh / (n_fresh + 1))  # 0, 0, 0, 0, 4
        assert stats.mean_step_scale == pytest.approx((n_fresh + stale_step) / (n_fresh + 1))
    if workers != MPI.COMM_NULL:
        workers.Free()
    comm.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_non_finite_gradients_never_reach_the_parameters():
    comm = sub_world(2)
    if comm is None:
        return
    layout = Layout(N_PARAMS, 1, 1)
    initial = np.linspace(-1, 1, N_PARAMS).astype(np.float32)

    def worker(client, windows):
        bad = np.ones(N_PARAMS, np.float32)
        bad[17] = np.nan
        assert not client.push(bad)  # withheld by the replica
        bad[17], bad[500] = 1.0, np.inf
        assert not client.push(bad)
        assert client.rejected == 2
        after = np.empty(N_PARAMS, np.float32)
        client.fetch(after)
        np.testing.assert_array_equal(after, initial)
        # A push that bypasses the replica's check: the shard drops the drain.
        shard_rank = layout.shard_rank(0)
        poison = np.zeros(N_PARAMS, np.float32)
        poison[3] = np.nan
        windows.inbox.Accumulate(poison, shard_rank, op=MPI.SUM)
        windows.inbox.Flush(shard_rank)
        windows.block.add(shard_rank, Slot.PUSHES)
        deadline = time.monotonic() + 30
        while not windows.block.read(shard_rank, Slot.DROPPED) and time.monotonic() < deadline:
            time.sleep(0.001)
        client.fetch(after)
        np.testing.assert_array_equal(after, initial)
        return None

    final, stats, _ = run_server(comm, layout, initial, worker)
    if comm.rank == 0:
        np.testing.assert_array_equal(final, initial)
    if stats is not None:
        assert stats.rejected == 2 and stats.dropped >= 1 and stats.updates == 0
    comm.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_idle_shard_does_not_spin_a_core():
    """While no replica pushes, a serving shard sleeps (back-off): little CPU time used."""
    comm = sub_world(2)
    if comm is None:
        return
    layout = Layout(N_PARAMS, 1, 1)
    idle_s = 1.5

    def worker(client, _windows):
        time.sleep(idle_s)
        assert client.push(np.ones(N_PARAMS, np.float32))
        return None

    cpu_before = time.process_time()
    final, stats, _ = run_server(comm, layout, np.zeros(N_PARAMS, np.float32), worker)
    cpu_used = time.process_time() - cpu_before
    if stats is not None:
        assert stats.wall_s >= idle_s * 0.9
        assert cpu_used < 0.3 * idle_s, f"idle shard used {cpu_used:.2f} s of CPU in {stats.wall_s:.2f} s"
        assert stats.updates == 1
    if comm.rank == 0:
        np.testing.assert_array_equal(final, np.full(N_PARAMS, -1.0, np.float32))
    comm.Free()
