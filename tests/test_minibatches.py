"""Minibatches and SplitMinibatches (MPI-free): the batches a replica trains on do not
depend on how its slice is split among its partitions."""
import numpy as np
import pytest

from dbmpi.algorithms.minibatches import Minibatches, SplitMinibatches
from dbmpi.data import share_range


class Joined:
    """A stand-in for BatchShare: the holders' pieces of one batch, joined in holder order
    once every holder has handed its piece in (as the collective does)."""

    def __init__(self, holders):
        self.pieces = [None] * holders

    def exchange_of(self, holder):
        def exchange(x, y, counts):
            assert len(x) == len(y) == counts[holder]
            self.pieces[holder] = (x, y)
            return x, y
        return exchange

    def joined(self):
        return (np.concatenate([p[0] for p in self.pieces]), np.concatenate([p[1] for p in self.pieces]))


@pytest.mark.parametrize("n,holders,batch", [(103, 2, 16), (100, 3, 32), (7, 4, 3), (50, 5, 50)])
def test_split_batches_are_the_whole_batches_row_for_row(n, holders, batch):
    rng = np.random.default_rng(0)
    x = rng.random((n, 3, 2)).astype(np.float32)
    y = np.arange(n, dtype=np.int32)
    bounds = [share_range(n, h, holders)[0] for h in range(holders)] + [n]
    joined = Joined(holders)
    split = [SplitMinibatches(x[bounds[h]:bounds[h + 1]], y[bounds[h]:bounds[h + 1]], batch, seed=11,
                              bounds=bounds, first=bounds[h], exchange=joined.exchange_of(h))
             for h in range(holders)]
    with Minibatches(x, y, batch, seed=11) as whole:
        for _ in range(3 * n // batch + 2):  # past a reshuffle
            want_x, want_y = whole.next()
            for piece in split:
                piece.next()
            got_x, got_y = joined.joined()
            np.testing.assert_array_equal(got_y, want_y)
            np.testing.assert_array_equal(got_x, want_x)
    for piece in split:
        piece.close()
