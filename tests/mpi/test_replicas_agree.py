"""Under MPI every rank builds the same network bit for bit from the same config: the
property Downpour's replicas and shards rely on when they start from a seed."""
import hashlib
from pathlib import Path

import numpy as np
import pytest

from dbmpi.model import Network

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name", ["mlp_fashion.toml", "image_local.toml"])
def test_every_rank_initialises_identically(name):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    net = Network.from_toml(CONFIGS / name)
    digest = hashlib.sha256(net.params.tobytes()).hexdigest()
    digests = comm.allgather(digest)
    assert len(set(digests)) == 1, digests
    # And one training step on the same batch gives the same gradient everywhere.
    rng = np.random.default_rng(0)
    x = rng.random((4,) + net.input_shape).astype(np.float32)
    y = rng.integers(0, net.n_classes, 4).astype(np.int32)
    net.loss_and_grad(x, y)
    grads = comm.allgather(hashlib.sha256(net.grad.tobytes()).hexdigest())
    assert len(set(grads)) == 1
