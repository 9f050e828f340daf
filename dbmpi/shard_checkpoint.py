"""The shards' half of a checkpoint: shard 0 writes the file, every other shard streams its
slice of each vector to it in canonical order, a chunk at a time, so no rank ever holds a
whole vector. Used by Downpour (over the world) and Sandblaster (over the control
communicator); what goes into the file is dbmpi.checkpoint's business.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from mpi4py import MPI

from dbmpi.checkpoint import CheckpointWriter, checkpoint_name, prune

CHUNK = 1 << 22  # float32 values per message (16 MB)
TAG = 202


class ShardCheckpoints:
    """Collective over the shards of `comm` (shard k is rank `shard_ranks[k]`): each call
    to `write` makes one checkpoint in `directory` and keeps the newest `keep`."""

    def __init__(self, comm: MPI.Intracomm, shard_ranks: list[int], shard_ranges: list[tuple[int, int]],
                 tensors, directory: Path, keep: int):
        self.comm = comm
        self.shard_ranks = list(shard_ranks)
        self.shard_ranges = list(shard_ranges)
        self.index = self.shard_ranks.index(comm.rank)
        self.tensors = tensors
        self.directory = Path(directory)
        self.keep = keep
        self.written: list[str] = []

    def write(self, vectors: list[tuple[str, np.ndarray]], *, step: int = 0, algorithm: str = "",
              config_text: str = "", layout: dict | None = None, state: dict | None = None) -> Path | None:
        """`vectors`: (name in the file, this shard's slice), the same names in the same order
        on every shard. Only shard 0's keyword arguments are used; it returns the path."""
        writer = self.shard_ranks[0]
        if self.index != 0:
            for _, values in vectors:
                for lo in range(0, values.size, CHUNK):
                    self.comm.Send(values[lo:lo + CHUNK], dest=writer, tag=TAG)
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / checkpoint_name(step)
        with CheckpointWriter(path, self.tensors, algorithm=algorithm, step=step, config_text=config_text,
                              layout=layout or {}, state=state) as out:
            for name, mine in vectors:
                stream = out.vector(name)
                stream.write(0, mine)
                for k in range(1, len(self.shard_ranks)):
                    lo, hi = self.shard_ranges[k]
                    buf = np.empty(min(CHUNK, hi - lo), np.float32)
                    for start in range(lo, hi, CHUNK):
                        piece = buf[:min(CHUNK, hi - start)]
                        self.comm.Recv(piece, source=self.shard_ranks[k], tag=TAG)
                        stream.write(start, piece)
                stream.finish()
            out.commit()
        prune(self.directory, self.keep)
        self.written.append(path.name)
        return path


__all__ = ["ShardCheckpoints"]
