"""What every MPI training run does before and around its algorithm (Downpour, Sandblaster).

API (both `downpour.run` and `sandblaster.run` are these two calls around their `_run`):

- `prepare_run(cfg, run_path, comm, say, resume, ...) -> RunContext`: builds the network's
  structure (no parameter vector: each role allocates only what it holds), the layout and
  the partition plan, checks the world size and that every rank's buffers fit in this
  machine's memory (`check_rank_memory`), then on the root rank (rank 0, or
  `root` given: Sandblaster's coordinator) prepares and checks the data, resolves `resume`
  and makes the run directory. Each of those steps is agreed (dbmpi.runtime.comm.agree): it
  raises the same AGREED_ERRORS error on every rank, so bad input ends every rank with the
  same message before the first collective of the run. `check(data_info)` (optional) adds
  an algorithm's own verdict on the data before the run directory exists.
- `run_committed(ctx, body) -> body's result`: from here on every rank is committed. It makes
  the Topology (collective), runs `body(ctx)` under the BLAS thread limit and a StopRequest
  (`ctx.topo`, `ctx.stop` set), frees the Topology. A DivergedError passes through (every
  rank raises it after the teardown); any other error ends the whole job (abort_on_error),
  so no peer is left waiting.

`RunContext` carries the rest: cfg, network, layout, plan, comm, root, run_path, run_dir
(the root's RunDirectory, None elsewhere), say (the root's; silent elsewhere), `speaker(rank)`
(the caller's `say` on that rank only), resumed (resolve_resume's answer), data_info
({"n_train", "n_test"}); `memory()` gives each rank's expected peak resident bytes
(dbmpi.runtime.memory).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from threadpoolctl import threadpool_limits

from dbmpi import data as datasets
from dbmpi.algorithms.sgd import DivergedError
from dbmpi.config import ConfigError
from dbmpi.io.atomic import atomic_write_text
from dbmpi.io.checkpoint import (
    SINGLE_FILE_VERSION,
    CheckpointError,
    list_checkpoints,
    newest_valid,
    open_checkpoint,
)
from dbmpi.io.rundir import RunDirectory, RunDirectoryError
from dbmpi.model import Model
from dbmpi.model.loader import build_model
from dbmpi.parallel.partition import PartitionPlan, plan_for
from dbmpi.runtime.comm import Comm, abort_on_error, agree
from dbmpi.runtime.layout import Layout, LayoutError, layout_for, require_memory
from dbmpi.runtime.memory import DataSize, MemoryModel, current_peak_rss
from dbmpi.runtime.signals import StopRequest
from dbmpi.runtime.topology import Topology

AGREED_ERRORS = (CheckpointError, ConfigError, datasets.DatasetError, LayoutError, RunDirectoryError)
T = TypeVar("T")


def _silent(_msg: str) -> None:
    pass


def resolve_resume(resume: str | None, run_path: Path, network: Model, skip: tuple[str, ...] = ()) -> dict | None:
    """The checkpoint a run resumes from, checked before anything starts: its structure
    (format 2: the slice files are there and fit; each shard hashes the slices it reads,
    `verify_own_range`) or, for the single-file format 1, every checksum; and the model.

    "auto": the newest such checkpoint in the run directory not in `skip`, or a fresh start
    if it has none (so a requeued job's first start works too); a path: that checkpoint.
    """
    if resume is None:
        return None
    if resume == "auto":
        if not list_checkpoints(run_path / "checkpoints"):
            return None
        path = newest_valid(run_path / "checkpoints", skip=skip)
    else:
        path = Path(resume)
    with open_checkpoint(path, verify=False if resume == "auto" else "structure") as ckpt:
        ckpt.check_network(network)
        return {"path": str(path), "step": ckpt.step, "state": ckpt.state, "vectors": ckpt.vectors(),
                "format_version": ckpt.format_version}


def verify_own_range(resumed: dict | None, layout: Layout, rank: int) -> str | None:
    """On a shard rank, for a format-2 checkpoint: hash the slice files that hold this
    shard's range of the vectors it will read (with other S, the few old slices its range
    spans, each whole); the first problem, or None. Other ranks read nothing: None."""
    if resumed is None or resumed.get("format_version") == SINGLE_FILE_VERSION:
        return None
    role = layout.role(rank)
    if not role.is_shard:
        return None
    lo, hi = layout.shard_ranges[role.shard]
    vectors = ["params"] if resumed.get("parameters_only") else resumed["vectors"]
    with open_checkpoint(resumed["path"], verify=False) as ckpt:
        problems = ckpt.verify_range(lo, hi, vectors)
    return f"{resumed['path']}: corrupt: {problems[0]}" if problems else None


def resume_verified(comm: Comm, resume: str | None, run_path: Path, network: Model, layout: Layout, root: int,
                    say: Callable[[str], None], parameters_only: bool = False) -> dict | None:
    """resolve_resume on `root`, then every shard verifies its own range (verify_own_range),
    all agreed: a bad checksum found by any shard is one CheckpointError on every rank, or,
    with `--resume auto`, a line from the root and the next older checkpoint."""
    skip: list[str] = []
    while True:
        resumed = agree(comm, lambda: resolve_resume(resume, run_path, network, tuple(skip)), AGREED_ERRORS,
                        root=root)
        if resumed is not None and parameters_only:
            resumed.update(state={}, parameters_only=True)  # no optimizer state: the parameters only
        try:
            mine = verify_own_range(resumed, layout, comm.rank)
        except CheckpointError as exc:
            mine = str(exc)
        problem = next((p for p in comm.allgather(mine) if p is not None), None)
        if problem is None:
            return resumed
        if resume != "auto":
            raise CheckpointError(problem)
        if comm.rank == root:
            say(f"dbmpi: {problem}; resuming from an older checkpoint instead")
        skip.append(resumed["path"])


def prepare_and_check_data(cfg: dict, network: Model) -> dict:
    """On the root: prepare a built-in source if needed, open the file, check it fits."""
    from dbmpi.algorithms.sgd import open_training_data

    with open_training_data(cfg["data"], network) as dataset:
        return {"n_train": dataset.n_train, "n_test": dataset.n_test}


def check_rank_memory(cfg: dict, network: Model, layout: Layout, plan: PartitionPlan) -> None:
    """Refuse a run whose biggest rank's buffers (dbmpi.runtime.memory: what `dbmpi plan`
    reports, less the interpreter, which differs a little from rank to rank) need more
    memory than this machine has: the same verdict on every rank, before anything is
    allocated, one line instead of a MemoryError traceback."""
    data = DataSize.of_file(cfg["data"]["path"])
    ranks = MemoryModel(layout, network, cfg["train"], plan, data, 0).ranks()
    biggest = max(ranks, key=lambda mem: mem.own)
    require_memory(biggest.own, f"rank {biggest.rank} ({biggest.role}): its buffers (dbmpi plan)")


def make_run_directory(cfg: dict, run_path: Path, layout: Layout, resume: bool = False, rank: int = 0) -> RunDirectory:
    """The run directory with the resolved config and the layout (refused if it holds a run
    and this is not a resume); its metrics file is world rank `rank`'s (the root's)."""
    run = RunDirectory(run_path, resume=resume, rank=rank)
    run.write_config(cfg)
    atomic_write_text(run.path / "layout.json", layout.to_json())
    return run


def set_aside(path: Path | None) -> Path | None:
    """Rename a checkpoint of a diverged state so that --resume auto never picks it."""
    if path is None:
        return None
    aside = path.with_name(path.name + ".diverged")
    os.replace(path, aside)
    return aside


@dataclass
class RunContext:
    """One rank's view of a prepared run (see the module docstring)."""

    cfg: dict
    network: Model
    layout: Layout
    plan: PartitionPlan
    comm: Comm
    root: int
    run_path: Path
    run_dir: RunDirectory | None
    say: Callable[[str], None]
    resumed: dict | None
    data_info: dict
    output: Callable[[str], None] = field(default=print, repr=False)  # the caller's say, on every rank
    topo: Topology | None = None  # set by run_committed
    stop: StopRequest | None = None  # set by run_committed

    @property
    def tcfg(self) -> dict:
        return self.cfg["train"]

    def memory(self) -> list[int]:
        """Each rank's expected peak resident bytes (dbmpi.runtime.memory; this interpreter
        as the baseline): the layout's memory column."""
        data = DataSize(self.data_info["n_train"], self.data_info["n_test"])
        model = MemoryModel(self.layout, self.network, self.tcfg, self.plan, data, current_peak_rss())
        return [mem.resident for mem in model.ranks()]

    def speaker(self, rank: int) -> Callable[[str], None]:
        """The caller's `say` on `rank`, silent on every other rank."""
        return self.output if self.comm.rank == rank else _silent


