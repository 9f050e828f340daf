"""Sandblaster's shard side: a shard's slice of every L-BFGS vector, and the loop that runs
the coordinator's vector commands on them (dbmpi.algorithms.sandblaster drives it, through
dbmpi.ps.commands, the coordinator's side of the same protocol)."""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from dbmpi import kernels
from dbmpi.ps.checkpoint import ShardCheckpoints
from dbmpi.ps.store import SERVE_PAUSE_S, ShardStore
from dbmpi.ps.windows import ParameterWindows
from dbmpi.runtime.comm import Tag, Wait
from dbmpi.runtime.signals import StopRequest

# Shard commands: (op, alpha, a, b, c) as five float64s; vectors by index in `names`.
DOT, AXPY, SCALE, COPY, MULTIPLY, PUBLISH, COLLECT, STOP, CHECKPOINT, SIGNALLED = range(10)


class ShardVectors:
    """A shard's slice of every L-BFGS vector, and the loop that runs the coordinator's
    commands on them."""

    def __init__(self, windows: ParameterWindows, control: MPI.Intracomm, initial: np.ndarray,
                 names: list[str], checkpoints: ShardCheckpoints | None = None,
                 stop: StopRequest | None = None):
        self.windows = windows
        self.checkpoints = checkpoints
        self.stop = stop
        self.control = control
        self.root = control.size - 1  # the coordinator is the last rank of `control`
        self.names = names
        self.vectors: dict[str, np.ndarray] = {"x": np.array(initial, np.float32)}
        self.zeros = np.zeros_like(self.vectors["x"])
        self.commands = 0
        self.store = ShardStore(windows, self.zeros.size)

    def vector(self, name: str) -> np.ndarray:
        vec = self.vectors.get(name)
        if vec is None:
            vec = self.vectors[name] = np.zeros_like(self.zeros)
        return vec

    def serve(self) -> None:
        """Run commands until STOP. Commands come in bursts (the L-BFGS arithmetic) and are
        broadcast with blocking collectives, which are fast; while the replicas compute a
        batch the shard instead sleeps until the coordinator wakes it, so it leaves the
        cores to them (MPICH's blocking waits spin)."""
        command = np.zeros(5, np.float64)
        while True:
            self.control.Bcast(command, root=self.root)
            self.commands += 1
            op, alpha = int(command[0]), float(command[1])
            a, b, c = (self.names[int(i)] if i >= 0 else None for i in command[2:])
            if op == STOP:
                break
            if op == DOT:
                partial = np.array([kernels.dot(self.vector(a), self.vector(b))])
                self.control.Reduce(partial, None, op=MPI.SUM, root=self.root)
            elif op == AXPY:
                kernels.axpy(alpha, self.vector(a), self.vector(b))
            elif op == SCALE:
                kernels.scale(alpha, self.vector(a))
            elif op == COPY:
                kernels.copy(self.vector(a), self.vector(b))
            elif op == MULTIPLY:
                kernels.multiply(self.vector(a), self.vector(b), self.vector(c))
            elif op == PUBLISH:
                self.store.publish(self.vector(a))
                self.control.Reduce(np.zeros(1), None, op=MPI.SUM, root=self.root)
                # The replicas compute the batch now (and fetch from this shard): sleep
                # until it is done, in short naps, so their fetches and pushes progress.
                Wait(self.control.Irecv(np.zeros(1), source=self.root, tag=Tag.WAKE), high=SERVE_PAUSE_S)
            elif op == COLLECT:
                # Every push of the evaluation was flushed before its replica reported it,
                # and no other push can be in flight: take the sum and empty the inbox.
                out = self.vector(a)
                self.store.take(out)
                bad = np.array([float(kernels.count_nonfinite(out))])
                self.control.Reduce(bad, None, op=MPI.SUM, root=self.root)
            elif op == CHECKPOINT:
                # What to write comes next: the vectors (file name, vector) and, for shard 0,
                # the attributes; then every shard streams its slices (dbmpi.ps.checkpoint).
                info = self.control.bcast(None, root=self.root)
                vectors = [(stored, self.vector(name)) for stored, name in info.pop("vectors")]
                self.checkpoints.write(vectors, **info)
                self.control.Reduce(np.zeros(1), None, op=MPI.SUM, root=self.root)
            elif op == SIGNALLED:
                flag = 1.0 if self.stop is not None and self.stop.requested else 0.0
                self.control.Reduce(np.array([flag]), None, op=MPI.SUM, root=self.root)
            else:  # pragma: no cover - a programming error, not input
                raise RuntimeError(f"unknown shard command {op}")

    def close(self) -> None:
        self.store.close()
