"""IDX files, the container format of MNIST and Fashion-MNIST: reading one into an array
(``read_idx``), finding a data set's four files in a directory and reading them as its
train and test splits. Pure Python + numpy."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from dbmpi.data.errors import dataset_error

__all__ = ["read_idx", "IDX_FILES", "find_idx_files", "read_idx_splits"]


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
        raise dataset_error(path, "IDX file not found") from None
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        raise dataset_error(path, f"cannot read IDX file ({type(e).__name__}: {e}); "
                                  "the file is probably truncated or corrupt") from None

    if len(data) < 4:
        raise dataset_error(path, f"not an IDX file: only {len(data)} bytes, the header needs 4")
    if data[0] != 0 or data[1] != 0:
        raise dataset_error(path, f"not an IDX file: bad magic number 0x{data[:4].hex()} "
                                  "(the first two bytes must be zero)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise dataset_error(path, f"unknown IDX type code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise dataset_error(path, "IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise dataset_error(path, f"truncated IDX header: {ndim} dimensions need {header_len} bytes, "
                                  f"file has {len(data)}")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise dataset_error(path, f"IDX payload {what}: dims {dims} of {dtype.newbyteorder('=')} need "
                                  f"{expected} bytes, file has {actual}")
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


# The four IDX files of MNIST and Fashion-MNIST: (split, images, labels).
IDX_FILES = (
    ("train", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("test", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
)


def find_idx_files(source_dir, what: str, hint: str) -> list[Path]:
    """The four IDX files (plain, else .gz) in ``source_dir``, in ``IDX_FILES`` order."""
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise dataset_error(source_dir, f"{what} directory not found; {hint}")
    paths = []
    for _split, *names in IDX_FILES:
        for name in names:
            for candidate in (source_dir / name, source_dir / (name + ".gz")):
                if candidate.is_file():
                    paths.append(candidate)
                    break
            else:
                raise dataset_error(source_dir / name, f"{what} file missing (also looked for {name}.gz); {hint}")
    return paths


def read_idx_splits(paths) -> tuple:
    """Read and check MNIST-style IDX files -> (train_x, train_y, test_x, test_y).

    ``paths``: train images, train labels, test images, test labels. Images must be uint8
    (N, 28, 28), labels uint8 0..9 of the same N; x = pixel / 255 as float32 (N, 28, 28, 1).
    """
    arrays = []
    for img_path, lbl_path in (paths[0:2], paths[2:4]):
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise dataset_error(img_path, f"expected uint8 images of shape (N, 28, 28), "
                                          f"got {images.dtype} {images.shape}")
        if labels.dtype != np.uint8 or labels.ndim != 1:
            raise dataset_error(lbl_path, f"expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}")
        if labels.shape[0] != images.shape[0]:
            raise dataset_error(lbl_path, f"{labels.shape[0]} labels but {Path(img_path).name} has "
                                          f"{images.shape[0]} images")
        if labels.size and labels.max() >= 10:
            raise dataset_error(lbl_path, f"label {int(labels.max())} outside [0, 10)")
        x = images.astype(np.float32).reshape(-1, 28, 28, 1)
        np.divide(x, np.float32(255.0), out=x)
        arrays += [x, labels.astype(np.int32)]
    return tuple(arrays)