def prepare_run(cfg: dict, run_path: Path, comm: Comm, say: Callable[[str], None] = print,
                resume: str | None = None, *, coordinator: bool = False, parameters_only: bool = False,
                check: Callable[[dict], None] | None = None) -> RunContext:
    """Everything checked and agreed before the run commits (see the module docstring).
    `coordinator`: the layout has one, and it is the root; `parameters_only`: a resumed
    checkpoint gives only its parameters (its state is dropped, the run directory is new)."""
    # The structure: each role allocates its own part. A Python model that cannot be made
    # is one agreed error (the same factory fails the same way on every rank).
    network = build_model(cfg["model"], allocate=False, threads=cfg["train"]["threads"])
    layout = layout_for(cfg["train"], network.n_params, coordinator=coordinator)
    # Same verdicts on every rank, before any collective: the partition plan (a P the model
    # cannot be split into) and the world size.
    plan = plan_for(cfg["train"], network)
    layout.check_world(comm.size)
    check_rank_memory(cfg, network, layout, plan)
    root = layout.coordinator_rank if coordinator else 0
    data_info = agree(comm, lambda: prepare_and_check_data(cfg, network), AGREED_ERRORS, root=root)
    resumed = resume_verified(comm, resume, Path(run_path), network, layout, root, say, parameters_only)
    if check is not None:
        check(data_info)
    made: list[RunDirectory] = []  # only the root makes the run directory and logs progress
    agree(comm, lambda: made.append(make_run_directory(cfg, run_path, layout,
                                                       resume is not None and not parameters_only, root)),
          AGREED_ERRORS, root=root)
    return RunContext(cfg=cfg, network=network, layout=layout, plan=plan, comm=comm, root=root,
                      run_path=Path(run_path), run_dir=made[0] if made else None,
                      say=say if comm.rank == root else _silent, resumed=resumed, data_info=data_info,
                      output=say)


def run_committed(ctx: RunContext, body: Callable[[RunContext], T]) -> T | None:
    """Run `body(ctx)` on every rank, committed: with the Topology, the BLAS thread limit and
    a StopRequest; an error other than DivergedError ends the whole job."""
    try:
        ctx.topo = Topology(ctx.layout, ctx.comm)
        with threadpool_limits(limits=ctx.tcfg["threads"], user_api="blas"), StopRequest() as stop:
            ctx.stop = stop
            result = body(ctx)
        ctx.topo.free()
        return result
    except DivergedError:  # every rank raises it, after the teardown
        raise
    except BaseException as exc:  # noqa: BLE001 - any failure must not leave peers waiting
        abort_on_error(ctx.comm, exc)
    return None
