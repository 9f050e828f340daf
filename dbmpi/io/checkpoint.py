"""HDF5 checkpoints: a small top-level file joining one slice file per shard, written in
parallel and published atomically; the older single-file format is still read.

Format 2 (what the shards write, docs/CHECKPOINT.md):

    checkpoints/ckpt-<step>.h5              the top-level file: attrs format, format_version,
                                            dbmpi_version, created_utc, algorithm, step,
                                            n_params, config (resolved TOML), layout (JSON),
                                            state (JSON), vectors and slices (JSON: each
                                            slice file, its range and per-vector SHA-256);
                                            /<vector>/<layer>/<t> virtual datasets in the
                                            tensor's logical shape, mapped onto the slices
    checkpoints/ckpt-<step>/slice-<k>-of-<S>-<uid>.h5
                                            shard k's range [lo, hi) of every vector, one flat
                                            float32 dataset per vector (/params, /adagrad/accum)

Each shard writes and hashes its slice file (`write_slice`), then one rank writes the
top-level file (`write_checkpoint`): a tensor's flat range within one slice is mapped as a
few hyperslabs (dbmpi.io.hyperslabs), with source paths relative to the top-level file, so a
moved run directory still opens. The checkpoint exists once the top-level file is renamed
into place (dbmpi.io.atomic); slice files no checkpoint refers to are removed by `prune`.

Format 1 (`CheckpointWriter`, still read): one file holding the tensors themselves, each
with its `sha256` and `offset`.

MPI-free; dbmpi.ps.checkpoint decides who writes what.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import secrets
import time
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

import h5py
import numpy as np

from dbmpi import __version__
from dbmpi.io.atomic import atomic_path
from dbmpi.io.hyperslabs import flat_range_boxes

FORMAT = "dbmpi-checkpoint"
FORMAT_VERSION = 2  # what the shards write: a top-level file joining slice files
SINGLE_FILE_VERSION = 1  # CheckpointWriter's single file, still read
SLICE_FORMAT = "dbmpi-checkpoint-slice"
NAME = re.compile(r"ckpt-(\d{9})\.h5$")
TOP_LEVEL = re.compile(r"ckpt-(\d{9})\.h5(\.diverged)?$")  # files that may refer to slice files
SLICE_DIRECTORY = re.compile(r"ckpt-(\d{9})$")
TEMPORARY = re.compile(r"\.ckpt-\d{9}\.h5\.tmp-\d+$")  # dbmpi.io.atomic's name while writing
READ_CHUNK = 1 << 22  # float32 values hashed per read when verifying a slice


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:09d}.h5"


# The group of tensors whose name has no dot (a PyTorch module's own parameters: "scale").
TOP_GROUP = "_"


def _tensor_path(vector: str, tensor_name: str) -> str:
    """/<vector>/<first part>/<rest>: "dense0.W" -> /params/dense0/W, a torch name
    "features.0.weight" -> /params/features/0.weight, "scale" -> /params/_/scale."""
    layer, _, tname = tensor_name.partition(".")
    return f"/{vector}/{layer}/{tname}" if tname else f"/{vector}/{TOP_GROUP}/{layer}"


def _tensor_name(group: str, dataset: str) -> str:
    """The tensor name of /<vector>/<group>/<dataset> (the inverse of _tensor_path)."""
    return dataset if group == TOP_GROUP else f"{group}.{dataset}"


def slice_directory(step: int) -> str:
    """The directory, beside the top-level file, of a format-2 checkpoint's slice files."""
    return f"ckpt-{step:09d}"


