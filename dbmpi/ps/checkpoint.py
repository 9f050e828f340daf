"""The shards' half of a checkpoint: shard 0 writes the file, every other shard streams its
slice of each vector to it in canonical order, a chunk at a time, so no rank ever holds a
whole vector. Used by Downpour (over the world; its waits keep serving pushes and
heartbeats while a checkpoint is written: ServingProgress, dbmpi.runtime.failover) and Sandblaster
(over the control communicator); what goes into the file is dbmpi.io.checkpoint's business.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from mpi4py import MPI

from dbmpi.io.checkpoint import CheckpointWriter, checkpoint_name, prune
from dbmpi.runtime.comm import Tag

CHUNK = 1 << 22  # float32 values per message (16 MB)


class BlockingProgress:
    """How a checkpoint waits by default: MPI's own blocking waits, local work inline."""

    def complete(self, request: MPI.Request) -> None:
        request.Wait()

    def run(self, work):
        """Do a piece of local work (no MPI: a file created, a chunk written, the final
        fsync); returns its result."""
        return work()


class ServingProgress:
    """How a Downpour shard waits during a checkpoint: it keeps serving. Every piece of
    local work runs in a helper thread while this one applies the pushes that arrive
    (h5py holds the GIL for one call at a time, fsync releases it), and every transfer is
    polled with serving in between, so a checkpoint never stops a shard's updates for
    longer than one such call. Heartbeats go on (dbmpi.runtime.failover.Liveness). `begin()` starts
    a measurement; `stall_s` is then the longest stretch without a chance to serve."""

    def __init__(self, liveness, serve, low: float = 5e-5, high: float = 2e-3):
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
    """Shard `shard` failed while it sent its slice (for example, it died mid-transfer)."""

    def __init__(self, shard: int, error: MPI.Exception):
        self.shard, self.error = shard, error
        self.what = f"failed while sending its slice ({error.Get_error_string().splitlines()[0]})"
        super().__init__(f"shard {shard} {self.what}")


class ShardCheckpoints:
    """Collective over the shards of `comm` (shard k is rank `shard_ranks[k]`): each call
    to `write` makes one checkpoint in `directory` and keeps the newest `keep`.

    `progress` says how to wait and what to keep doing meanwhile: `complete(request)` and
    `run(work)` (a piece of local work: the file created, a chunk written, the final
    fsync). Sandblaster uses BlockingProgress, the default; Downpour's shards pass
    ServingProgress, which keeps applying pushes meanwhile."""

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
              version: int | None = None) -> Path | None:
        """`vectors`: (name in the file, this shard's slice), the same names in the same order
        on every shard. Only shard 0's keyword arguments are used, but `version` (the update
        count of the shard's snapshot) is given by every shard or none: shard 0 records the
        list as the state's `shard_versions`. Shard 0 returns the path. Raises SliceLost on
        shard 0 if another shard fails mid-transfer."""
        if self.index != 0:
            if version is not None:
                self.progress.complete(self.comm.Isend(np.array([version], np.int64), dest=self.shard_ranks[0],
                                                       tag=Tag.SLICE_VERSION))
            self._send(vectors)
            return None
        progress = self.progress
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / checkpoint_name(step)
        if version is not None:
            state = dict(state or {}, shard_versions=[version] + [self._receive_version(k)
                                                                  for k in range(1, len(self.shard_ranks))])
        make = partial(CheckpointWriter, path, self.tensors, algorithm=algorithm, step=step,
                       config_text=config_text, layout=layout or {}, state=state)
        with progress.run(make) as out:
            for name, mine in vectors:
                stream = progress.run(partial(out.vector, name))
                for lo in range(0, mine.size, CHUNK):  # shard 0's range starts at 0
                    progress.run(partial(stream.write, lo, mine[lo:lo + CHUNK]))
                for k in range(1, len(self.shard_ranks)):
                    self._receive_slice(k, stream)
                progress.run(stream.finish)
            progress.run(out.commit)
        prune(self.directory, self.keep)
        self.written.append(path.name)
        return path

    def _send(self, vectors) -> None:
        writer = self.shard_ranks[0]
        for _, values in vectors:
            for lo in range(0, values.size, CHUNK):
                self.progress.complete(self.comm.Isend(values[lo:lo + CHUNK], dest=writer, tag=Tag.SLICE))

    def _receive_version(self, k: int) -> int:
        got = np.zeros(1, np.int64)
        try:
            self.progress.complete(self.comm.Irecv(got, source=self.shard_ranks[k], tag=Tag.SLICE_VERSION))
        except MPI.Exception as exc:
            raise SliceLost(k, exc) from exc
        return int(got[0])

    def _receive_slice(self, k: int, stream) -> None:
        lo, hi = self.shard_ranges[k]
        buf = np.empty(min(CHUNK, hi - lo), np.float32)
        for start in range(lo, hi, CHUNK):
            piece = buf[:min(CHUNK, hi - start)]
            try:
                self.progress.complete(self.comm.Irecv(piece, source=self.shard_ranks[k], tag=Tag.SLICE))
            except MPI.Exception as exc:
                raise SliceLost(k, exc) from exc
            self.progress.run(partial(stream.write, start, piece))


__all__ = ["BlockingProgress", "ServingProgress", "ShardCheckpoints", "SliceLost"]
