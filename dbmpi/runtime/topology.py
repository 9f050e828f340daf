"""Communicators for a Layout, made with Comm.Split (the thin MPI layer over dbmpi.runtime.layout).

- `window`: shards and workers (not the coordinator); the RMA windows live here. Ranks keep
  their world order, so a shard's window rank equals its world rank.
- `workers`: every worker rank (metrics, phase barriers such as the end of warmstart).
- `replica`: the partitions of this rank's replica (activation exchange, model parallelism).
- `control`: coordinator and shards (Sandblaster's vector commands and scalar reductions).
A rank outside a communicator holds MPI.COMM_NULL there.
"""
from __future__ import annotations

from mpi4py import MPI

from dbmpi.runtime.layout import Layout


class Topology:
    """This rank's role and communicators (construction is collective over `comm`)."""

    def __init__(self, layout: Layout, comm: MPI.Intracomm = MPI.COMM_WORLD):
        layout.check_world(comm.size)
        self.layout = layout
        self.world = comm
        self.rank = comm.rank
        self.role = layout.role(comm.rank)
        undefined = MPI.UNDEFINED
        role = self.role
        self.window = comm.Split(undefined if role.is_coordinator else 0, self.rank)
        self.workers = comm.Split(0 if role.is_worker else undefined, self.rank)
        self.replica = comm.Split(role.replica if role.is_worker else undefined, role.partition)
        self.control = comm.Split(undefined if role.is_worker else 0, self.rank)

    @property
    def is_lead(self) -> bool:
        """Rank 0: replica 0, partition 0 (prints progress, writes the run directory)."""
        return self.rank == 0

    def free(self) -> None:
        for comm in (self.window, self.workers, self.replica, self.control):
            if comm != MPI.COMM_NULL:
                comm.Free()
