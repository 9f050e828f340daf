"""HDF5 checkpoints: one self-describing file per checkpoint, written atomically, streamed.

Layout of a file (see docs/CHECKPOINT.md):

    /                     attrs: format, format_version, dbmpi_version, created_utc,
                          algorithm, step, n_params, config (resolved TOML), layout (JSON),
                          state (JSON: counters, data cursors, RNG states, L-BFGS scalars)
    /params/<layer>/<t>   float32, the tensor's logical shape (e.g. dense0/W (units, inputs))
    /<vector>/<layer>/<t> other canonical vectors, same shapes: Adagrad accumulators
                          (/adagrad), L-BFGS vectors (/lbfgs/g, /lbfgs/s0, ...)

Every tensor dataset carries `sha256` (of its float32 bytes, C order) and `offset` (its place
in the canonical vector). Vectors arrive as canonical ranges in increasing order (from the
shards, one piece at a time), so no process holds a whole vector: each piece is written
into the tensors it overlaps and hashed as it goes. The file is written under a temporary
name beside its final one and renamed only when complete (dbmpi.io.atomic), so a crash leaves
the previous checkpoint intact.

MPI-free; dbmpi.algorithms.downpour and dbmpi.algorithms.sandblaster decide who sends which pieces.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

import h5py
import numpy as np

from dbmpi import __version__
from dbmpi.io.atomic import atomic_path

FORMAT = "dbmpi-checkpoint"
FORMAT_VERSION = 1
NAME = re.compile(r"ckpt-(\d{9})\.h5$")
TEMPORARY = re.compile(r"\.ckpt-\d{9}\.h5\.tmp-\d+$")  # dbmpi.io.atomic's name while writing


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:09d}.h5"


def _tensor_path(vector: str, tensor_name: str) -> str:
    layer, tname = tensor_name.split(".", 1)
    return f"/{vector}/{layer}/{tname}"


class CheckpointWriter:
    """Write one checkpoint: attributes, then vectors piece by piece; `commit` publishes it.

    Use as a context manager: leaving the block with an error removes the temporary file
    and leaves any earlier checkpoint as it was.
    """

    def __init__(self, path: str | Path, tensors, *, algorithm: str, step: int, config_text: str,
                 layout: dict, state: dict | None = None):
        self.path = Path(path)
        self.tensors = list(tensors)  # dbmpi.model.network.Tensor, canonical order
        self.n_params = sum(t.size for t in self.tensors)
        self._stack = ExitStack()
        self._tmp = self._stack.enter_context(atomic_path(self.path))
        self.file = h5py.File(self._tmp, "w", libver=("v108", "latest"))
        attrs = self.file.attrs
        attrs["format"] = FORMAT
        attrs["format_version"] = FORMAT_VERSION
        attrs["dbmpi_version"] = __version__
        attrs["created_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        attrs["algorithm"] = algorithm
        attrs["step"] = int(step)
        attrs["n_params"] = self.n_params
        attrs["config"] = config_text
        attrs["layout"] = json.dumps(layout, sort_keys=True)
        attrs["state"] = json.dumps(state or {}, sort_keys=True)
        self._open: dict[str, _VectorStream] = {}

    def set_state(self, state: dict) -> None:
        self.file.attrs["state"] = json.dumps(state, sort_keys=True)

    def vector(self, name: str) -> _VectorStream:
        """The stream of canonical vector `name` ("params", "adagrad", "lbfgs/g", ...)."""
        if name not in self._open:
            self._open[name] = _VectorStream(self.file, name, self.tensors)
        return self._open[name]

    def write_vector(self, name: str, pieces: Iterable[tuple[int, np.ndarray]]) -> None:
        """Write a whole vector from (canonical start, values) pieces in increasing order."""
        stream = self.vector(name)
        for start, values in pieces:
            stream.write(start, values)
        stream.finish()

    def commit(self) -> Path:
        for stream in self._open.values():
            stream.finish()
        self.file.attrs["complete"] = True
        self.file.close()
        self._stack.close()  # fsync, rename over the final name, fsync the directory
        return self.path

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is not None:
            try:
                self.file.close()
            finally:
                self._stack.__exit__(kind, exc, tb)
        return False


class _VectorStream:
    """Writes consecutive pieces of one canonical vector into its tensor datasets."""

    def __init__(self, file: h5py.File, name: str, tensors):
        self.name = name
        self.tensors = tensors
        self.datasets = []
        for t in tensors:
            ds = file.create_dataset(_tensor_path(name, t.name), shape=t.shape, dtype=np.float32)
            ds.attrs["offset"] = t.offset
            self.datasets.append(ds)
        self.hashes = [hashlib.sha256() for _ in tensors]
        self.position = 0
        self.total = sum(t.size for t in tensors)
        self.finished = False

    def write(self, start: int, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        if start != self.position:
            raise ValueError(f"{self.name}: piece at {start}, expected the next at {self.position}")
        stop = start + values.size
        if stop > self.total:
            raise ValueError(f"{self.name}: piece [{start}, {stop}) beyond {self.total} parameters")
        for i, t in enumerate(self.tensors):
            a, b = max(start, t.offset), min(stop, t.offset + t.size)
            if a >= b:
                continue
            chunk = values[a - start:b - start]
            _write_flat(self.datasets[i], a - t.offset, chunk)
            self.hashes[i].update(chunk.tobytes())
        self.position = stop

    def finish(self) -> None:
        if self.finished:
            return
        if self.position != self.total:
            raise ValueError(f"{self.name}: only {self.position} of {self.total} values were written")
        for ds, h in zip(self.datasets, self.hashes, strict=True):
            ds.attrs["sha256"] = h.hexdigest()
        self.finished = True


def _write_flat(ds: h5py.Dataset, start: int, values: np.ndarray) -> None:
    """Write `values` at flat (C-order) position `start` of dataset `ds`."""
    shape = ds.shape
    if len(shape) == 1:
        ds[start:start + values.size] = values
        return
    row = math.prod(shape[1:])
    flat_rows = ds.shape[0]
    view_shape = shape[1:]
    pos, end = start, start + values.size
    offset = 0
    while pos < end:
        r, c = divmod(pos, row)
        if c == 0 and end - pos >= row:  # whole rows at once
            n_rows = min((end - pos) // row, flat_rows - r)
            ds[r:r + n_rows] = values[offset:offset + n_rows * row].reshape((n_rows,) + view_shape)
            step = n_rows * row
        else:  # part of one row: write it through a read-modify-write of that row
            step = min(row - c, end - pos)
            current = ds[r].reshape(-1)
            current[c:c + step] = values[offset:offset + step]
            ds[r] = current.reshape(view_shape)
        pos += step
        offset += step


# Reading ----------------------------------------------------------------------------------
class Checkpoint:
    """An open, checked checkpoint file: attributes, vectors, ranges of vectors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: checkpoint not found")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as exc:
            raise CheckpointError(f"{self.path}: not a readable HDF5 file (truncated or corrupt?): {exc}") from None
        attrs = self.file.attrs
        if attrs.get("format") != FORMAT:
            self.close()
            raise CheckpointError(f"{self.path}: not a dbmpi checkpoint (format attribute "
                                  f"{attrs.get('format')!r})")
        version = attrs.get("format_version", -1)
        if not isinstance(version, (int, np.integer)) or version != FORMAT_VERSION:
            self.close()
            shown = int(version) if isinstance(version, (int, np.integer)) else repr(version)
            raise CheckpointError(f"{self.path}: checkpoint format version {shown}; this dbmpi "
                                  f"reads version {FORMAT_VERSION}")
        if not attrs.get("complete", False):
            self.close()
            raise CheckpointError(f"{self.path}: incomplete checkpoint (no 'complete' mark)")
        try:
            self.algorithm = self._attribute("algorithm", str)
            self.step = self._attribute("step", int, "an integer")
            self.n_params = self._attribute("n_params", int, "an integer")
            self.config_text = self._attribute("config", str)
            self.layout = self._attribute("layout", _json_object, "a JSON object")
            self.state = self._attribute("state", _json_object, "a JSON object")
            self.dbmpi_version = self._attribute("dbmpi_version", str)
            self.created_utc = self._attribute("created_utc", str)
        except CheckpointError:
            self.close()
            raise

    def _attribute(self, name: str, convert, expected: str = "text"):
        """Root attribute `name` through `convert`; a damaged file gets one CheckpointError
        naming the attribute, not a KeyError or JSON traceback."""
        if name not in self.file.attrs:
            raise CheckpointError(f"{self.path}: damaged checkpoint: no '{name}' attribute")
        try:
            return convert(self.file.attrs[name])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: damaged checkpoint: attribute '{name}' is not "
                                  f"{expected} ({exc})") from None

    def vectors(self) -> list[str]:
        """Names of the canonical vectors stored ("params", "adagrad", "lbfgs/g", ...)."""
        names = []

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and "offset" in obj.attrs:
                vector = name.rsplit("/", 2)[0]
                if vector not in names:
                    names.append(vector)
        self.file.visititems(visit)
        return names

    def tensor_datasets(self, vector: str = "params") -> list[tuple[str, h5py.Dataset]]:
        """(layer.tensor name, dataset) of a vector, in canonical order."""
        if vector not in self.file or not isinstance(self.file[vector], h5py.Group):
            raise CheckpointError(f"{self.path}: no vector /{vector}")
        out = []
        for layer_name, group in self.file[vector].items():
            if not isinstance(group, h5py.Group):
                raise CheckpointError(f"{self.path}: damaged checkpoint: /{vector}/{layer_name} is not a layer group")
            for tname, ds in group.items():
                out.append((f"{layer_name}.{tname}", ds, self._offset(ds)))
        return [(name, ds) for name, ds, _ in sorted(out, key=lambda item: item[2])]

    def _offset(self, ds) -> int:
        """A tensor dataset's place in the canonical vector (CheckpointError if it has none)."""
        if not isinstance(ds, h5py.Dataset):
            raise CheckpointError(f"{self.path}: damaged checkpoint: {ds.name} is not a tensor dataset")
        try:
            return int(ds.attrs["offset"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: damaged checkpoint: tensor {ds.name} has no valid "
                                  "'offset' attribute") from None

    def check_network(self, network) -> None:
        """Raise CheckpointError unless the checkpoint's tensors are the network's."""
        stored = {name: (tuple(ds.shape), int(ds.attrs["offset"])) for name, ds in self.tensor_datasets()}
        expected = {t.name: (tuple(t.shape), t.offset) for t in network.tensors}
        if stored != expected:
            missing = sorted(set(expected) - set(stored))
            extra = sorted(set(stored) - set(expected))
            wrong = sorted(n for n in set(stored) & set(expected) if stored[n] != expected[n])
            parts = []
            if missing:
                parts.append(f"missing tensors {', '.join(missing)}")
            if extra:
                parts.append(f"unexpected tensors {', '.join(extra)}")
            shapes = [n for n in wrong if stored[n][0] != expected[n][0]]
            moved = [n for n in wrong if stored[n][0] == expected[n][0]]
            if shapes:
                parts.append("different shapes: " + ", ".join(
                    f"{n} {stored[n][0]} in the checkpoint, {expected[n][0]} in the model" for n in shapes))
            if moved:
                parts.append("different places: " + ", ".join(
                    f"{n} at {stored[n][1]} in the checkpoint, {expected[n][1]} in the model" for n in moved))
            raise CheckpointError(f"{self.path}: does not match the model: {'; '.join(parts)}")

    def read_range(self, vector: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Canonical values [start, stop) of a vector, reading only the rows they touch."""
        out = np.empty(stop - start, np.float32) if out is None else out
        for _, ds in self.tensor_datasets(vector):
            offset, size = int(ds.attrs["offset"]), ds.size
            a, b = max(start, offset), min(stop, offset + size)
            if a >= b:
                continue
            out[a - start:b - start] = _read_flat(ds, a - offset, b - a)
        return out

    def verify(self) -> list[str]:
        """Problems found by re-hashing every tensor of every vector (empty: all good)."""
        problems = []
        for vector in self.vectors():
            total = 0
            for name, ds in self.tensor_datasets(vector):
                digest = hashlib.sha256(np.ascontiguousarray(ds[()], dtype=np.float32).tobytes()).hexdigest()
                if digest != ds.attrs.get("sha256"):
                    problems.append(f"/{vector}/{name.replace('.', '/')}: checksum mismatch")
                total += ds.size
            if total != self.n_params:
                missing = sorted(self._model_tensors() - {name for name, _ in self.tensor_datasets(vector)})
                named = f"missing tensor(s) {', '.join(missing)}: " if missing else ""
                problems.append(f"/{vector}: {named}{total} values, expected {self.n_params}")
        return problems

    def _model_tensors(self) -> set[str]:
        """Names of the tensors of the model in the checkpoint's config (empty if it has no
        usable [model]): what names a missing tensor."""
        from dbmpi import config as configuration
        from dbmpi.model import Network

        try:
            model = configuration.parse_toml(self.config_text).get("model")
            model = configuration.validate({"model": model}, require_train=False)["model"]
            return {t.name for t in Network(model, allocate=False).tensors}
        except (configuration.ConfigError, TypeError, KeyError):
            return set()

    def close(self) -> None:
        if getattr(self, "file", None) is not None:
            self.file.close()
            self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _json_object(value) -> dict:
    """A JSON-object attribute (layout, state) as a dict."""
    decoded = json.loads(value)
    if not isinstance(decoded, dict):
        raise ValueError(f"a {type(decoded).__name__}")
    return decoded


def _read_flat(ds: h5py.Dataset, start: int, count: int) -> np.ndarray:
    if ds.ndim == 1:
        return ds[start:start + count]
    row = math.prod(ds.shape[1:])
    r0, r1 = start // row, (start + count - 1) // row + 1
    block = ds[r0:r1].reshape(-1)
    return block[start - r0 * row:start - r0 * row + count]


def open_checkpoint(path: str | Path, verify: bool = True) -> Checkpoint:
    """Open a checkpoint; with verify, every checksum is checked (CheckpointError if not)."""
    ckpt = Checkpoint(path)
    if verify:
        problems = ckpt.verify()
        if problems:
            ckpt.close()
            raise CheckpointError(f"{ckpt.path}: corrupt: {'; '.join(problems[:5])}")
    return ckpt


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files in a directory, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def newest_valid(directory: str | Path) -> Path:
    """The newest checkpoint in `directory` that opens and verifies (for --resume auto)."""
    problems = []
    for path in reversed(list_checkpoints(directory)):
        try:
            open_checkpoint(path).close()
            return path
        except CheckpointError as exc:
            problems.append(str(exc))
    detail = f" ({'; '.join(problems)})" if problems else ""
    raise CheckpointError(f"{directory}: no valid checkpoint to resume from{detail}")


def stale_temporaries(directory: str | Path) -> list[Path]:
    """Half-written checkpoints (`.ckpt-*.h5.tmp-PID`) left by a writer that died mid-write,
    i.e. by any process but this one: a run has one checkpoint writer at a time."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    mine = f".tmp-{os.getpid()}"
    return sorted(p for p in directory.iterdir() if TEMPORARY.match(p.name) and not p.name.endswith(mine))


def prune(directory: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints, and stale temporaries; returns the
    deleted paths."""
    paths = list_checkpoints(directory)
    doomed = (paths[:-keep] if keep > 0 else paths) + stale_temporaries(directory)
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


__all__ = ["Checkpoint", "CheckpointError", "CheckpointWriter", "FORMAT", "FORMAT_VERSION",
           "checkpoint_name", "list_checkpoints", "newest_valid", "open_checkpoint", "prune",
           "stale_temporaries"]
