"""The parameter server's RMA windows: allocation, the run-long epochs, and the free.

Each shard exposes three windows made by `MPI.Win.Allocate` on the window communicator
(shards and workers; a worker exposes zero bytes):

- `params` (float32, disp_unit 4): the shard's slice of the canonical parameter vector;
- `inbox` (float32): the gradients workers push, summed in place;
- `control` (int64, disp_unit 8): counters and histograms (dbmpi.ps.control).

Every rank (shards and workers, in Downpour and Sandblaster) opens one passive-target
epoch per window and shard rank (`Lock(rank, LOCK_SHARED)`: only shards expose memory) for
the whole run and completes each operation with `Flush` or a request. Per-target epochs,
not `Lock_all`: with MPICH, closing a `Lock_all` epoch waits on every rank of the window,
so one dead replica would block the others at the end of a run; a per-target epoch
involves only the shards (and after a failure the survivors leave without closing
anything: dbmpi.runtime.failover). Why concurrent accesses are well-defined:
dbmpi.ps.store and dbmpi.ps.control.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from dbmpi.ps.control import ControlBlock, control_size, home_workers
from dbmpi.runtime.comm import Tag
from dbmpi.runtime.layout import Layout

# MPI ignores the origin buffer of a NO_OP read; a zero-count origin keeps it disjoint
# from the result buffer (the target must then be given explicitly).
NO_ORIGIN = [None, 0, MPI.FLOAT]
# Each shard's float32 windows are allocated in whole 64-byte lines. MPICH puts the windows
# of one node's ranks back to back in one shared segment; MPICH 4.0.2 (Debian 12's) then
# moved concurrent SUMs between the last value of one shard and the first of the next when
# they shared an aligned word (tests/mpi/test_parameter_server.py caught it: about 1 in 1000
# values wrong, always at a shard boundary). Lines of their own cost at most 60 bytes.
ALIGN_VALUES = 16


class ParameterWindows:
    """The params, inbox and control windows of every shard (collective over `comm`)."""

    def __init__(self, comm: MPI.Intracomm, layout: Layout, shard: int | None):
        self.comm = comm
        self.layout = layout
        self.locked = False
        n = layout.shard_size(shard) if shard is not None else 0
        n_control = control_size(len(home_workers(layout, shard))) if shard is not None else 0
        padded = -(-n // ALIGN_VALUES) * ALIGN_VALUES
        self.params = MPI.Win.Allocate(4 * padded, 4, comm=comm)
        self.inbox = MPI.Win.Allocate(4 * padded, 4, comm=comm)
        self.control = MPI.Win.Allocate(8 * n_control, 8, comm=comm)
        self.block = ControlBlock(self.control)
        if shard is not None:
            # Zero the fresh windows before anyone can reach them (a barrier follows).
            np.frombuffer(self.inbox.tomemory(), np.float32)[:] = 0
            np.frombuffer(self.control.tomemory(), np.int64)[:] = 0
            np.frombuffer(self.params.tomemory(), np.float32)[:] = 0

    def windows(self):
        return (self.params, self.inbox, self.control)

    def progress(self) -> None:
        """Let MPI progress the requests other ranks have on this rank's windows (an Iprobe
        enters the progress engine; RMA calls on this rank's own window may not)."""
        self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=Tag.PROGRESS)

    def lock_shards(self) -> None:
        """Open a shared passive-target epoch on every shard rank of every window, for the
        run (once per process: the shard and client objects of a rank share it)."""
        if self.locked:
            return
        for win in self.windows():
            for rank in self.layout.shard_ranks:
                win.Lock(rank, MPI.LOCK_SHARED)
        self.locked = True

    def unlock_shards(self) -> None:
        """Close the epochs (every shard must be alive: an unlock waits for its target)."""
        if not self.locked:
            return
        for win in self.windows():
            for rank in self.layout.shard_ranks:
                win.Unlock(rank)
        self.locked = False

    def free(self) -> None:
        for win in self.windows():
            win.Free()


def gather_parameters(comm: MPI.Intracomm, layout: Layout, my_slice: np.ndarray, root: int = 0):
    """Collect every shard's slice into the full canonical vector at `root` (collective
    over the window communicator; workers contribute nothing). Returns None elsewhere."""
    full = np.empty(layout.n_params if comm.rank == root else 0, np.float32)
    counts = [0] * comm.size
    displs = [0] * comm.size
    for k, (lo, hi) in enumerate(layout.shard_ranges):
        counts[layout.shard_rank(k)] = hi - lo
        displs[layout.shard_rank(k)] = lo
    send = my_slice if my_slice is not None else np.empty(0, np.float32)
    comm.Gatherv(send, [full, counts, displs, MPI.FLOAT], root=root)
    return full if comm.rank == root else None
