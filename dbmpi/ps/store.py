"""A shard's parameters and gradient inbox, seen from the shard itself: publish, drain, take,
one chunk at a time, with MPI progress driven between chunks.

Why every concurrent access is well-defined. MPI lets accumulate operations on the same
location run concurrently when they use the same operation or MPI_NO_OP (the default
`accumulate_ops = same_op_no_op`), and each is atomic per element of a predefined type.
Every access to shard memory, the shard's own included, is such an operation; the shard
never loads or stores its window memory directly:

- inbox: workers `Accumulate(SUM)`; the shard drains it with `Get_accumulate(NO_OP)`, then
  `Accumulate(SUM)` of the negated values it read. A push that lands between the two stays
  in the inbox for the next drain, so no update is lost or counted twice. The argument is per
  element, so it holds chunk by chunk: draining chunk j while pushes land in chunk k
  changes nothing;
- params: the shard publishes a private working copy with `Accumulate(REPLACE)`; workers
  read with `Get_accumulate(NO_OP)`. Every element a fetch returns is a value that element
  held (never a torn value), though one fetch may mix elements from before and after a
  publish: the loose consistency Downpour accepts;
- control: only `Fetch_and_op`/`Get_accumulate` with SUM or NO_OP (dbmpi.ps.control).

Progress. Off-node (MPICH's network module, Open MPI's one-sided components without RDMA
atomics) a passive-target operation completes only when the *target* enters MPI: a shard
computing an update makes every fetch and push wait for it (24-27 ms per counter round trip
to a shard busy with a 64 MB update, measured on MPICH's netmod). So the store works in
chunks of `CHUNK` values (512 KB: about 0.4 ms of an Adagrad update) and ends each chunk with
`settle()`: the chunk's flushes and a `progress()` of the window communicator (an
`Iprobe`, which enters the progress engine on MPICH and Open MPI alike). The alternative,
an MPI progress thread (MPICH's MPIR_CVAR_ASYNC_PROGRESS, which needs MPI_THREAD_MULTIPLE),
was measured and not chosen: with ranks sharing cores its spinning thread made every round
trip slower (a counter round trip to a shard busy with 64 MB updates, three runs: 12-24 ms
with the thread, 1.6-3.1 ms with neither, 0.2-1.3 ms with chunks; bench/network.py,
docs/BENCHMARKS.md section (g), which also shows the cost: a 64 MB fetch from a busy shard
is slower with chunks).

Chunks also make the update one pass over memory: a Downpour shard (dbmpi.ps.shard) drains a
chunk, applies its optimizer to it and publishes it while the chunk is in cache, instead of
four sweeps over the whole slice.

Tested in tests/mpi/test_store.py. A drained NaN or Inf cannot be cleared with the
operations allowed alongside SUM (x + -x is NaN for x = NaN): only `take`, when no push can
be in flight, removes it.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from mpi4py import MPI

from dbmpi.ps.windows import NO_ORIGIN, ParameterWindows

# Values per chunk: 512 KB. MPICH 5.0.2's self-targeted Get_accumulate runs at memcpy speed
# from 128K values up and about 4x slower below (best of 5, shared memory); a chunk's
# Adagrad takes about 0.1 ms (0.19 ms/MB), its RMA about 0.2 ms, the whole update 0.8 ms/MB.
CHUNK = 128 * 1024
# The longest a shard sleeps between MPI calls while other ranks may be waiting on its windows:
# off-node, an idle shard answers a fetch or push only at its next MPI call.
SERVE_PAUSE_S = 5e-4


class ShardStore:
    """This shard's `params` and `inbox` windows, accessed by the shard (self-targeted RMA
    inside the run-long epochs of ParameterWindows.lock_shards). `chunk`: values per chunk
    (None: the whole slice at once, as before chunking; benchmarks compare the two)."""

    def __init__(self, windows: ParameterWindows, size: int, chunk: int | None = CHUNK):
        self.windows = windows
        self.me = windows.comm.rank
        self.size = size
        self.chunk = max(1, min(chunk or size, size)) if size else 1
        self.negated = np.empty(self.chunk, np.float32)
        windows.lock_shards()

    def chunks(self) -> Iterator[tuple[int, int]]:
        """The [lo, hi) ranges of the slice, one chunk each."""
        for lo in range(0, self.size, self.chunk):
            yield lo, min(lo + self.chunk, self.size)

    # One chunk ----------------------------------------------------------------------------
    def drain_part(self, out: np.ndarray, lo: int) -> bool:
        """Move the inbox at [lo, lo + out.size) into `out`; False when it held nothing there.
        The subtraction is flushed by the next settle()."""
        self.read_part(out, lo)
        if not out.any():
            return False
        negated = self.negated[:out.size]
        np.negative(out, out=negated)
        self.windows.inbox.Accumulate(negated, self.me, target=(lo, out.size, MPI.FLOAT), op=MPI.SUM)
        return True

    def read_part(self, out: np.ndarray, lo: int) -> None:
        """The inbox at [lo, lo + out.size) as it is now (element-atomic NO_OP)."""
        inbox = self.windows.inbox
        inbox.Get_accumulate(NO_ORIGIN, out, self.me, target=(lo, out.size, MPI.FLOAT), op=MPI.NO_OP)
        inbox.Flush(self.me)

    def publish_part(self, values: np.ndarray, lo: int) -> None:
        """Make `values` what fetches read at [lo, lo + values.size) once settled."""
        self.windows.params.Accumulate(values, self.me, target=(lo, values.size, MPI.FLOAT), op=MPI.REPLACE)

    def settle(self) -> None:
        """Complete this chunk's operations and let MPI progress other ranks' requests."""
        self.windows.inbox.Flush(self.me)
        self.windows.params.Flush(self.me)
        self.windows.progress()

    # The whole slice ------------------------------------------------------------------------
    def publish(self, values: np.ndarray) -> None:
        """Make `values` what fetches read."""
        for lo, hi in self.chunks():
            self.publish_part(values[lo:hi], lo)
            self.settle()

    def drain(self, out: np.ndarray) -> bool:
        """Move the inbox into `out` atomically (pushes landing meanwhile stay for the next
        drain); False when it held nothing."""
        found = False
        for lo, hi in self.chunks():
            found |= self.drain_part(out[lo:hi], lo)
            self.settle()
        return found

    def take(self, out: np.ndarray) -> None:
        """Move the inbox into `out` and zero it (REPLACE, which must not meet a concurrent
        SUM: only when no push can be in flight). Unlike `drain`, it also clears a NaN or Inf."""
        inbox = self.windows.inbox
        for lo, hi in self.chunks():
            self.read_part(out[lo:hi], lo)
            zeros = self.negated[:hi - lo]
            zeros[:] = 0
            inbox.Accumulate(zeros, self.me, target=(lo, hi - lo, MPI.FLOAT), op=MPI.REPLACE)
            self.settle()

    def close(self) -> None:
        self.windows.unlock_shards()
