"""The coordinator's side of Sandblaster's shard vector commands (dbmpi.ps.vectors runs the
shard's side): broadcast a command, sum the shards' scalars, wake the shards after a batch.

Over `control` (the shards, then the coordinator as its last rank), so dbmpi.algorithms.sandblaster
drives the shards by method calls and never touches MPI itself.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from dbmpi.runtime.comm import Tag


class ShardCommands:
    """Send commands (op, alpha, a, b, c: five float64s, vectors by index in `names`) to
    every shard at once, and gather what they answer (one float64 each, summed)."""

    def __init__(self, control: MPI.Intracomm, names: list[str]):
        self.control = control
        self.root = control.rank  # the coordinator
        self.n_shards = control.size - 1
        self.index = {name: i for i, name in enumerate(names)}

    def send(self, op: int, alpha: float = 0.0, a: str | None = None, b: str | None = None,
             c: str | None = None) -> None:
        """Broadcast one command; the vectors `a`, `b`, `c` by name (None: unused)."""
        ids = [self.index[n] if n is not None else -1 for n in (a, b, c)]
        command = np.array([op, alpha, *ids], np.float64)
        self.control.Bcast(command, root=self.root)

    def share(self, obj) -> None:
        """Broadcast a pickled object the last command needs (a checkpoint's contents)."""
        self.control.bcast(obj, root=self.root)

    def total(self) -> float:
        """The sum of the shards' answers to the last command (also: every shard is done)."""
        total = np.zeros(1)
        self.control.Reduce(np.zeros(1), total, op=MPI.SUM, root=self.root)
        return float(total[0])

    def wake(self) -> None:
        """Wake the shards, asleep since they published a point (the batch is done)."""
        for shard in range(self.n_shards):
            self.control.Send(np.zeros(1), dest=shard, tag=Tag.WAKE)
