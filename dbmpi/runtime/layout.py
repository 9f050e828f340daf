"""The rank layout of a run: which rank plays which role, and which parameters each shard owns.

Pure and MPI-free, so `dbmpi plan` can print it anywhere and every rank computes the same
layout (and the same verdict on a bad one) before any collective call.

Rank order: the R x P worker ranks first, replica-major (replica r, partition p is rank
r * P + p, so rank 0 is replica 0, the warmstart replica and the lead), then the S shards,
then the Sandblaster coordinator if there is one. Shard k owns the contiguous range
`shard_ranges[k]` of the canonical parameter vector; the ranges are balanced by size (they
differ by at most one parameter) and may split a tensor.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field


class LayoutError(ValueError):
    """A layout that cannot run (counts, world size); the message says what to change."""


@dataclass(frozen=True)
class Role:
    """What one rank does: a worker (replica, partition), a parameter-server shard, or the coordinator."""

    kind: str  # "worker" | "shard" | "coordinator"
    replica: int = -1
    partition: int = -1
    shard: int = -1

    @property
    def is_worker(self) -> bool:
        return self.kind == "worker"

    @property
    def is_shard(self) -> bool:
        return self.kind == "shard"

    @property
    def is_coordinator(self) -> bool:
        return self.kind == "coordinator"

    def __str__(self) -> str:
        if self.is_worker:
            return f"replica {self.replica} partition {self.partition}"
        if self.is_shard:
            return f"shard {self.shard}"
        return "coordinator"


@dataclass(frozen=True)
class Segment:
    """A piece of a canonical range that lives on one shard: `count` values at
    `shard_offset` in the shard's slice, `local_offset` in the requesting range."""

    shard: int
    shard_offset: int
    count: int
    local_offset: int


def balanced_ranges(total: int, parts: int) -> tuple[tuple[int, int], ...]:
    """Split [0, total) into `parts` contiguous ranges whose sizes differ by at most one."""
    base, extra = divmod(total, parts)
    ranges, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        ranges.append((start, stop))
        start = stop
    return tuple(ranges)


