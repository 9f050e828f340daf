"""A replica's partitions share minibatches instead of each holding the replica's slice.

With a dense first layer every partition needs whole examples. Instead of each partition
reading and keeping the replica's whole training slice (P copies per replica), each keeps a
contiguous 1/P of it (`dbmpi.algorithms.minibatches.SplitMinibatches`), and once per step
`BatchShare` joins the pieces of the step's batch that each partition holds, with one
`Allgatherv` on the replica's communicator. The cost: each partition
receives the (P-1)/P of a batch it does not hold, batch x (4 x input values + 4) bytes a
step at most; the gain: 1/P of the slice read and resident per partition.
"""
from __future__ import annotations

import math

import numpy as np
from mpi4py import MPI


class BatchShare:
    """`SplitMinibatches`' exchange over `comm` (the replica's partitions, in partition
    order). `bytes_received`: the example bytes that came from the other partitions."""

    def __init__(self, comm: MPI.Intracomm, example_shape: tuple[int, ...]):
        self.comm, self.example_shape = comm, tuple(example_shape)
        self.width = math.prod(self.example_shape)
        self.bytes_received = 0

    def __call__(self, x: np.ndarray, y: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The whole batch: every partition's piece (`counts[i]` examples from partition i)
        in partition order. Collective: every partition calls it at the same step. One
        `Allgatherv` of bytes: each example travels as its x values then its label's bits."""
        counts = np.asarray(counts, np.int64)
        row = 4 * (self.width + 1)
        mine = np.empty((len(y), self.width + 1), np.float32)
        mine[:, :self.width] = x.reshape(len(y), self.width)
        mine[:, self.width] = np.asarray(y, np.int32).view(np.float32)  # the bits, not a conversion
        joined = np.empty((int(counts.sum()), self.width + 1), np.float32)
        displs = np.concatenate(([0], np.cumsum(counts)[:-1]))
        self.comm.Allgatherv([mine.view(np.uint8), MPI.BYTE], [joined.view(np.uint8), counts * row, displs * row,
                                                               MPI.BYTE])
        self.bytes_received += (len(joined) - len(y)) * row
        xb = np.ascontiguousarray(joined[:, :self.width]).reshape(len(joined), *self.example_shape)
        return xb, np.ascontiguousarray(joined[:, self.width]).view(np.int32)
