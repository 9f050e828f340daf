"""Resident memory per rank, by role: what `dbmpi plan` reports and the run's memory check uses.

Every buffer a role allocates and touches is one named part (bytes), so the figure is the
rank's peak resident set less the interpreter, not a bound: the P = 1 worker holds the whole
model (parameters, gradient, two accrued pushes), a model partition only its ranges, a shard
its slice (two windows, working copy, drain buffer, optimizer state and the snapshot it
keeps while its slice file of a checkpoint is written: every shard alike, shard 0's
top-level file holds no values), Sandblaster's coordinator no model vector. A worker's data
is its replica's slice (with a dense first layer and P > 1, its 1/P piece of it and the
batches it joins), its minibatches, replica 0's test set and, for the split final
evaluation (Sandblaster's test evaluations too), one piece of `eval_batch_size` test rows.
`tests/test_memory.py` holds a real run's measured peak RSS of every rank to this figure.

On one node MPICH puts the shards' windows in shared memory and a worker reads and adds to
them in place: their pages count in the worker's resident set too (`mapped`), although the
node holds them once. Across nodes a worker maps nothing.

Pure and MPI-free; the interpreter baseline (python, numpy, h5py, mpi4py, dbmpi imported)
is measured in a child process.
"""
from __future__ import annotations

import functools
import math
import os
import resource
import subprocess
import sys
from dataclasses import dataclass

from dbmpi.runtime.layout import Layout, Role, human_bytes

# A shard's float32 windows are allocated in whole lines of this many values
# (dbmpi.ps.windows.ALIGN_VALUES; tests/test_memory.py checks they agree).
WINDOW_ALIGN = 16
# Optimizer state vectors per parameter (dbmpi.algorithms.optimizers).
OPTIMIZER_STATE = {"sgd": 0, "momentum": 1, "nesterov": 1, "adagrad": 1, "adam": 2, "adamw": 2}
# Minibatches a replica holds besides its slice: the one in use and the one prefetched.
BATCHES_HELD = 2
# With a dense first layer and P > 1, the batch a partition joins (dbmpi.runtime.batchshare):
# its piece packed, the joined examples and their inputs copied out.
BATCHES_JOINED = 3


@dataclass(frozen=True)
class DataSize:
    """Examples in the data set's splits (None: the file is not there yet)."""

    n_train: int
    n_test: int

    @classmethod
    def of_file(cls, path: str) -> DataSize | None:
        from dbmpi import data as datasets

        try:
            with datasets.open_dataset(path) as dataset:
                return cls(dataset.n_train, dataset.n_test)
        except (OSError, ValueError):
            return None


@dataclass(frozen=True)
class RankMemory:
    """One rank's resident memory: its own buffers (name, bytes), the shards' window pages
    it maps on a shared-memory node, and the interpreter."""

    rank: int
    role: Role
    parts: tuple[tuple[str, int], ...]
    mapped: int = 0
    baseline: int = 0

    @property
    def own(self) -> int:
        return sum(nbytes for _, nbytes in self.parts)

    @property
    def resident(self) -> int:
        """The peak resident set to expect on one node (own + mapped + interpreter)."""
        return self.own + self.mapped + self.baseline

    def to_dict(self) -> dict:
        return {"rank": self.rank, "role": str(self.role), "parts": dict(self.parts), "own": self.own,
                "mapped": self.mapped, "baseline": self.baseline, "resident": self.resident}