@dataclass(frozen=True)
class Layout:
    """Counts of every role, the world they need, and the shards' parameter ranges."""

    n_params: int
    n_shards: int
    n_replicas: int
    n_partitions: int = 1
    coordinator: bool = False
    shard_ranges: tuple[tuple[int, int], ...] = field(init=False)

    def __post_init__(self):
        for name in ("n_shards", "n_replicas", "n_partitions"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"train.{name}: must be a positive integer, got {value!r}")
        if self.n_params < 1:
            raise LayoutError("model: has no parameters to shard")
        if self.n_shards > self.n_params:
            raise LayoutError(f"train.n_shards: {self.n_shards} shards for only {self.n_params} "
                              "parameters; use at most one shard per parameter")
        object.__setattr__(self, "shard_ranges", balanced_ranges(self.n_params, self.n_shards))

    # Counts -------------------------------------------------------------------------------
    @property
    def n_workers(self) -> int:
        return self.n_replicas * self.n_partitions

    @property
    def world_size(self) -> int:
        return self.n_workers + self.n_shards + (1 if self.coordinator else 0)

    def formula(self) -> str:
        text = (f"{self.n_replicas} replica(s) x {self.n_partitions} partition(s) + "
                f"{self.n_shards} shard(s)")
        return text + (" + 1 coordinator" if self.coordinator else "")

    def check_world(self, world_size: int) -> None:
        """Raise LayoutError unless the MPI world has exactly the ranks this layout needs."""
        if world_size != self.world_size:
            raise LayoutError(
                f"{world_size} MPI ranks were started but the layout needs {self.formula()} = "
                f"{self.world_size}; run with mpiexec -n {self.world_size} or change "
                "train.n_replicas / train.n_partitions / train.n_shards")

    # Roles --------------------------------------------------------------------------------
    def role(self, rank: int) -> Role:
        if not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank} is outside the layout's {self.world_size} ranks")
        if rank < self.n_workers:
            return Role("worker", replica=rank // self.n_partitions, partition=rank % self.n_partitions)
        if rank < self.n_workers + self.n_shards:
            return Role("shard", shard=rank - self.n_workers)
        return Role("coordinator")

    def worker_rank(self, replica: int, partition: int = 0) -> int:
        return replica * self.n_partitions + partition

    def shard_rank(self, shard: int) -> int:
        return self.n_workers + shard

    @property
    def shard_ranks(self) -> list[int]:
        return [self.shard_rank(k) for k in range(self.n_shards)]

    @property
    def coordinator_rank(self) -> int | None:
        return self.world_size - 1 if self.coordinator else None

    # Parameters ---------------------------------------------------------------------------
    def shard_size(self, shard: int) -> int:
        start, stop = self.shard_ranges[shard]
        return stop - start

    def segments(self, start: int, stop: int) -> list[Segment]:
        """The shard pieces of the canonical range [start, stop), in order."""
        if not 0 <= start <= stop <= self.n_params:
            raise LayoutError(f"range [{start}, {stop}) is outside the {self.n_params} parameters")
        pieces = []
        for shard, (lo, hi) in enumerate(self.shard_ranges):
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                pieces.append(Segment(shard, a - lo, b - a, a - start))
        return pieces

    # Description --------------------------------------------------------------------------
    def worker_params(self, role: Role, plan=None) -> int:
        """Parameters a worker fetches and pushes: all, or its partition's share."""
        if plan is None or self.n_partitions == 1:
            return self.n_params
        return plan.n_params_of(role.partition)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["shard_ranges"] = [list(r) for r in self.shard_ranges]
        data["world_size"] = self.world_size
        data["roles"] = [str(self.role(rank)) for rank in range(self.world_size)]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def describe(self, optimizer: str = "adagrad", plan=None, memory: list[int] | None = None) -> str:
        """The rank table; with a partition plan, each worker's own parameter share; with
        `memory`, each rank's resident bytes (dbmpi.runtime.memory). `optimizer` is
        accepted for the callers' sake (the memory model reads it from the config)."""
        lines = [f"layout: {self.formula()} = {self.world_size} ranks; "
                 f"{self.n_params:,} parameters ({self.n_params * 4 / 2**20:.1f} MiB float32)"]
        lines.append(f"  {'rank':>4}  {'role':<24} {'parameters':<28}" + (f" {'memory':>10}" if memory else ""))
        for rank in range(self.world_size):
            role = self.role(rank)
            if role.is_shard:
                lo, hi = self.shard_ranges[role.shard]
                params = f"[{lo:,}, {hi:,}) {hi - lo:,}"
            elif role.is_worker:
                mine = self.worker_params(role, plan)
                params = (f"all {mine:,} (fetch/push)" if mine == self.n_params else
                          f"own {mine:,} (fetch/push)")
            else:
                params = "none (scalars only)"
            row = f"  {rank:>4}  {str(role):<24} {params:<28}"
            lines.append(row + (f" {_mib(memory[rank]):>10}" if memory else ""))
        if self.n_partitions > 1 and plan is None:
            lines.append("  (workers of a partitioned replica hold only their partition's "
                         "parameters: see the partition plan)")
        return "\n".join(lines)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes else "-"


def human_bytes(nbytes: float) -> str:
    """1536 -> '1.5 KiB', up to EiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024:
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1024
    return f"{nbytes:.3g} EiB"


def machine_memory() -> int | None:
    """This machine's physical memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def require_memory(nbytes: int, what: str) -> None:
    """Refuse, before allocating, what needs more memory than this machine has: one clear
    LayoutError instead of numpy's MemoryError traceback (or the machine thrashing)."""
    available = machine_memory()
    if available is not None and nbytes > available:
        raise LayoutError(f"{what} need {human_bytes(nbytes)} but this machine has "
                          f"{human_bytes(available)} of memory; make the model smaller "
                          "(see dbmpi plan CONFIG)")


def layout_for(train: dict, n_params: int, *, coordinator: bool = False) -> Layout:
    """The layout a validated [train] table asks for."""
    return Layout(n_params=n_params, n_shards=train["n_shards"], n_replicas=train["n_replicas"],
                  n_partitions=train.get("n_partitions", 1), coordinator=coordinator)


__all__ = ["Layout", "LayoutError", "Role", "Segment", "balanced_ranges", "human_bytes", "layout_for",
           "machine_memory", "require_memory"]
