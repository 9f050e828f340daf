"""Shard checkpoints under MPI: a Downpour checkpoint under load (the shards keep applying
pushes while their slice files are written, and the checkpoint holds each shard's slice
exactly as it was at that shard's snapshot); a resume where each shard verifies its own
range."""
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI

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


def write_two_checkpoints(comm, network, directory):
    """Checkpoints at steps 10 and 20 written by the first two ranks as shards (S = 2, the
    Sandblaster way: BlockingProgress); params + 10 * step, Adagrad = step."""
    layout = Layout(network.n_params, 2, 1)
    if comm.rank < 2:
        files = ShardCheckpoints(comm.Split(0, comm.rank), [0, 1], layout.shard_ranges, network.tensors,
                                 directory, 5)
        lo, hi = layout.shard_ranges[comm.rank]
        for step in (10, 20):
            files.write([("params", network.params[lo:hi] + 10 * step),
                         ("adagrad/accum", np.full(hi - lo, step, np.float32))],
                        step=step, algorithm="downpour", config_text="", state={"step": step})
        files.comm.Free()
    else:
        comm.Split(MPI.UNDEFINED, comm.rank)
    comm.Barrier()


@pytest.mark.mpi(min_size=4)
@pytest.mark.timeout(120)
def test_each_shard_verifies_its_own_range_and_a_bad_slice_is_one_line_on_every_rank(tmp_path):
    """S = 2 checkpoints resumed with S = 3 (3 shards + 1 worker): every shard hashes the
    slices of its range; shard 1's old slice corrupted: `--resume PATH` raises the same
    CheckpointError on every rank, `--resume auto` falls back to the older checkpoint with
    one line from the root, and the shards read their ranges from it."""
    from dbmpi.algorithms.run import resume_verified
    from dbmpi.io.checkpoint import CheckpointError, checkpoint_name
    from dbmpi.model import Network
    from tests.models import LOCAL_DENSE

    comm = sub_world(4)
    if comm is None:
        return
    run = Path(comm.bcast(str(tmp_path), root=0)) / "run"
    network = Network.from_string(LOCAL_DENSE)
    write_two_checkpoints(comm, network, run / "checkpoints")
    newest = run / "checkpoints" / checkpoint_name(20)
    layout = Layout(network.n_params, 3, 1)
    said = []
    resumed = resume_verified(comm, "auto", run, network, layout, 0, said.append)
    assert resumed["step"] == 20 and not said
    if comm.rank == 0:
        with open_checkpoint(newest, verify=False) as ckpt:
            with h5py.File(ckpt.slice_path(ckpt.slices[1]), "r+") as f:
                f["params"][0] += 1.0
    comm.Barrier()
    with pytest.raises(CheckpointError) as error:
        resume_verified(comm, str(newest), run, network, layout, 0, said.append)
    lines = comm.allgather(str(error.value))
    assert len(set(lines)) == 1 and "checksum mismatch in slice file" in lines[0] and "slice-00001-of-00002" in lines[0]
    resumed = resume_verified(comm, "auto", run, network, layout, 0, said.append)
    assert resumed["step"] == 10
    assert len(said) == (comm.rank == 0) and all("resuming from an older checkpoint" in s for s in said)
    role = layout.role(comm.rank)
    if role.is_shard:
        lo, hi = layout.shard_ranges[role.shard]
        with open_checkpoint(resumed["path"], verify=False) as ckpt:
            np.testing.assert_array_equal(ckpt.read_range("params", lo, hi), network.params[lo:hi] + 100)
            np.testing.assert_array_equal(ckpt.read_range("adagrad/accum", lo, hi), np.full(hi - lo, 10, np.float32))
    comm.Free()
