"""A Downpour checkpoint under load: the shards keep applying pushes while it is written,
and the file holds each shard's slice exactly as it was at that shard's snapshot."""
import time

import numpy as np
import pytest

from dbmpi.algorithms.optimizers import SGD
from dbmpi.io.checkpoint import open_checkpoint
from dbmpi.model.network import Tensor
from dbmpi.ps.checkpoint import ServingProgress, ShardCheckpoints
from dbmpi.ps.client import ShardClient
from dbmpi.ps.control import Slot
from dbmpi.ps.shard import Shard
from dbmpi.ps.windows import ParameterWindows
from dbmpi.runtime.failover import Liveness
from dbmpi.runtime.layout import Layout
from tests.mpi import sub_world

N_PARAMS = 1001
GO = 99  # the worker tells shard 1 it may finish its part of the checkpoint


def wait_for_versions(windows, layout, count: int) -> None:
    """Until every shard has applied `count` updates (each push here is one update)."""
    while any(windows.block.read(rank, Slot.VERSION) < count for rank in layout.shard_ranks):
        time.sleep(1e-4)


def worker_side(comm, windows, layout):
    """Push ones four times (each applied alone), ask for a checkpoint, push three more
    times and see each applied while the checkpoint cannot finish (shard 1 waits for GO),
    then let it finish."""
    client = ShardClient(windows, 0, [(0, N_PARAMS)])
    ones = np.ones(N_PARAMS, np.float32)
    pushes = 0
    for _ in range(4):
        assert client.push(ones)
        client.finish_push()
        pushes += 1
        wait_for_versions(windows, layout, pushes)
    for rank in layout.shard_ranks:
        windows.block.add(rank, Slot.CHECKPOINTS)
    for _ in range(3):  # would wait forever if a checkpoint stopped the shards' updates
        assert client.push(ones)
        client.finish_push()
        pushes += 1
        wait_for_versions(windows, layout, pushes)
    comm.send(pushes, dest=layout.shard_rank(1), tag=GO)
    client.finish()
    client.close()
    return pushes


def shard_side(comm, windows, layout, role, liveness, directory):
    lo, hi = layout.shard_ranges[role.shard]
    shard = Shard(windows, role.shard, np.zeros(hi - lo, np.float32), SGD(hi - lo, 1.0))
    progress = ServingProgress(liveness, shard.apply_pending)
    tensors = [Tensor("dense0.W", 0, (N_PARAMS,), 0)]
    files = ShardCheckpoints(comm, layout.shard_ranks, layout.shard_ranges, tensors, directory, 5, progress)
    written = []

    def checkpoint():
        if role.shard == 1:
            progress.wait(lambda: comm.iprobe(source=0, tag=GO))
            comm.recv(source=0, tag=GO)
        version = shard.version()
        written.append(files.write(shard.snapshot(), step=1, algorithm="test", state={"step": 1},
                                   version=version))

    comm.Barrier()
    stats = shard.serve(checkpoint)
    shard.close()
    return written, stats


@pytest.mark.mpi(min_size=3)
@pytest.mark.timeout(120)
def test_shards_apply_pushes_while_a_checkpoint_is_written_and_it_holds_their_snapshots(tmp_path):
    comm = sub_world(3)
    if comm is None:
        return
    layout = Layout(N_PARAMS, 2, 1)
    role = layout.role(comm.rank)
    directory = comm.bcast(str(tmp_path), root=layout.shard_rank(0))
    windows = ParameterWindows(comm, layout, role.shard if role.is_shard else None)
    windows.lock_shards()
    liveness = Liveness(windows, layout, comm, 60.0, role)  # not started: its waits only
    if role.is_worker:
        comm.Barrier()
        result = worker_side(comm, windows, layout)
    else:
        result = shard_side(comm, windows, layout, role, liveness, directory)
    windows.free()
    results = comm.gather(result, root=0)
    rank = comm.rank
    comm.Free()
    if rank != 0:
        return
    total = results[0]
    (path,), _ = results[layout.shard_rank(0)]
    assert [(stats.pushes, stats.updates, stats.max_merged) for _, stats in results[1:]] == [(total, total, 1)] * 2
    with open_checkpoint(path) as ckpt:  # verifies the checksums
        versions = ckpt.state["shard_versions"]
        params = ckpt.read_range("params", 0, N_PARAMS)
    # Shard 0 took its snapshot when asked (after 4 to 7 updates), shard 1 only after GO,
    # once all 7 were applied, 3 of them during the checkpoint.
    assert 4 <= versions[0] <= 7 and versions[1] == total == 7
    for k, (lo, hi) in enumerate(layout.shard_ranges):  # SGD at rate 1 on ones: -version
        np.testing.assert_array_equal(params[lo:hi], np.full(hi - lo, -versions[k], np.float32))
