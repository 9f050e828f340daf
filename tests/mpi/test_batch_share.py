"""BatchShare (dbmpi.runtime.batchshare) under MPI: partitions that each hold a piece of
their replica's slice train on the very batches one holder of the whole slice would draw."""
import numpy as np
import pytest

from dbmpi.algorithms.minibatches import Minibatches, SplitMinibatches
from dbmpi.data import share_range


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("n,batch", [(101, 16), (5, 4)])
def test_shared_batches_equal_the_whole_slices_batches(n, batch):
    from mpi4py import MPI

    from dbmpi.runtime.batchshare import BatchShare

    comm = MPI.COMM_WORLD
    parts, me = comm.size, comm.rank
    rng = np.random.default_rng(7)
    x = rng.random((n, 4, 3)).astype(np.float32)
    y = np.arange(n, dtype=np.int32)  # each example's label is its index: who holds it is plain
    bounds = [share_range(n, p, parts)[0] for p in range(parts)] + [n]
    share = BatchShare(comm, x.shape[1:])
    lo, hi = bounds[me], bounds[me + 1]
    received = 0
    with Minibatches(x, y, batch, seed=3) as whole, \
            SplitMinibatches(x[lo:hi], y[lo:hi], batch, seed=3, bounds=bounds, first=lo, exchange=share) as split:
        for _ in range(2 * n // batch + 3):  # past a reshuffle
            want_x, want_y = whole.next()
            got_x, got_y = split.next()
            np.testing.assert_array_equal(got_y, want_y)
            np.testing.assert_array_equal(got_x, want_x)
            received += int(((want_y < lo) | (want_y >= hi)).sum()) * (4 * 12 + 4)
    assert share.bytes_received == received > 0  # only the examples the others hold travel
