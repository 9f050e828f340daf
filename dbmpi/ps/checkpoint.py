"""The shards' half of a checkpoint: every shard writes and hashes its own slice file (its
range of every vector) at the same time, sends shard 0 the file's record (name, range,
checksums), and shard 0 writes the small top-level file that joins them and renames it into
place (dbmpi.io.checkpoint, format 2). No rank writes or holds more than its slices. Used by
Downpour (over the world; its waits keep serving pushes and heartbeats while a checkpoint is
written: ServingProgress, dbmpi.runtime.failover) and Sandblaster (over the control
communicator). ShardCheckpointer is Downpour's shard side: the lead's state and shard 0's
orders to the other shards (Tag.CKPT_STATE, CKPT_ORDER, CKPT_LAST), one record per checkpoint.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from mpi4py import MPI

from dbmpi import config as configuration
from dbmpi.io.checkpoint import checkpoint_name, prune, write_checkpoint, write_slice
from dbmpi.ps.store import SERVE_PAUSE_S
from dbmpi.runtime.comm import Tag, receive, send
from dbmpi.runtime.poll import poll

if TYPE_CHECKING:
    from dbmpi.ps.shard import Shard
    from dbmpi.runtime.failover import Liveness


class BlockingProgress:
    """How a checkpoint waits by default: MPI's own blocking waits, polls with
    dbmpi.runtime.poll's back-off, local work inline."""

    def complete(self, request: MPI.Request) -> None:
        request.Wait()

    def wait(self, done) -> None:
        poll(done)

    def run(self, work):
        """Do a piece of local work (no MPI: a slice file written, the top-level file);
        returns its result."""
        return work()


class ServingProgress:
    """How a Downpour shard waits during a checkpoint: it keeps serving. Every piece of
    local work runs in a helper thread while this one applies the pushes that arrive
    (h5py holds the GIL for one call at a time, fsync releases it), and every transfer is
    polled with serving in between, so a checkpoint never stops a shard's updates for
    longer than one such call. Heartbeats go on (dbmpi.runtime.failover.Liveness). `begin()` starts
    a measurement; `stall_s` is then the longest stretch without a chance to serve."""

    def __init__(self, liveness, serve, low: float = 5e-5, high: float = SERVE_PAUSE_S):
        self.liveness, self.serve = liveness, serve
        self.low, self.high = low, high
        self.last = time.perf_counter()
        self.stall_s = 0.0
        self.pool: ThreadPoolExecutor | None = None

    def begin(self) -> None:
        self.last, self.stall_s = time.perf_counter(), 0.0

    def serve_now(self) -> None:
        now = time.perf_counter()
        self.stall_s = max(self.stall_s, now - self.last)
        self.serve()
        self.last = time.perf_counter()

    def wait(self, done) -> None:
        """Poll `done()` politely (dbmpi.runtime.failover's back-off and heartbeats), serving between polls."""
        def served_and_done() -> bool:
            self.serve_now()
            return done()

        self.liveness.wait(served_and_done, low=self.low, high=self.high)

    def complete(self, request: MPI.Request) -> None:
        self.wait(request.Test)

    def run(self, work):
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbmpi-checkpoint")
        future = self.pool.submit(work)
        with self.liveness.busy():
            self.wait(future.done)
        return future.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None


class SliceLost(RuntimeError):
    """Shard `shard` failed before its slice file's record reached shard 0 (for example, it
    died while writing its slice)."""

    def __init__(self, shard: int, error: MPI.Exception):
        self.shard, self.error = shard, error
        self.what = f"failed while writing its slice ({error.Get_error_string().splitlines()[0]})"
        super().__init__(f"shard {shard} {self.what}")


class ShardCheckpoints:
    """Collective over the shards of `comm` (shard k is rank `shard_ranks[k]`): each call
    to `write` makes one checkpoint in `directory` and keeps the newest `keep`.

    `progress` says how to wait and what to keep doing meanwhile: `complete(request)`,
    `wait(done)` and `run(work)` (local work: the slice file, the top-level file).
    Sandblaster uses BlockingProgress, the default; Downpour's shards pass ServingProgress,
    which keeps applying pushes meanwhile."""

    def __init__(self, comm: MPI.Intracomm, shard_ranks: list[int], shard_ranges: list[tuple[int, int]],
                 tensors, directory: Path, keep: int, progress=None):
        self.comm = comm
        self.shard_ranks = list(shard_ranks)
        self.shard_ranges = list(shard_ranges)
        self.index = self.shard_ranks.index(comm.rank)
        self.tensors = tensors
        self.directory = Path(directory)
        self.keep = keep
        self.progress = progress or BlockingProgress()
        self.written: list[str] = []

    def write(self, vectors: list[tuple[str, np.ndarray]], *, step: int = 0, algorithm: str = "",
              config_text: str = "", layout: dict | None = None, state: dict | None = None,
              version: int | None = None, updates: int | None = None) -> Path | None:
        """`vectors`: (name in the file, this shard's slice), the same names in the same order
        on every shard; `step` the same on every shard. Every shard writes its slice file;
        shard 0 then writes the top-level file with its keyword arguments. `version` (the
        update count of the shard's snapshot) is given by every shard or none: shard 0
        records the list as the state's `shard_versions`; likewise `updates` (the updates its
        optimizer had applied at the snapshot, since the first run: Adam's t) as
        `optimizer_updates`. Shard 0 returns the path. Raises
        SliceLost on shard 0 if another shard fails before its slice is written."""
        lo, _ = self.shard_ranges[self.index]
        record = self.progress.run(partial(write_slice, self.directory, step, self.index, len(self.shard_ranks),
                                           lo, vectors))
        record["version"], record["updates"] = version, updates
        if self.index != 0:
            send(self.comm, record, self.shard_ranks[0], Tag.SLICE, self.progress.wait)
            return None
        records = [record] + [self._receive_record(k) for k in range(1, len(self.shard_ranks))]
        versions = [r.pop("version") for r in records]
        updates_all = [r.pop("updates") for r in records]
        if version is not None:
            state = dict(state or {}, shard_versions=versions)
        if updates is not None:
            state = dict(state or {}, optimizer_updates=updates_all)
        path = self.directory / checkpoint_name(step)
        self.progress.run(partial(write_checkpoint, path, self.tensors, records, algorithm=algorithm, step=step,
                                  config_text=config_text, layout=layout or {}, state=state))
        self.progress.run(partial(prune, self.directory, self.keep))
        self.written.append(path.name)
        return path

    def _receive_record(self, k: int) -> dict:
        try:
            return receive(self.comm, self.shard_ranks[k], Tag.SLICE, self.progress.wait)
        except MPI.Exception as exc:
            raise SliceLost(k, exc) from exc