class MemoryModel:
    """The memory of every rank of one run: layout, network structure, [train] table,
    partition plan (P > 1), data size (None: data not counted), interpreter baseline."""

    def __init__(self, layout: Layout, network, tcfg: dict, plan=None, data: DataSize | None = None,
                 baseline: int = 0):
        self.layout, self.network, self.tcfg, self.plan = layout, network, tcfg, plan
        self.data, self.baseline = data, baseline
        self.sandblaster = tcfg["algorithm"] == "sandblaster"

    def ranks(self) -> list[RankMemory]:
        return [self.rank(rank) for rank in range(self.layout.world_size)]

    def rank(self, rank: int) -> RankMemory:
        role = self.layout.role(rank)
        if role.is_shard:
            parts = self._shard(role)
            mapped = 0
        elif role.is_worker:
            parts = self._worker(role)
            mapped = 2 * 4 * self._padded_reach(role)  # params read, inbox added to
        else:
            parts, mapped = [], 0  # the coordinator: scalars and portion bookkeeping
        return RankMemory(rank, role, tuple((name, int(b)) for name, b in parts if b), mapped, self.baseline)

    # Shards -------------------------------------------------------------------------------
    def _shard(self, role: Role) -> list[tuple[str, int]]:
        n = self.layout.shard_size(role.shard)
        parts = [("windows (params, inbox)", 2 * 4 * padded(n))]
        if self.sandblaster:
            vectors = 6 + 2 * self.tcfg["history"]
            return parts + [(f"L-BFGS vectors ({vectors})", 4 * vectors * n)]
        state = OPTIMIZER_STATE.get(self.tcfg["optimizer"], 1)
        parts += [("working copy", 4 * n), ("drain buffer", 4 * n), ("optimizer state", 4 * state * n)]
        # The snapshot its slice file of a checkpoint is written from (dbmpi.io.checkpoint.
        # write_slice hashes and writes views of it: no other buffer; shard 0's top-level file
        # holds only links to the slice files).
        return parts + [("checkpoint snapshot", 4 * (1 + state) * n)]

    # Workers ------------------------------------------------------------------------------
    def _worker(self, role: Role) -> list[tuple[str, int]]:
        n = self.layout.worker_params(role, self.plan)
        batch = self.tcfg["portion_size"] if self.sandblaster else self.tcfg["batch_size"]
        vectors = 3 if self.sandblaster else 4  # params, grad, then the accrual or 2 accrued pushes
        parts = [("parameters, gradient, " + ("accrual" if self.sandblaster else "2 accrued pushes"),
                  4 * vectors * n)]
        # A partition's activations: its share of the whole model's (its gather buffers for
        # the activation exchange are not counted).
        share = 1 if self.plan is None else self.plan.n_partitions
        train = self.network.activation_bytes(batch) // share
        if self.data is None:
            return parts + [("activations", train)]
        # Every worker scores pieces of the test set: the split final evaluation (Downpour),
        # the test evaluations (Sandblaster); replica 0 also evaluates its copy as it goes.
        piece = min(self.tcfg["eval_batch_size"], self.data.n_test)
        evaluation = self.network.activation_bytes(piece, training=False) // share if piece else 0
        if role.replica == 0 and not self.sandblaster:
            parts.append(("test set", self.data.n_test * self._example_bytes(role)))
        parts.append(("test piece", piece * self._example_bytes(role)))
        # A layer keeps one buffer per name, re-made for another batch size: the larger set.
        parts.append(("activations", max(train, evaluation)))
        return parts + [("training data (slice, minibatches)", self._training_data(role, batch))]

    def _training_data(self, role: Role, batch: int) -> int:
        """A worker's training examples: its replica's slice (Sandblaster reads portions from
        the file instead), or with a dense first layer and P > 1 its 1/P piece of it and the
        batches it joins; the batch in use and the one prefetched."""
        from dbmpi.data import share_range

        example = self._example_bytes(role)
        if self.sandblaster:
            return BATCHES_HELD * batch * example
        lo, hi = share_range(self.data.n_train, role.replica, self.layout.n_replicas)
        if not self._split_examples():
            return (hi - lo + BATCHES_HELD * batch) * example
        first, last = share_range(hi - lo, role.partition, self.layout.n_partitions)
        return (last - first + (BATCHES_HELD + BATCHES_JOINED) * batch) * example

    def _split_examples(self) -> bool:
        """Whether a replica's partitions share its slice (dense first layer, P > 1)."""
        return self.plan is not None and self.plan.n_partitions > 1 and \
            self.plan.input_rows(0) == (0, self.network.input_shape[0])

    def _example_bytes(self, role: Role | None = None) -> int:
        """One example's input values (a partition's rows only) and label."""
        values = math.prod(self.network.input_shape)
        if role is not None and self.plan is not None:
            r0, r1 = self.plan.input_rows(role.partition)
            values = values // self.network.input_shape[0] * (r1 - r0)
        return 4 * values + 4

    def _padded_reach(self, role: Role) -> int:
        """Window values of the shards a worker's ranges reach, in whole lines."""
        if self.plan is None or self.layout.n_partitions == 1:
            ranges = [(0, self.layout.n_params)]
        else:
            ranges = self.plan.param_ranges(role.partition)
        return sum(padded(seg.count) for a, b in ranges for seg in self.layout.segments(a, b))


def describe(ranks: list[RankMemory], data_counted: bool = True) -> str:
    """Each distinct rank's memory, part by part (ranks alike are listed together)."""
    groups: dict[tuple, list[RankMemory]] = {}
    for mem in ranks:
        groups.setdefault((mem.role.kind, mem.parts, mem.mapped), []).append(mem)
    lines = [f"memory per rank (peak resident, one node; interpreter {human_bytes(ranks[0].baseline)} measured):"]
    for members in groups.values():
        first = members[0]
        who = f"rank {first.rank} ({first.role})" if len(members) == 1 else \
            f"{len(members)} ranks like {first.rank} ({first.role})"
        parts = [f"{name} {human_bytes(nbytes)}" for name, nbytes in first.parts]
        if first.mapped:
            parts.append(f"shard windows it maps {human_bytes(first.mapped)}")
        lines.append(f"  {who}: {human_bytes(first.resident)} = " + " + ".join(parts or ["no model vector"])
                     + " + interpreter")
    if not data_counted:
        lines.append("  (the data file is not there yet: data and evaluation buffers not counted)")
    return "\n".join(lines)


def padded(n: int) -> int:
    """Values of a window of n values allocated in whole lines."""
    return -(-n // WINDOW_ALIGN) * WINDOW_ALIGN


@functools.lru_cache(maxsize=1)
def interpreter_baseline() -> int:
    """Peak resident bytes of a Python that did what every rank does before its buffers:
    import numpy, h5py, scipy's BLAS, dbmpi's commands, and initialise MPI (a singleton,
    outside any launcher), measured in a child process."""
    code = ("from mpi4py import MPI\n"
            "import numpy, h5py, threadpoolctl, scipy.linalg.cython_blas\n"
            "import dbmpi.cli, dbmpi.kernels, dbmpi.algorithms.downpour, dbmpi.algorithms.sandblaster\n"
            "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    launcher = ("PMI_", "PMIX_", "HYDRA_", "MPIR_", "OMPI_", "SLURM_")  # a singleton: no launcher to reach
    env = {key: value for key, value in os.environ.items() if not key.startswith(launcher)}
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                              env=env)
        return int(done.stdout.split()[-1]) * 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return current_peak_rss()


def current_peak_rss() -> int:
    """This process's peak resident bytes so far (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


__all__ = ["DataSize", "MemoryModel", "RankMemory", "current_peak_rss", "describe", "interpreter_baseline", "padded"]