def _root_attributes(attrs, version: int, *, algorithm: str, step: int, n_params: int, config_text: str,
                     layout: dict, state: dict | None) -> None:
    """The attributes every checkpoint's root carries (all but `complete`)."""
    attrs["format"] = FORMAT
    attrs["format_version"] = version
    attrs["dbmpi_version"] = __version__
    attrs["created_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    attrs["algorithm"] = algorithm
    attrs["step"] = int(step)
    attrs["n_params"] = n_params
    attrs["config"] = config_text
    attrs["layout"] = json.dumps(layout, sort_keys=True)
    attrs["state"] = json.dumps(state or {}, sort_keys=True)


def write_slice(directory: str | Path, step: int, shard: int, n_shards: int, lo: int,
                vectors: list[tuple[str, np.ndarray]]) -> dict:
    """Write shard `shard`'s slice file of the checkpoint at `step` in `directory` (the
    checkpoints directory): `vectors` are (name, this shard's values of canonical [lo, lo +
    size)), hashed as they are written. Atomic like every checkpoint file; a fresh name each
    time, so rewriting a step never touches a checkpoint already in place. Returns the record
    the top-level file keeps: file (relative to `directory`), shard, lo, hi, sha256 by vector."""
    hi = lo + (vectors[0][1].size if vectors else 0)
    name = f"{slice_directory(step)}/slice-{shard:05d}-of-{n_shards:05d}-{secrets.token_hex(4)}.h5"
    target = Path(directory) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    digests = {}
    with atomic_path(target) as tmp, h5py.File(tmp, "w", libver=("v110", "latest")) as out:
        out.attrs.update({"format": SLICE_FORMAT, "format_version": FORMAT_VERSION, "step": int(step),
                          "shard": shard, "n_shards": n_shards, "lo": lo, "hi": hi})
        for vector, values in vectors:
            if values.size != hi - lo:
                raise ValueError(f"{vector}: {values.size} values, expected {hi - lo} like the first vector")
            ds = out.create_dataset(vector, shape=(hi - lo,), dtype=np.float32)
            digest = hashlib.sha256()
            for a in range(0, hi - lo, READ_CHUNK):
                chunk = np.ascontiguousarray(values[a:a + READ_CHUNK], dtype=np.float32)
                ds[a:a + chunk.size] = chunk
                digest.update(chunk)
            ds.attrs["sha256"] = digests[vector] = digest.hexdigest()
    return {"file": name, "shard": shard, "lo": lo, "hi": hi, "sha256": digests}


def write_checkpoint(path: str | Path, tensors, slices: list[dict], *, algorithm: str, step: int,
                     config_text: str, layout: dict, state: dict | None = None) -> Path:
    """Write the top-level file joining `slices` (write_slice's records, in shard order,
    covering the canonical vector) and rename it into place: from then on the checkpoint
    exists. Every tensor of every vector becomes a virtual dataset over the slice files."""
    path, tensors = Path(path), list(tensors)
    n_params = sum(t.size for t in tensors)
    if [s["lo"] for s in slices] != [0] + [s["hi"] for s in slices[:-1]] or slices[-1]["hi"] != n_params:
        raise ValueError(f"{path}: the slices {[(s['lo'], s['hi']) for s in slices]} do not cover "
                         f"[0, {n_params})")
    vectors = list(slices[0]["sha256"])
    with atomic_path(path) as tmp, h5py.File(tmp, "w", libver=("v110", "latest")) as out:
        _root_attributes(out.attrs, FORMAT_VERSION, algorithm=algorithm, step=step, n_params=n_params,
                         config_text=config_text, layout=layout, state=state)
        out.attrs["vectors"] = json.dumps(vectors)
        out.attrs["slices"] = json.dumps(slices, sort_keys=True)
        for vector in vectors:
            for t in tensors:
                ds = out.create_virtual_dataset(_tensor_path(vector, t.name), _tensor_layout(t, vector, slices),
                                                fillvalue=np.float32(np.nan))
                ds.attrs["offset"] = t.offset
        out.attrs["complete"] = True
    return path


def _tensor_layout(tensor, vector: str, slices: list[dict]) -> h5py.VirtualLayout:
    """Tensor `tensor` of `vector` as a virtual layout: each slice's part of its flat range,
    mapped box by box (a flat range is in general not one hyperslab)."""
    layout = h5py.VirtualLayout(shape=tensor.shape, dtype=np.float32)
    end = tensor.offset + tensor.size
    for s in slices:
        a, b = max(tensor.offset, s["lo"]), min(end, s["hi"])
        if a >= b:
            continue
        source = h5py.VirtualSource(s["file"], vector, shape=(s["hi"] - s["lo"],))
        pos = a - tensor.offset
        for box_start, box in flat_range_boxes(tensor.shape, pos, b - tensor.offset):
            size = math.prod(x.stop - x.start for x in box)
            first = box_start + tensor.offset - s["lo"]
            layout[box] = source[first:first + size]
    return layout


class CheckpointWriter:
    """Write one checkpoint in the single-file format (version 1, as dbmpi wrote before the
    sliced format; still read everywhere): attributes, then vectors piece by piece; `commit`
    publishes it.

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
        _root_attributes(self.file.attrs, SINGLE_FILE_VERSION, algorithm=algorithm, step=step,
                         n_params=self.n_params, config_text=config_text, layout=layout, state=state)
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
        if not isinstance(version, (int, np.integer)) or version not in (SINGLE_FILE_VERSION, FORMAT_VERSION):
            self.close()
            shown = int(version) if isinstance(version, (int, np.integer)) else repr(version)
            raise CheckpointError(f"{self.path}: checkpoint format version {shown}; this dbmpi "
                                  f"reads versions {SINGLE_FILE_VERSION} and {FORMAT_VERSION}")
        self.format_version = int(version)
        self.slices: list[dict] = []  # format 2: the slice records (write_slice)
        self._slice_files: dict[str, h5py.File] = {}
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
            if self.format_version == FORMAT_VERSION:
                self.slices = self._attribute("slices", _slice_records, "a JSON list of slice records")
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
                out.append((_tensor_name(layer_name, tname), ds, self._offset(ds)))
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

    # Format 2: the slice files --------------------------------------------------------
    def slice_path(self, record: dict) -> Path:
        """Where a slice file is: its path in the top-level file is relative to that file."""
        return self.path.parent / record["file"]

    def _slice_file(self, record: dict) -> h5py.File:
        """A slice file, opened once (CheckpointError naming it if it is missing or unreadable)."""
        name = record["file"]
        if name not in self._slice_files:
            path = self.slice_path(record)
            if not path.exists():
                raise CheckpointError(f"{self.path}: slice file {path} is missing")
            try:
                self._slice_files[name] = h5py.File(path, "r")
            except OSError as exc:
                raise CheckpointError(f"{self.path}: slice file {path} is not a readable HDF5 file "
                                      f"(truncated or corrupt?): {exc}") from None
        return self._slice_files[name]

    def _slice_dataset(self, record: dict, vector: str) -> h5py.Dataset:
        """Vector `vector` in a slice file, checked against the slice's record."""
        f = self._slice_file(record)
        where = f"{self.path}: slice file {self.slice_path(record)}"
        attrs = f.attrs
        if attrs.get("format") != SLICE_FORMAT or attrs.get("lo") != record["lo"] or attrs.get("hi") != record["hi"]:
            raise CheckpointError(f"{where} is not the slice [{record['lo']}, {record['hi']}) of this checkpoint")
        ds = f.get(vector)
        if not isinstance(ds, h5py.Dataset) or ds.shape != (record["hi"] - record["lo"],):
            raise CheckpointError(f"{where} has no vector /{vector} of {record['hi'] - record['lo']} values")
        return ds

    def overlapping_slices(self, start: int, stop: int) -> list[dict]:
        """The slice records that hold part of canonical range [start, stop)."""
        return [s for s in self.slices if s["lo"] < stop and start < s["hi"]]

    def check_structure(self) -> None:
        """Format 2, without reading any value: the slices cover the vector, and every slice
        file is there, opens and holds each vector at its range (CheckpointError if not)."""
        bounds = [(s["lo"], s["hi"]) for s in self.slices]
        if not bounds or bounds[0][0] != 0 or bounds[-1][1] != self.n_params or any(
                a[1] != b[0] for a, b in itertools.pairwise(bounds)):
            raise CheckpointError(f"{self.path}: damaged checkpoint: slices {bounds} do not cover "
                                  f"[0, {self.n_params})")
        for record in self.slices:
            for vector in self.vectors():
                self._slice_dataset(record, vector)

    def verify_range(self, start: int, stop: int, vectors: Iterable[str] | None = None) -> list[str]:
        """Format 2: problems found by hashing the slice files that hold canonical [start,
        stop) of `vectors` (default all): whole slices, as their checksums cover them."""
        problems = []
        for record in self.overlapping_slices(start, stop):
            for vector in self.vectors() if vectors is None else vectors:
                expected = record["sha256"].get(vector)
                try:
                    ds = self._slice_dataset(record, vector)
                except CheckpointError as exc:
                    problems.append(str(exc))
                    continue
                digest = hashlib.sha256()
                for a in range(0, ds.shape[0], READ_CHUNK):
                    digest.update(ds[a:a + READ_CHUNK])
                if digest.hexdigest() != expected:
                    problems.append(f"/{vector} [{record['lo']}, {record['hi']}): checksum mismatch in slice file "
                                    f"{self.slice_path(record)}")
        return problems

    def read_range(self, vector: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Canonical values [start, stop) of a vector, reading only the rows (format 1) or
        the slice files (format 2) they touch."""
        out = np.empty(stop - start, np.float32) if out is None else out
        if self.format_version == FORMAT_VERSION:
            if vector not in self.vectors():
                raise CheckpointError(f"{self.path}: no vector /{vector}")
            for record in self.overlapping_slices(start, stop):
                a, b = max(start, record["lo"]), min(stop, record["hi"])
                self._slice_dataset(record, vector).read_direct(
                    out, np.s_[a - record["lo"]:b - record["lo"]], np.s_[a - start:b - start])
            return out
        for _, ds in self.tensor_datasets(vector):
            offset, size = int(ds.attrs["offset"]), ds.size
            a, b = max(start, offset), min(stop, offset + size)
            if a >= b:
                continue
            out[a - start:b - start] = _read_flat(ds, a - offset, b - a)
        return out

    def verify(self) -> list[str]:
        """Problems found by re-hashing every tensor (format 1) or every slice file (format
        2) of every vector (empty: all good)."""
        problems = []
        if self.format_version == FORMAT_VERSION:
            try:
                self.check_structure()
            except CheckpointError as exc:
                return [str(exc)]
            problems = self.verify_range(0, self.n_params)
        for vector in self.vectors():
            total = 0
            for _name, ds in self.tensor_datasets(vector):
                if self.format_version == SINGLE_FILE_VERSION:
                    digest = hashlib.sha256(np.ascontiguousarray(ds[()], dtype=np.float32).tobytes()).hexdigest()
                    if digest != ds.attrs.get("sha256"):
                        problems.append(f"{ds.name}: checksum mismatch")
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
            if configuration.is_python_model(model):  # not made here: the tensors' names are what is stored
                return set()
            return {t.name for t in Network(model, allocate=False).tensors}
        except (configuration.ConfigError, TypeError, KeyError):
            return set()

    def close(self) -> None:
        for f in getattr(self, "_slice_files", {}).values():
            f.close()
        self._slice_files = {}
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


def _slice_records(value) -> list[dict]:
    """The `slices` attribute as a list of records with a file, a range and checksums."""
    decoded = json.loads(value)
    if not isinstance(decoded, list) or not all(
            isinstance(r, dict) and isinstance(r.get("file"), str) and isinstance(r.get("lo"), int)
            and isinstance(r.get("hi"), int) and isinstance(r.get("sha256"), dict) for r in decoded):
        raise ValueError("not a list of {file, lo, hi, sha256}")
    return decoded


def _read_flat(ds: h5py.Dataset, start: int, count: int) -> np.ndarray:
    if ds.ndim == 1:
        return ds[start:start + count]
    row = math.prod(ds.shape[1:])
    r0, r1 = start // row, (start + count - 1) // row + 1
    block = ds[r0:r1].reshape(-1)
    return block[start - r0 * row:start - r0 * row + count]


def open_checkpoint(path: str | Path, verify: bool | str = True) -> Checkpoint:
    """Open a checkpoint. verify=True checks every checksum; "structure" is what a resume's
    root checks: for format 2 that the slice files are there and fit (each shard then hashes
    the slices it reads: dbmpi.algorithms.run), for format 1 every checksum as before;
    False: the header only. CheckpointError if a check fails."""
    ckpt = Checkpoint(path)
    try:
        if verify == "structure" and ckpt.format_version == FORMAT_VERSION:
            ckpt.check_structure()
        elif verify:
            problems = ckpt.verify()
            if problems:
                raise CheckpointError(f"{ckpt.path}: corrupt: {'; '.join(problems[:5])}")
    except CheckpointError:
        ckpt.close()
        raise
    return ckpt


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files in a directory, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def newest_valid(directory: str | Path, skip: Iterable[str | Path] = ()) -> Path:
    """The newest checkpoint in `directory` (not in `skip`) that opens and passes
    open_checkpoint's "structure" check (for --resume auto)."""
    problems = []
    skipped = {Path(p) for p in skip}
    for path in reversed(list_checkpoints(directory)):
        if path in skipped:
            continue
        try:
            open_checkpoint(path, verify="structure").close()
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


def stale_slices(directory: str | Path, up_to: int | None = None) -> list[Path]:
    """Files in slice directories (`ckpt-<step>/`, step <= `up_to`, default the newest
    checkpoint's) that no top-level file refers to: slices of a checkpoint whose top-level
    file was never written (a writer killed in between) or was pruned, and their
    temporaries. A directory whose top-level file cannot be read is left alone. Called by
    the checkpoint writer after it published a checkpoint, when no slice is being written."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    if up_to is None:
        steps = [int(NAME.match(p.name).group(1)) for p in list_checkpoints(directory)]
        up_to = max(steps, default=-1)
    referenced, unreadable = set(), set()
    for path in directory.iterdir():
        if (m := TOP_LEVEL.match(path.name)) is None:
            continue
        try:
            with h5py.File(path, "r") as f:
                records = _slice_records(f.attrs["slices"]) if "slices" in f.attrs else []
            referenced.update(directory / r["file"] for r in records)
        except (OSError, KeyError, ValueError):
            unreadable.add(slice_directory(int(m.group(1))))
    stale = []
    for sub in directory.iterdir():
        m = SLICE_DIRECTORY.match(sub.name)
        if m and sub.is_dir() and int(m.group(1)) <= up_to and sub.name not in unreadable:
            stale += [p for p in sub.iterdir() if p not in referenced]
    return sorted(stale)


def prune(directory: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (top-level file first, so it stops
    counting, then its slice files), stale temporaries and stale slice files; returns the
    deleted paths."""
    paths = list_checkpoints(directory)
    newest = int(NAME.match(paths[-1].name).group(1)) if paths else -1
    doomed = (paths[:-keep] if keep > 0 else paths) + stale_temporaries(directory)
    for path in doomed:
        path.unlink(missing_ok=True)
    slices = stale_slices(directory, up_to=newest)
    for path in slices:
        path.unlink(missing_ok=True)
    for sub in {path.parent for path in slices}:
        if not any(sub.iterdir()):
            sub.rmdir()
    return doomed + slices


__all__ = ["Checkpoint", "CheckpointError", "CheckpointWriter", "FORMAT", "FORMAT_VERSION",
           "SINGLE_FILE_VERSION", "checkpoint_name", "list_checkpoints", "newest_valid", "open_checkpoint",
           "prune", "slice_directory", "stale_slices", "stale_temporaries", "write_checkpoint", "write_slice"]