class ShardCheckpointer:
    """Downpour shards' half of a checkpoint: every shard writes its slice file, shard 0 the
    top-level file that joins them, so no rank writes or holds the whole model. The lead
    asks shard 0 only (its state, then shard 0's CHECKPOINTS counter); shard 0 orders the
    other shards point to point, so a lead dying halfway through asking cannot leave the
    shards disagreeing on which checkpoint they are at.

    Each shard records a snapshot of its slices (a copy: memory for one more slice per
    vector) and keeps applying pushes while the snapshot is written: every wait serves
    (dbmpi.ps.checkpoint.ServingProgress) and keeps the heartbeat going
    (dbmpi.runtime.failover). Each checkpoint leaves a record: the shard's update count at the
    snapshot, the updates applied while it was written, the longest stall of updates and
    the most pushes one update merged meanwhile."""

    def __init__(self, cfg, network, layout, topo, shard: Shard, run_path: Path, liveness: Liveness):
        self.cfg, self.layout, self.topo, self.shard, self.liveness = cfg, layout, topo, shard, liveness
        self.progress = ServingProgress(liveness, shard.apply_pending)
        self.files = ShardCheckpoints(topo.world, layout.shard_ranks, layout.shard_ranges, network.tensors,
                                      run_path / "checkpoints", cfg["train"]["checkpoint_keep"], self.progress)
        self.last: Path | None = None  # the newest checkpoint this shard 0 wrote
        self.records: list[dict] = []  # one per checkpoint this shard took part in

    @property
    def written(self) -> list[str]:
        return self.files.written

    def _take(self, step: int, write: Callable[[list, int, int], None]) -> None:
        """Snapshot this shard's slices, then `write(snapshot, version, updates)` while serving."""
        began, shard = time.perf_counter(), self.shard
        self.progress.begin()
        shard.max_merged_since = 0
        version = shard.version()
        write(shard.snapshot(), version, shard.optimizer.updates)
        self.progress.serve_now()  # closes the stall measurement
        self.records.append({"step": step, "version": version, "updates_during": shard.version() - version,
                             "stall_s": round(self.progress.stall_s, 4),
                             "duration_s": round(time.perf_counter() - began, 4),
                             "max_merged_during": shard.max_merged_since})

    def _stream(self, vectors, version: int, updates: int, step: int) -> None:
        """Shards but 0: write this shard's snapshot as its slice file of checkpoint `step`."""
        self.files.write(vectors, step=step, version=version, updates=updates)

    def obey(self) -> None:
        """Shards but 0, while serving: write a snapshot's slice file for every order shard 0 gave."""
        while self.topo.world.iprobe(source=self.layout.shard_rank(0), tag=Tag.CKPT_ORDER):
            step = receive(self.topo.world, self.layout.shard_rank(0), Tag.CKPT_ORDER, self.progress.wait)
            self._take(step, partial(self._stream, step=step))

    def last_order(self) -> bool:
        """Shards but 0, after serving: obey orders until the last one; True if it asks for
        a final checkpoint (then written)."""
        shard0, got = self.layout.shard_rank(0), []

        def last() -> bool:
            self.obey()
            if self.topo.world.iprobe(source=shard0, tag=Tag.CKPT_LAST):
                got.append(receive(self.topo.world, shard0, Tag.CKPT_LAST, self.liveness.wait))
            return bool(got)

        self.liveness.wait(last)
        if got[0] is not False:
            self._take(got[0], partial(self._stream, step=got[0]))
        return got[0] is not False

    def __call__(self, state: dict | None = None) -> None:
        """Shard 0: one checkpoint, written with `state` (the final one: the other shards
        had their last order), or, for a periodic one, with the state the acting lead sent
        (Tag.CKPT_STATE) before it asked; the other shards are ordered to write their slices."""
        world = self.topo.world
        if state is None:
            state = receive(world, MPI.ANY_SOURCE, Tag.CKPT_STATE, self.progress.wait)
            for k in range(1, self.layout.n_shards):
                send(world, state["step"], self.layout.shard_rank(k), Tag.CKPT_ORDER, self.progress.wait)

        def write(vectors, version, updates) -> None:
            try:
                self.last = self.files.write(vectors, step=state["step"], algorithm="downpour",
                                             config_text=configuration.dumps(self.cfg),
                                             layout=self.layout.to_dict(), state=state, version=version,
                                             updates=updates)
            except SliceLost as lost:  # e.g. the sender died mid-transfer
                self.liveness.shard_lost(lost.shard, lost.what)

        self._take(state["step"], write)
        self.records[-1]["file"] = self.last.name if self.last is not None else None
        self.records[-1]["time"] = time.time()


__all__ = ["BlockingProgress", "ServingProgress", "ShardCheckpointer", "ShardCheckpoints", "SliceLost"]
