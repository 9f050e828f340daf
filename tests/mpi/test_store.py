"""The RMA atomicity argument of dbmpi.ps.store and dbmpi.ps.control, checked under load:
counters never lose an increment, a drain never loses or doubles a push, a fetch never
sees a value that was not published (per element)."""
import numpy as np
import pytest
from mpi4py import MPI

from dbmpi.ps.client import ShardClient
from dbmpi.ps.control import Slot
from dbmpi.ps.store import ShardStore
from dbmpi.ps.windows import ParameterWindows
from dbmpi.runtime.layout import Layout
from tests.mpi import fetch_while_rising, sub_world


def one_shard(comm, n_params):
    """A layout of one shard (the last rank) and comm.size - 1 single-rank replicas, its
    windows, and this rank's role."""
    layout = Layout(n_params, 1, comm.size - 1)
    role = layout.role(comm.rank)
    return layout, role, ParameterWindows(comm, layout, role.shard if role.is_shard else None)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_control_block_adds_are_atomic():
    """Every rank (the shard too) adds 1 to one slot many times at once: the total is exact
    and the old values `add` returned are 0, 1, ..., total - 1, each seen once."""
    comm = sub_world(MPI.COMM_WORLD.size)
    if comm is None:
        return
    layout, _role, windows = one_shard(comm, 64)
    windows.lock_shards()
    comm.Barrier()
    shard, n_adds = layout.shard_rank(0), 300
    old = [windows.block.add(shard, Slot.PUSHES) for _ in range(n_adds)]
    comm.Barrier()
    total = windows.block.read(shard, Slot.PUSHES)
    everyone = comm.gather(old, root=0)
    windows.unlock_shards()
    windows.free()
    assert total == n_adds * comm.size
    if comm.rank == 0:
        seen = sorted(v for values in everyone for v in values)
        assert seen == list(range(n_adds * comm.size)), "an add was lost or two saw the same value"
    comm.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("chunk", [None, 97])
def test_drain_loses_and_doubles_nothing(chunk):
    """Workers push integer gradients as fast as they can while the shard drains in a
    loop (the whole slice at once, or chunk by chunk): the sum of everything drained is
    exactly the sum pushed, and the inbox ends empty."""
    comm = sub_world(MPI.COMM_WORLD.size)
    if comm is None:
        return
    n_params, n_pushes = 1001, 200
    layout, role, windows = one_shard(comm, n_params)
    pushed = np.zeros(n_params, np.float64)
    drained_total = np.zeros(n_params, np.float64)
    drains = 0
    if role.is_shard:
        store = ShardStore(windows, n_params, chunk)
        out = np.empty(n_params, np.float32)
        comm.Barrier()
        while True:
            # Workers flush every push before they count themselves done: a drain after
            # seeing them all done holds the rest.
            done = windows.block.read(comm.rank, Slot.WORKERS_DONE) == layout.n_workers
            if store.drain(out):
                drained_total += out
                drains += 1
            if done:
                break
        assert not store.drain(out) and not out.any(), "the inbox is not empty at the end"
        store.close()
    else:
        client = ShardClient(windows, role.replica, [(0, n_params)])
        comm.Barrier()
        rng = np.random.default_rng(comm.rank)
        buffers = [np.empty(n_params, np.float32) for _ in range(2)]
        for i in range(n_pushes):
            grad = buffers[i % 2]  # a pending push's buffer is not touched until it completes
            grad[:] = rng.integers(-3, 4, n_params)
            pushed += grad
            assert client.push(grad)
        client.finish()
        client.close()
    windows.free()
    total_pushed = comm.reduce(pushed, op=MPI.SUM, root=layout.shard_rank(0))
    if role.is_shard:
        np.testing.assert_array_equal(drained_total, total_pushed)
        assert drains >= 1
    comm.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_fetch_sees_only_published_values(monkeypatch):
    """The shard publishes k * ones for k = 1..K while the workers fetch: every element of
    every fetch is an integer in [0, K] and never goes backwards (element-atomic; one fetch
    may mix versions, so nothing is asserted about the vector as a whole)."""
    import dbmpi.ps.client as client_module

    monkeypatch.setattr(client_module, "FETCH_CHUNK", 1000)  # many requests per fetch: mixes
    comm = sub_world(MPI.COMM_WORLD.size)
    if comm is None:
        return
    n_params, n_versions = 50_000, 200
    layout, role, windows = one_shard(comm, n_params)
    fetches = 0
    if role.is_shard:
        store = ShardStore(windows, n_params, chunk=4096)  # publishes in chunks, too
        comm.Barrier()
        values = np.empty(n_params, np.float32)
        for k in range(1, n_versions + 1):
            values[:] = k
            store.publish(values)
        store.close()
    else:
        client = ShardClient(windows, role.replica, [(0, n_params)])
        comm.Barrier()
        seen, fetches = fetch_while_rising(client, n_params, n_versions)
        np.testing.assert_array_equal(seen, np.full(n_params, n_versions, np.float32))
        client.close()
    windows.free()
    if not role.is_shard:
        assert fetches >= 1
    comm.Free()
