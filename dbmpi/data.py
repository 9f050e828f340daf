"""Data sets for dbmpi: preparing them into one HDF5 file, and reading them back by rows.

A prepared data set is a single HDF5 file holding ``/train/x``, ``/train/y``, ``/test/x`` and
``/test/y`` (x float32 ``(N, *input_shape)`` NHWC, y int32 ``(N,)``) plus root attributes
that describe it. x is stored uncompressed and contiguous so that each model replica can read
just its own contiguous slice of rows cheaply (``Dataset.shard_range`` + ``Dataset.load``).

Files are written atomically (temp file, fsync, ``os.replace``) so a crash never leaves a
half-written file behind, and are byte-reproducible (no timestamps) for a given input.

This module is pure Python (numpy, h5py, gzip; scikit-learn only for ``digits``) and does
not import dbmpi's compiled kernels, so data can be prepared on machines without them.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import h5py
import numpy as np

__all__ = [
    "DatasetError",
    "read_idx",
    "prepare_digits",
    "prepare_fashion_mnist",
    "SOURCES",
    "prepare",
    "write_dataset",
    "Dataset",
    "open_dataset",
    "FORMAT",
    "FORMAT_VERSION",
    "SPLITS",
]

FORMAT = "dbmpi-dataset"
FORMAT_VERSION = 1
SPLITS = ("train", "test")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


class DatasetError(ValueError):
    """A problem with a data set file or source; the message names the file and the problem."""


def _err(path, problem: str) -> DatasetError:
    return DatasetError(f"{path}: {problem}")


# --------------------------------------------------------------------------------------------
# IDX files (the MNIST / Fashion-MNIST container format)
# --------------------------------------------------------------------------------------------

# IDX type code -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path) -> np.ndarray:
    """Read an IDX file (plain or gzip-compressed, detected by its magic bytes) into an array.

    Validates the magic number, the type code (all IDX codes: u8, i8, i16, i32, f32, f64),
    the dimensions and that the payload is exactly as long as the dimensions say. Returns a
    native-byte-order array of shape ``dims``. Every problem raises ``DatasetError``.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == _GZIP_MAGIC:
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except FileNotFoundError:
        raise _err(path, "IDX file not found") from None
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        raise _err(path, f"cannot read IDX file ({type(e).__name__}: {e}); "
                         "the file is probably truncated or corrupt") from None

    if len(data) < 4:
        raise _err(path, f"not an IDX file: only {len(data)} bytes, the header needs 4")
    if data[0] != 0 or data[1] != 0:
        raise _err(path, f"not an IDX file: bad magic number 0x{data[:4].hex()} "
                         "(the first two bytes must be zero)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise _err(path, f"unknown IDX type code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise _err(path, "IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise _err(path, f"truncated IDX header: {ndim} dimensions need {header_len} bytes, "
                         f"file has {len(data)}")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise _err(path, f"IDX payload {what}: dims {dims} of {dtype.newbyteorder('=')} need "
                         f"{expected} bytes, file has {actual}")
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def _attr_value(value):
    """Convert a Python attribute value to something h5py stores portably (str lists -> vlen)."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return np.array(list(value), dtype=h5py.string_dtype())
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    return value


def _shape(x) -> tuple:
    """Shape without converting array-likes that already know it (arrays, h5py datasets)."""
    shape = getattr(x, "shape", None)
    return tuple(shape) if shape is not None else np.shape(x)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # e.g. Windows: directories cannot be opened; rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_dataset(out, train_x, train_y, test_x, test_y, *, attrs) -> Path:
    """Write a data set file atomically and return its path.

    ``attrs`` must hold ``source`` and ``n_classes``; ``class_names`` defaults to "0".."n-1";
    any further keys (e.g. ``scaling``, ``x_range``, ``description``) are stored as root
    attributes too. ``input_shape``, ``layout``, ``n_train``, ``n_test`` and the format
    markers are derived here. The file is written to ``.<name>.tmp-<pid>`` beside ``out``,
    fsynced, renamed onto ``out`` and the directory fsynced; on any failure the temp file is
    removed and an existing ``out`` is left untouched.
    """
    out = Path(out)
    attrs = dict(attrs)
    for key in ("source", "n_classes"):
        if key not in attrs:
            raise _err(out, f"write_dataset needs attrs[{key!r}]")
    n_classes = int(attrs["n_classes"])
    if n_classes < 1:
        raise _err(out, f"n_classes must be >= 1, got {n_classes}")
    class_names = [str(c) for c in attrs.get("class_names", [str(i) for i in range(n_classes)])]
    if len(class_names) != n_classes:
        raise _err(out, f"{len(class_names)} class_names for n_classes={n_classes}")
    attrs["class_names"] = class_names
    if out.is_dir():
        raise _err(out, "output path is a directory")

    # Validate shapes and labels before touching the file system (cheap; y is small).
    shapes = {}
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        x_shape, y_arr = _shape(x), np.asarray(y)
        if len(x_shape) < 2:
            raise _err(out, f"{split} x must have shape (N, *input_shape), got {x_shape}")
        if y_arr.ndim != 1 or y_arr.shape[0] != x_shape[0]:
            raise _err(out, f"{split} y shape {y_arr.shape} does not match x rows {x_shape[0]}")
        if x_shape[0] == 0:
            raise _err(out, f"{split} split is empty")
        if y_arr.size and (y_arr.min() < 0 or y_arr.max() >= n_classes):
            raise _err(out, f"{split} labels outside [0, {n_classes}): "
                            f"min {y_arr.min()}, max {y_arr.max()}")
        shapes[split] = tuple(int(d) for d in x_shape[1:])
    if shapes["train"] != shapes["test"]:
        raise _err(out, f"train input shape {shapes['train']} != test input shape {shapes['test']}")
    input_shape = shapes["train"]

    root = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layout": {1: "NC", 3: "NHWC"}.get(len(input_shape), "N" + "D" * len(input_shape)),
        "x_range": [0.0, 1.0],
        **attrs,
        "n_classes": n_classes,
        "input_shape": list(input_shape),
        "n_train": int(_shape(train_x)[0]),
        "n_test": int(_shape(test_x)[0]),
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            for key in sorted(root):
                f.attrs[key] = _attr_value(root[key])
            for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
                g = f.create_group(split)
                g.attrs["description"] = f"{split} split: x {split} inputs, y {split} labels"
                xd = g.create_dataset("x", data=np.ascontiguousarray(x, dtype=np.float32),
                                      track_times=False)
                xd.attrs["description"] = (
                    f"{split} inputs, float32, shape (N, {', '.join(map(str, input_shape))}), "
                    f"layout {root['layout']}; {root.get('scaling', 'values in x_range')}")
                yd = g.create_dataset("y", data=np.ascontiguousarray(y, dtype=np.int32),
                                      track_times=False)
                yd.attrs["description"] = f"{split} labels, int32 class index in [0, {n_classes})"
            f.flush()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(out.parent)
    return out


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

def _stratified_split(y: np.ndarray, test_fraction: float, seed: int):
    """Per-class random split; returns (train_idx, test_idx), each shuffled, deterministic."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_test = int(round(test_fraction * idx.size))
        if idx.size >= 2:
            n_test = min(max(n_test, 1), idx.size - 1)  # every class on both sides
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train, test = np.concatenate(train), np.concatenate(test)
    # Shuffle across classes so any contiguous shard of rows is class-mixed.
    return rng.permutation(train), rng.permutation(test)


def prepare_digits(out, *, test_fraction: float = 0.2, seed: int = 0) -> Path:
    """Prepare scikit-learn's bundled 8x8 ``digits`` (1797 images, no download) at ``out``.

    x = pixel / 16 as float32 (N, 8, 8, 1) in [0, 1]; y int32 0..9. The split is stratified
    by class and fully determined by ``seed`` (same seed -> byte-identical file).
    """
    out = Path(out)
    if not 0.0 < float(test_fraction) < 1.0:
        raise _err(out, f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise _err(out, "the 'digits' source needs scikit-learn: "
                        "pip install scikit-learn (or: pip install dbmpi[data])") from None
    images, labels = load_digits(return_X_y=True)
    x = (np.asarray(images, dtype=np.float32) / np.float32(16.0)).reshape(-1, 8, 8, 1)
    y = np.asarray(labels, dtype=np.int32)
    tr, te = _stratified_split(y, float(test_fraction), int(seed))
    return write_dataset(
        out, x[tr], y[tr], x[te], y[te],
        attrs={
            "source": "digits",
            "n_classes": 10,
            "class_names": [str(i) for i in range(10)],
            "scaling": "x = pixel / 16 (pixels are 0..16)",
            "description": "scikit-learn load_digits (UCI optical handwritten digits, 8x8); "
                           f"stratified split, test_fraction={float(test_fraction)}, seed={int(seed)}",
            "split_seed": int(seed),
            "test_fraction": float(test_fraction),
        },
    )


def _find_idx(source_dir: Path, name: str) -> Path:
    hint = ("install it with `apt-get install dataset-fashion-mnist`, "
            "or pass the directory holding the IDX files with --source DIR")
    if not source_dir.is_dir():
        raise _err(source_dir, f"Fashion-MNIST directory not found; {hint}")
    for candidate in (source_dir / name, source_dir / (name + ".gz")):
        if candidate.is_file():
            return candidate
    raise _err(source_dir / name, f"Fashion-MNIST file missing (also looked for {name}.gz); {hint}")


def _load_fashion_split(source_dir: Path, prefix: str):
    img_path = _find_idx(source_dir, f"{prefix}-images-idx3-ubyte")
    lbl_path = _find_idx(source_dir, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise _err(img_path, f"expected uint8 images of shape (N, 28, 28), "
                             f"got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise _err(lbl_path, f"expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise _err(lbl_path, f"{labels.shape[0]} labels but {img_path.name} has "
                             f"{images.shape[0]} images")
    if labels.size and labels.max() >= 10:
        raise _err(lbl_path, f"label {int(labels.max())} outside [0, 10)")
    x = images.astype(np.float32).reshape(-1, 28, 28, 1)
    np.divide(x, np.float32(255.0), out=x)
    return x, labels.astype(np.int32)


def prepare_fashion_mnist(out, *, source_dir=FASHION_MNIST_DIR) -> Path:
    """Prepare Fashion-MNIST from its four IDX files (plain or .gz) in ``source_dir``.

    x = pixel / 255 as float32 (N, 28, 28, 1); y int32 0..9; the standard 60000/10000 split.
    """
    source_dir = Path(source_dir)
    train_x, train_y = _load_fashion_split(source_dir, "train")
    test_x, test_y = _load_fashion_split(source_dir, "t10k")
    return write_dataset(
        out, train_x, train_y, test_x, test_y,
        attrs={
            "source": "fashion-mnist",
            "n_classes": 10,
            "class_names": list(FASHION_MNIST_CLASSES),
            "scaling": "x = pixel / 255 (pixels are 0..255)",
            "description": "Fashion-MNIST (Zalando), 28x28 grey-scale, standard train/t10k split",
        },
    )


SOURCES = {
    "digits": prepare_digits,
    "fashion-mnist": prepare_fashion_mnist,
}


def prepare(source: str, out, **options) -> Path:
    """Prepare the data set named ``source`` (a key of ``SOURCES``) at ``out``."""
    try:
        fn = SOURCES[source]
    except (KeyError, TypeError):
        raise DatasetError(f"unknown data source {source!r}; known sources: "
                           f"{', '.join(sorted(SOURCES))}") from None
    import inspect

    accepted = set(inspect.signature(fn).parameters) - {"out"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise DatasetError(f"{source}: unknown option(s) {', '.join(unknown)}; "
                           f"this source takes {', '.join(sorted(accepted)) or 'none'}")
    return fn(out, **options)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def _plain(value):
    """h5py attribute value -> plain Python (str, int, float, list)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


class Dataset:
    """An open, validated data set file; reads rows of a split on demand.

    The HDF5 file stays open read-only for the object's life; use ``close()`` or ``with``.
    Attributes: ``path``, ``source``, ``input_shape``, ``n_classes``, ``class_names``,
    ``n_train``, ``n_test``, ``attrs`` (all root attributes as plain Python values).
    """

    def __init__(self, path):
        self._file = None
        self.path = Path(path)
        if not self.path.exists():
            raise _err(self.path, "data set file not found")
        if not self.path.is_file():
            raise _err(self.path, "not a regular file")
        if not h5py.is_hdf5(self.path):
            raise _err(self.path, "not an HDF5 file (prepare one with `dbmpi data prepare`)")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as e:
            raise _err(self.path, f"cannot open HDF5 file: {e}") from None
        try:
            self._validate()
        except BaseException:
            self._file.close()
            raise

    def _validate(self) -> None:
        f, p = self._file, self.path
        self.attrs = {k: _plain(v) for k, v in f.attrs.items()}
        fmt = self.attrs.get("format")
        if fmt is not None and fmt != FORMAT:
            raise _err(p, f"format attribute is {fmt!r}, expected {FORMAT!r}")
        version = self.attrs.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise _err(p, f"format_version {version!r} is newer than this dbmpi reads "
                          f"({FORMAT_VERSION}); upgrade dbmpi")
        self._x, self._y = {}, {}
        for split in SPLITS:
            for name, dtype in (("x", np.float32), ("y", np.int32)):
                key = f"/{split}/{name}"
                obj = f.get(key)
                if obj is None:
                    raise _err(p, f"missing dataset {key}")
                if not isinstance(obj, h5py.Dataset):
                    raise _err(p, f"{key} is not a dataset")
                if obj.dtype != dtype:
                    raise _err(p, f"{key} has dtype {obj.dtype}, expected {np.dtype(dtype)}")
            x, y = f[f"/{split}/x"], f[f"/{split}/y"]
            if x.ndim < 2:
                raise _err(p, f"/{split}/x has shape {x.shape}, expected (N, *input_shape)")
            if y.ndim != 1:
                raise _err(p, f"/{split}/y has shape {y.shape}, expected (N,)")
            if x.shape[0] != y.shape[0]:
                raise _err(p, f"length mismatch: /{split}/x has {x.shape[0]} rows "
                              f"but /{split}/y has {y.shape[0]}")
            self._x[split], self._y[split] = x, y
        if self._x["train"].shape[1:] != self._x["test"].shape[1:]:
            raise _err(p, f"input shape mismatch: /train/x rows are {self._x['train'].shape[1:]}, "
                          f"/test/x rows are {self._x['test'].shape[1:]}")
        self.input_shape = tuple(int(d) for d in self._x["train"].shape[1:])
        self.n_train = int(self._x["train"].shape[0])
        self.n_test = int(self._x["test"].shape[0])
        for key, actual in (("n_train", self.n_train), ("n_test", self.n_test)):
            if key in self.attrs and self.attrs[key] != actual:
                raise _err(p, f"attribute {key}={self.attrs[key]} but the dataset has {actual} rows")
        if "input_shape" in self.attrs and tuple(self.attrs["input_shape"]) != self.input_shape:
            raise _err(p, f"attribute input_shape={self.attrs['input_shape']} but x rows "
                          f"have shape {self.input_shape}")

        if "n_classes" not in self.attrs:
            raise _err(p, "missing root attribute n_classes")
        try:
            self.n_classes = int(self.attrs["n_classes"])
        except (TypeError, ValueError):
            raise _err(p, f"attribute n_classes={self.attrs['n_classes']!r} is not an integer") from None
        if self.n_classes < 1:
            raise _err(p, f"attribute n_classes={self.n_classes} must be >= 1")
        names = self.attrs.get("class_names", [str(i) for i in range(self.n_classes)])
        if isinstance(names, str):
            names = [names]
        self.class_names = [str(n) for n in names]
        if len(self.class_names) != self.n_classes:
            raise _err(p, f"{len(self.class_names)} class_names for n_classes={self.n_classes}")
        self.source = str(self.attrs.get("source", "unknown"))
        # Label range: a full scan, cheap because y is small (4 bytes a row).
        for split in SPLITS:
            y = self._y[split][()]
            if y.size and (int(y.min()) < 0 or int(y.max()) >= self.n_classes):
                raise _err(p, f"/{split}/y has labels outside [0, {self.n_classes}) "
                              f"(label range: min {int(y.min())}, max {int(y.max())})")

    # -- access -------------------------------------------------------------------------------

    def _rows(self, split: str) -> int:
        if self._file is None or not self._file.id.valid:
            raise _err(self.path, "data set is closed")
        if split not in SPLITS:
            raise _err(self.path, f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
        return self.n_train if split == "train" else self.n_test

    def load(self, split: str, start: int = 0, stop: int | None = None):
        """Read rows ``[start, stop)`` of ``split``; returns (x float32 C-contiguous, y int32)."""
        n = self._rows(split)
        stop = n if stop is None else int(stop)
        start = int(start)
        if not 0 <= start <= stop <= n:
            raise _err(self.path, f"row range [{start}, {stop}) is outside /{split} (0..{n})")
        x = np.empty((stop - start, *self.input_shape), dtype=np.float32)
        if stop > start:
            self._x[split].read_direct(x, np.s_[start:stop])
        y = np.ascontiguousarray(self._y[split][start:stop], dtype=np.int32)
        return x, y

    def shard_range(self, split: str, index: int, count: int):
        """Contiguous, balanced row range (start, stop) of replica ``index`` among ``count``.

        The first ``n % count`` shards get one extra row, so shards differ by at most one
        row and together cover every row exactly once.
        """
        n = self._rows(split)
        index, count = int(index), int(count)
        if count < 1:
            raise _err(self.path, f"shard count must be >= 1, got {count}")
        if not 0 <= index < count:
            raise _err(self.path, f"shard index {index} outside [0, {count})")
        if count > n:
            raise _err(self.path, f"cannot split {n} {split} rows into {count} non-empty shards")
        base, extra = divmod(n, count)
        start = index * base + min(index, extra)
        return start, start + base + (1 if index < extra else 0)

    def close(self) -> None:
        """Close the HDF5 file (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._file is None else "open"
        return (f"Dataset({str(self.path)!r}, source={self.source!r}, input_shape={self.input_shape}, "
                f"n_classes={self.n_classes}, n_train={self.n_train}, n_test={self.n_test}, {state})")


def open_dataset(path) -> Dataset:
    """Open and validate a prepared data set file (raises ``DatasetError`` naming the problem)."""
    return Dataset(path)
