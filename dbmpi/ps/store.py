"""A shard's parameters and gradient inbox, seen from the shard itself: publish, drain, take.

Why every concurrent access is well-defined. MPI lets accumulate operations on the same
location run concurrently when they use the same operation or MPI_NO_OP (the default
`accumulate_ops = same_op_no_op`), and each is atomic per element of a predefined type.
Every access to shard memory, the shard's own included, is such an operation; the shard
never loads or stores its window memory directly:

- inbox: workers `Accumulate(SUM)`; the shard drains it with `Get_accumulate(NO_OP)`, then
  `Accumulate(SUM)` of the negated values it read. A push that lands between the two stays
  in the inbox for the next drain, so no update is lost or counted twice;
- params: the shard publishes a private working copy with `Accumulate(REPLACE)`; workers
  read with `Get_accumulate(NO_OP)`. Every element a fetch returns is a value that element
  held (never a torn value), though one fetch may mix elements from before and after a
  publish: the loose consistency Downpour accepts;
- control: only `Fetch_and_op` with SUM or NO_OP (dbmpi.ps.control).

Tested in tests/mpi/test_store.py. Cost (bench/rma.py, MPICH 5.0.2, shared memory, 64 MB):
the drain (four passes) runs at about 0.25x memcpy; plain Get measured within 5% of
Get_accumulate(NO_OP), so being well-defined costs little.

A drained NaN or Inf cannot be cleared with the operations allowed alongside SUM (x + -x is
NaN for x = NaN): only `take`, when no push can be in flight, removes it.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from dbmpi.ps.windows import NO_ORIGIN, ParameterWindows


class ShardStore:
    """This shard's `params` and `inbox` windows, accessed by the shard (self-targeted RMA
    inside the run-long epochs of ParameterWindows.lock_shards)."""

    def __init__(self, windows: ParameterWindows, size: int):
        self.windows = windows
        self.me = windows.comm.rank
        self.negated = np.empty(size, np.float32)
        windows.lock_shards()

    def publish(self, values: np.ndarray) -> None:
        """Make `values` what fetches read (element-atomic REPLACE, flushed)."""
        params = self.windows.params
        params.Accumulate(values, self.me, op=MPI.REPLACE)
        params.Flush(self.me)

    def drain(self, out: np.ndarray) -> bool:
        """Move the inbox into `out` atomically (pushes landing meanwhile stay for the next
        drain); False when it held nothing."""
        inbox = self.windows.inbox
        self._read(out)
        if not out.any():
            return False
        np.negative(out, out=self.negated)
        inbox.Accumulate(self.negated, self.me, op=MPI.SUM)
        inbox.Flush(self.me)
        return True

    def _read(self, out: np.ndarray) -> None:
        """The inbox as it is now, into `out` (element-atomic NO_OP)."""
        self.windows.inbox.Get_accumulate(NO_ORIGIN, out, self.me, target=(0, out.size, MPI.FLOAT), op=MPI.NO_OP)
        self.windows.inbox.Flush(self.me)

    def take(self, out: np.ndarray) -> None:
        """Move the inbox into `out` and zero it (REPLACE, which must not meet a concurrent
        SUM: only when no push can be in flight). Unlike `drain`, it also clears a NaN or Inf."""
        inbox = self.windows.inbox
        self._read(out)
        self.negated[:] = 0
        inbox.Accumulate(self.negated, self.me, op=MPI.REPLACE)
        inbox.Flush(self.me)

    def close(self) -> None:
        self.windows.unlock_shards()
