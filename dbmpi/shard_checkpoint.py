"""The shards' half of a checkpoint: shard 0 writes the file, every other shard streams its
slice of each vector to it in canonical order, a chunk at a time, so no rank ever holds a
whole vector. Used by Downpour (over the world, its waits polled so heartbeats go on while
a checkpoint is written: dbmpi.failover) and Sandblaster (over the control communicator);
what goes into the file is dbmpi.checkpoint's business.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
from mpi4py import MPI

from dbmpi.checkpoint import CheckpointWriter, checkpoint_name, prune

CHUNK = 1 << 22  # float32 values per message (16 MB)
TAG = 202


class BlockingProgress:
    """How a checkpoint waits by default: MPI's own blocking waits, nothing else to do."""

    def complete(self, request: MPI.Request) -> None:
        request.Wait()

    def busy(self):
        return nullcontext()

    def beat(self) -> None:
        pass


class SliceLost(RuntimeError):
    """Shard `shard` failed while it sent its slice (for example, it died mid-transfer)."""

    def __init__(self, shard: int, error: MPI.Exception):
        self.shard, self.error = shard, error
        self.what = f"failed while sending its slice ({error.Get_error_string().splitlines()[0]})"
        super().__init__(f"shard {shard} {self.what}")


class ShardCheckpoints:
    """Collective over the shards of `comm` (shard k is rank `shard_ranks[k]`): each call
    to `write` makes one checkpoint in `directory` and keeps the newest `keep`.

    `progress` says how to wait and what to keep doing meanwhile: `complete(request)`,
    `busy()` (a context around long local work) and `beat()` (BlockingProgress by default;
    Downpour passes its dbmpi.failover.Liveness)."""

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
              config_text: str = "", layout: dict | None = None, state: dict | None = None) -> Path | None:
        """`vectors`: (name in the file, this shard's slice), the same names in the same order
        on every shard. Only shard 0's keyword arguments are used; it returns the path. Raises
        SliceLost on shard 0 if another shard fails mid-transfer."""
        if self.index != 0:
            self._send(vectors)
            return None
        progress = self.progress
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / checkpoint_name(step)
        with CheckpointWriter(path, self.tensors, algorithm=algorithm, step=step, config_text=config_text,
                              layout=layout or {}, state=state) as out:
            for name, mine in vectors:
                stream = out.vector(name)
                for lo in range(0, mine.size, CHUNK):  # shard 0's range starts at 0
                    with progress.busy():
                        stream.write(lo, mine[lo:lo + CHUNK])
                    progress.beat()
                for k in range(1, len(self.shard_ranks)):
                    self._receive_slice(k, stream)
                with progress.busy():
                    stream.finish()
            with progress.busy():
                out.commit()
        prune(self.directory, self.keep)
        self.written.append(path.name)
        return path

    def _send(self, vectors) -> None:
        writer = self.shard_ranks[0]
        for _, values in vectors:
            for lo in range(0, values.size, CHUNK):
                self.progress.complete(self.comm.Isend(values[lo:lo + CHUNK], dest=writer, tag=TAG))

    def _receive_slice(self, k: int, stream) -> None:
        lo, hi = self.shard_ranges[k]
        buf = np.empty(min(CHUNK, hi - lo), np.float32)
        for start in range(lo, hi, CHUNK):
            piece = buf[:min(CHUNK, hi - start)]
            try:
                self.progress.complete(self.comm.Irecv(piece, source=self.shard_ranks[k], tag=TAG))
            except MPI.Exception as exc:
                raise SliceLost(k, exc) from exc
            with self.progress.busy():
                stream.write(start, piece)


__all__ = ["BlockingProgress", "ShardCheckpoints", "SliceLost"]
