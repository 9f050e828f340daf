"""Tests for dbmpi.data: IDX parsing, preparing digits / Fashion-MNIST, atomic writes, reading.

Real files in tmp_path throughout; nothing here needs dbmpi's compiled kernels.
"""
import gzip
import os
import struct
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from dbmpi import data
from dbmpi.data import DatasetError
from tests.procio import bytes_read

FASHION_DIR = Path(data.FASHION_MNIST_DIR)


# ------------------------------------------------------------------------------- helpers

def idx_bytes(arr: np.ndarray, code: int) -> bytes:
    be = arr.astype(arr.dtype.newbyteorder(">"))
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + be.tobytes()


def small_dataset(out, n_train=10, n_test=4, n_classes=3, shape=(2, 2, 1)):
    rng = np.random.default_rng(1)
    tx = rng.random((n_train, *shape), dtype=np.float32)
    ty = (np.arange(n_train) % n_classes).astype(np.int32)
    vx = rng.random((n_test, *shape), dtype=np.float32)
    vy = (np.arange(n_test) % n_classes).astype(np.int32)
    data.write_dataset(out, tx, ty, vx, vy, attrs={"source": "test", "n_classes": n_classes})
    return tx, ty, vx, vy


def leftovers(directory):
    return sorted(p.name for p in Path(directory).iterdir() if ".tmp-" in p.name)


# ------------------------------------------------------------------------------- read_idx

@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype,code", [
    (np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B),
    (np.int32, 0x0C), (np.float32, 0x0D), (np.float64, 0x0E),
])
def test_read_idx_roundtrip(tmp_path, gz, dtype, code):
    arr = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    if dtype == np.uint8:
        arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = idx_bytes(arr, code)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    got = data.read_idx(path)
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, arr)


def test_read_idx_gzip_detected_by_magic_not_extension(tmp_path):
    arr = np.arange(6, dtype=np.uint8)
    path = tmp_path / "labels-idx1-ubyte"  # no .gz, but compressed
    path.write_bytes(gzip.compress(idx_bytes(arr, 0x08)))
    np.testing.assert_array_equal(data.read_idx(path), arr)


def test_read_idx_truncated_names_path_and_sizes(tmp_path):
    raw = idx_bytes(np.zeros((3, 4, 4), np.uint8), 0x08)
    path = tmp_path / "trunc-idx3-ubyte"
    path.write_bytes(raw[:-5])
    with pytest.raises(DatasetError) as e:
        data.read_idx(path)
    msg = str(e.value)
    assert str(path) in msg and "truncated" in msg and "48" in msg and "43" in msg


def test_read_idx_truncated_gzip(tmp_path):
    raw = gzip.compress(idx_bytes(np.arange(1000, dtype=np.uint8), 0x08))
    path = tmp_path / "t.gz"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError, match="truncated") as e:
        data.read_idx(path)
    assert str(path) in str(e.value)


def test_read_idx_trailing_bytes(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(np.zeros(4, np.uint8), 0x08) + b"xx")
    with pytest.raises(DatasetError, match="trailing"):
        data.read_idx(path)


@pytest.mark.parametrize("content,problem", [
    (b"\x08\x03\x00\x00\x00\x00\x00\x01", "magic"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "type code"),
    (b"\x00\x00", "header"),
    (b"\x00\x00\x08\x02\x00\x00\x00\x01", "header"),
])
def test_read_idx_bad_header(tmp_path, content, problem):
    path = tmp_path / "bad.idx"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=problem) as e:
        data.read_idx(path)
    assert str(path) in str(e.value)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        data.read_idx(tmp_path / "nope")


# ------------------------------------------------------------------------------- digits

def test_prepare_digits(tmp_path):
    out = data.prepare_digits(tmp_path / "sub" / "digits.h5")  # parent is created
    assert out == tmp_path / "sub" / "digits.h5" and out.is_file()
    with data.open_dataset(out) as ds:
        assert ds.source == "digits" and ds.n_classes == 10
        assert ds.class_names == [str(i) for i in range(10)]
        assert ds.input_shape == (8, 8, 1)
        assert ds.n_train + ds.n_test == 1797
        assert ds.n_test == pytest.approx(0.2 * 1797, abs=10)
        for split, n in (("train", ds.n_train), ("test", ds.n_test)):
            x, y = ds.load(split)
            assert x.shape == (n, 8, 8, 1) and x.dtype == np.float32 and x.flags.c_contiguous
            assert y.shape == (n,) and y.dtype == np.int32
            assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() == 1.0
            assert y.min() >= 0 and y.max() <= 9
            assert set(np.unique(y)) == set(range(10))  # stratified: every class on both sides
        _, ytr = ds.load("train")
        _, yte = ds.load("test")
        # Class proportions agree between splits (stratification).
        ptr, pte = np.bincount(ytr) / ytr.size, np.bincount(yte) / yte.size
        assert np.abs(ptr - pte).max() < 0.01
        a = ds.attrs
        assert a["format"] == "dbmpi-dataset" and a["format_version"] == 1
        assert a["layout"] == "NHWC" and a["input_shape"] == [8, 8, 1]
        assert a["n_train"] == ds.n_train and a["n_test"] == ds.n_test
        assert "16" in a["scaling"] and a["x_range"] == [0.0, 1.0]
    with h5py.File(out, "r") as f:
        for key in ("/train/x", "/train/y", "/test/x", "/test/y"):
            assert f[key].attrs["description"]
            assert f[key].compression is None
    # Pixels are exact multiples of 1/16.
    with data.open_dataset(out) as ds:
        x, _ = ds.load("train")
        np.testing.assert_array_equal(x * 16, np.round(x * 16))


def test_prepare_digits_deterministic(tmp_path):
    a = data.prepare_digits(tmp_path / "a.h5", seed=3)
    b = data.prepare_digits(tmp_path / "b.h5", seed=3)
    c = data.prepare_digits(tmp_path / "c.h5", seed=4)
    assert a.read_bytes() == b.read_bytes()  # reproducible files: no timestamps
    with data.open_dataset(a) as da, data.open_dataset(b) as db, data.open_dataset(c) as dc:
        for split in ("train", "test"):
            xa, ya = da.load(split)
            xb, yb = db.load(split)
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)
        assert not np.array_equal(da.load("test")[1], dc.load("test")[1])


def test_prepare_digits_test_fraction(tmp_path):
    with data.open_dataset(data.prepare_digits(tmp_path / "d.h5", test_fraction=0.5)) as ds:
        assert abs(ds.n_test - 1797 / 2) <= 10
    with pytest.raises(DatasetError, match="test_fraction"):
        data.prepare_digits(tmp_path / "e.h5", test_fraction=1.0)


def test_prepare_digits_without_sklearn(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DatasetError, match="pip install scikit-learn"):
        data.prepare_digits(tmp_path / "d.h5")
    assert not (tmp_path / "d.h5").exists()


def test_prepare_dispatch(tmp_path):
    assert set(data.SOURCES) == {"digits", "fashion-mnist", "fsdd", "mnist", "synthetic"}
    out = data.prepare("digits", tmp_path / "d.h5", seed=1)
    with data.open_dataset(out) as ds:
        assert ds.source == "digits"
    with pytest.raises(DatasetError) as e:
        data.prepare("cifar", tmp_path / "c.h5")
    assert "cifar" in str(e.value) and "digits" in str(e.value) and "fashion-mnist" in str(e.value)


# ------------------------------------------------------------------------------- fashion-mnist

@pytest.fixture
def fashion_dir():
    if not FASHION_DIR.is_dir():
        reason = (f"{FASHION_DIR} not found (apt-get install dataset-fashion-mnist); "
                  "set DBMPI_REQUIRE_DATA=1 to make this a failure")
        if os.environ.get("DBMPI_REQUIRE_DATA") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return FASHION_DIR


def test_prepare_fashion_mnist_real(tmp_path, fashion_dir):
    out = data.prepare("fashion-mnist", tmp_path / "fm.h5", source_dir=fashion_dir)
    with data.open_dataset(out) as ds:
        assert (ds.n_train, ds.n_test) == (60000, 10000)
        assert ds.input_shape == (28, 28, 1) and ds.n_classes == 10
        assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
        assert ds.source == "fashion-mnist"
        x, y = ds.load("train")
        assert x.shape == (60000, 28, 28, 1) and x.dtype == np.float32
        assert 0.0 <= x.min() and x.max() == 1.0
        np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, 6000))
        xt, yt = ds.load("test")
        assert xt.shape == (10000, 28, 28, 1)
        np.testing.assert_array_equal(np.bincount(yt, minlength=10), np.full(10, 1000))
        # Same pixels as the raw IDX file.
        raw = data.read_idx(fashion_dir / "t10k-images-idx3-ubyte.gz")
        np.testing.assert_array_equal(np.round(xt[:50, :, :, 0] * 255).astype(np.uint8), raw[:50])


def _write_fake_fashion(d, n_train=6, n_test=4, gz=True, label_fix=None):
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        if label_fix:
            labels = label_fix(prefix, labels)
        for name, arr in ((f"{prefix}-images-idx3-ubyte", imgs), (f"{prefix}-labels-idx1-ubyte", labels)):
            raw = idx_bytes(arr, 0x08)
            if gz:
                (d / (name + ".gz")).write_bytes(gzip.compress(raw))
            else:
                (d / name).write_bytes(raw)


@pytest.mark.parametrize("gz", [False, True])
def test_prepare_fashion_mnist_small_source(tmp_path, gz):
    src = tmp_path / "src"
    _write_fake_fashion(src, gz=gz)
    with data.open_dataset(data.prepare_fashion_mnist(tmp_path / "fm.h5", source_dir=src)) as ds:
        assert (ds.n_train, ds.n_test, ds.input_shape) == (6, 4, (28, 28, 1))


def test_prepare_fashion_mnist_missing_source(tmp_path):
    with pytest.raises(DatasetError) as e:
        data.prepare_fashion_mnist(tmp_path / "fm.h5", source_dir=tmp_path / "nowhere")
    msg = str(e.value)
    assert "nowhere" in msg and "apt-get install dataset-fashion-mnist" in msg and "--source" in msg
    src = tmp_path / "src"
    _write_fake_fashion(src)
    (src / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte"):
        data.prepare_fashion_mnist(tmp_path / "fm.h5", source_dir=src)
    assert not (tmp_path / "fm.h5").exists()


def test_prepare_fashion_mnist_bad_labels(tmp_path):
    src = tmp_path / "bad-range"

    def bad(prefix, labels):
        labels[0] = 10
        return labels
    _write_fake_fashion(src, label_fix=bad)
    with pytest.raises(DatasetError, match=r"label 10 outside"):
        data.prepare_fashion_mnist(tmp_path / "fm.h5", source_dir=src)

    src = tmp_path / "bad-count"
    _write_fake_fashion(src, label_fix=lambda prefix, y: y[:-1] if prefix == "train" else y)
    with pytest.raises(DatasetError, match="5 labels but .* 6 images"):
        data.prepare_fashion_mnist(tmp_path / "fm.h5", source_dir=src)


# ------------------------------------------------------------------------------- atomic writes

def test_write_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "d.h5"
    real = h5py.Group.create_dataset
    calls = []

    def failing(self, *args, **kw):
        calls.append(args[0] if args else kw.get("name"))
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(self, *args, **kw)
    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        small_dataset(out)
    assert not out.exists()
    assert leftovers(tmp_path) == []
    assert len(calls) == 2


def test_write_failure_keeps_older_file(tmp_path, monkeypatch):
    out = tmp_path / "d.h5"
    small_dataset(out, n_train=7)
    before = out.read_bytes()

    seen_tmp = []

    class Exploding:
        """An array-like whose conversion raises: test x is converted after train is written."""
        shape = (4, 2, 2, 1)

        def __array__(self, dtype=None, copy=None):
            seen_tmp.extend(leftovers(tmp_path))  # the half-written temp file exists now
            raise MemoryError("conversion failed")

    tx = np.zeros((10, 2, 2, 1), np.float32)
    vx = Exploding()
    with pytest.raises(MemoryError):
        data.write_dataset(out, tx, np.zeros(10, np.int32), vx, np.zeros(4, np.int32),
                           attrs={"source": "t", "n_classes": 2})
    assert seen_tmp == [f".d.h5.tmp-{os.getpid()}"]
    assert out.read_bytes() == before
    assert leftovers(tmp_path) == []
    with data.open_dataset(out) as ds:
        assert ds.n_train == 7


def test_write_replaces_atomically_and_validates(tmp_path):
    out = tmp_path / "d.h5"
    small_dataset(out, n_train=5)
    small_dataset(out, n_train=9)
    with data.open_dataset(out) as ds:
        assert ds.n_train == 9
    assert leftovers(tmp_path) == []
    x = np.zeros((3, 2), np.float32)
    with pytest.raises(DatasetError, match="labels outside"):
        data.write_dataset(tmp_path / "e.h5", x, np.array([0, 1, 5]), x, np.zeros(3, int),
                           attrs={"source": "t", "n_classes": 2})
    with pytest.raises(DatasetError, match="input shape"):
        data.write_dataset(tmp_path / "e.h5", x, np.zeros(3, int), np.zeros((3, 3), np.float32),
                           np.zeros(3, int), attrs={"source": "t", "n_classes": 2})
    with pytest.raises(DatasetError, match="n_classes"):
        data.write_dataset(tmp_path / "e.h5", x, np.zeros(3, int), x, np.zeros(3, int),
                           attrs={"source": "t"})
    assert not (tmp_path / "e.h5").exists()


def test_x_range_is_what_the_data_holds(tmp_path):
    """Standardised data is not labelled [0, 1]: x_range is the values' own min and max over
    both splits, or a declared scale that every value must respect."""
    rng = np.random.default_rng(0)
    tx, vx = rng.standard_normal((50, 4)).astype(np.float32), rng.standard_normal((20, 4)).astype(np.float32)
    vx[3, 1] = -3.9
    y50, y20 = np.zeros(50, np.int32), np.zeros(20, np.int32)
    data.write_dataset(tmp_path / "s.h5", tx, y50, vx, y20, attrs={"source": "t", "n_classes": 1})
    with data.open_dataset(tmp_path / "s.h5") as ds:
        assert ds.attrs["x_range"] == pytest.approx([-3.9, max(tx.max(), vx.max())])
    data.write_dataset(tmp_path / "d.h5", tx / 10, y50, vx / 10, y20,
                       attrs={"source": "t", "n_classes": 1, "x_range": [-1, 1]})
    with data.open_dataset(tmp_path / "d.h5") as ds:
        assert ds.attrs["x_range"] == [-1.0, 1.0]
    with pytest.raises(DatasetError, match=r"x values span \[-3.9, .*outside the declared x_range \[0, 1\]"):
        data.write_dataset(tmp_path / "e.h5", tx, y50, vx, y20,
                           attrs={"source": "t", "n_classes": 1, "x_range": [0, 1]})
    assert not (tmp_path / "e.h5").exists()


# ------------------------------------------------------------------------------- open_dataset errors

def _make(path, mutate):
    small_dataset(path)
    with h5py.File(path, "a") as f:
        mutate(f)
    return path


def _retype(key, dtype):
    def mutate(f):
        arr = f[key][()]
        del f[key]
        f[key] = arr.astype(dtype)
    return mutate


@pytest.mark.parametrize("mutate,problem", [
    (lambda f: f.__delitem__("/test/y"), "missing dataset /test/y"),
    (_retype("/train/x", np.float64), "/train/x has dtype float64, expected float32"),
    (_retype("/test/y", np.int64), "/test/y has dtype int64, expected int32"),
    (lambda f: (f.__delitem__("/train/y"), f.create_dataset("/train/y", data=np.zeros(9, np.int32))),
     "length mismatch"),
    (lambda f: (f.__delitem__("/test/x"), f.create_dataset("/test/x", data=np.zeros((4, 3, 2, 1), np.float32))),
     "input shape mismatch"),
    (lambda f: f.attrs.__delitem__("n_classes"), "n_classes"),
    (lambda f: f.attrs.__setitem__("format_version", 99), "format_version"),
])
def test_open_dataset_errors(tmp_path, mutate, problem):
    path = _make(tmp_path / "d.h5", mutate)
    with pytest.raises(DatasetError) as e:
        data.open_dataset(path)
    assert problem in str(e.value) and str(path) in str(e.value)


def test_open_dataset_not_hdf5(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    with pytest.raises(DatasetError, match="not an HDF5 file") as e:
        data.open_dataset(path)
    assert str(path) in str(e.value)
    with pytest.raises(DatasetError, match="not found"):
        data.open_dataset(tmp_path / "missing.h5")


# ------------------------------------------------------------------------------- load / shards

def test_load_slices(tmp_path):
    path = tmp_path / "d.h5"
    tx, ty, vx, vy = small_dataset(path)
    with data.open_dataset(path) as ds:
        x, y = ds.load("train", 3, 7)
        np.testing.assert_array_equal(x, tx[3:7])
        np.testing.assert_array_equal(y, ty[3:7])
        assert x.dtype == np.float32 and x.flags.c_contiguous and y.dtype == np.int32
        x, y = ds.load("test")
        np.testing.assert_array_equal(x, vx)
        np.testing.assert_array_equal(y, vy)
        x, y = ds.load("train", 4, 4)
        assert x.shape == (0, 2, 2, 1) and y.shape == (0,)
        with pytest.raises(DatasetError, match="outside"):
            ds.load("train", 5, 11)
        with pytest.raises(DatasetError, match="outside"):
            ds.load("train", -1, 2)
        with pytest.raises(DatasetError, match="unknown split"):
            ds.load("valid")
    with pytest.raises(DatasetError, match="closed"):
        ds.load("train")
    ds.close()  # idempotent


@pytest.mark.parametrize("n,count", [(10, 3), (10, 1), (10, 10), (14, 4), (60000, 7)])
def test_shard_range_balanced(tmp_path, n, count):
    path = tmp_path / "d.h5"
    small_dataset(path, n_train=n, shape=(1,))
    with data.open_dataset(path) as ds:
        ranges = [ds.shard_range("train", i, count) for i in range(count)]
    sizes = [b - a for a, b in ranges]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(count - 1))
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True)  # the first n % count are the longer ones
    if (n, count) == (10, 3):
        assert ranges == [(0, 4), (4, 7), (7, 10)]


def test_shard_range_errors(tmp_path):
    path = tmp_path / "d.h5"
    small_dataset(path, n_train=10, n_test=4)
    with data.open_dataset(path) as ds:
        with pytest.raises(DatasetError, match="cannot split 4 test rows into 5"):
            ds.shard_range("test", 0, 5)
        with pytest.raises(DatasetError, match="shard index"):
            ds.shard_range("train", 3, 3)
        with pytest.raises(DatasetError, match="shard count"):
            ds.shard_range("train", 0, 0)


def test_check_values_names_the_split_and_the_first_bad_row_across_chunks(tmp_path):
    """Training on NaN/Inf rows can only diverge: the scan (in chunks) names the first one."""
    small_dataset(tmp_path / "ok.h5", n_train=50)
    with data.open_dataset(tmp_path / "ok.h5") as dataset:
        dataset.check_values(chunk_bytes=64)  # finite: no error
    with h5py.File(tmp_path / "ok.h5", "r+") as f:
        f["train/x"][37, 1, 0, 0] = np.inf
        f["train/x"][41, 0, 1, 0] = np.nan
    with data.open_dataset(tmp_path / "ok.h5") as dataset:
        with pytest.raises(DatasetError, match=r"ok\.h5: /train/x holds NaN or Inf in 2 row\(s\), the first at row 37"):
            dataset.check_values(chunk_bytes=64)  # 4 rows a chunk


# ------------------------------------------------------------------------------- what is read

def _wide_dataset(path, n_train=20000, n_test=5000, width=64, n_classes=7):
    """Rows of 64 float32 (256 bytes): the file (about 6.4 MB) is far larger than a few rows."""
    rng = np.random.default_rng(5)
    tx = rng.random((n_train, width), dtype=np.float32)
    ty = rng.integers(0, n_classes, n_train).astype(np.int32)
    vx = rng.random((n_test, width), dtype=np.float32)
    vy = rng.integers(0, n_classes, n_test).astype(np.int32)
    data.write_dataset(path, tx, ty, vx, vy, attrs={"source": "test", "n_classes": n_classes})
    return tx, ty, vx, vy


METADATA_ALLOWANCE = 256 * 1024  # superblock, object headers, attributes: a fixed amount


def test_opening_reads_metadata_only(tmp_path):
    """Opening (the check every rank runs) reads no rows: not the labels (80 KB here) and
    not x; the bytes read do not depend on the file's size."""
    path = tmp_path / "wide.h5"
    _wide_dataset(path)
    before = bytes_read()
    with data.open_dataset(path) as ds:
        assert (ds.n_train, ds.n_test, ds.n_classes, ds.input_shape) == (20000, 5000, 7, (64,))
    assert bytes_read() - before < min(METADATA_ALLOWANCE, 25000 * 4)


@pytest.mark.parametrize("split,start,stop", [("train", 1234, 1734), ("test", 4000, 5000), ("train", 0, 1)])
def test_a_row_range_reads_its_rows_and_labels_only(tmp_path, split, start, stop):
    path = tmp_path / "wide.h5"
    tx, ty, vx, vy = _wide_dataset(path)
    with data.open_dataset(path) as ds:
        before = bytes_read()
        x, y = ds.load(split, start, stop)
        read = bytes_read() - before
    want_x, want_y = (tx, ty) if split == "train" else (vx, vy)
    np.testing.assert_array_equal(x, want_x[start:stop])
    np.testing.assert_array_equal(y, want_y[start:stop])
    assert read <= (stop - start) * (64 * 4 + 4) + METADATA_ALLOWANCE, read


def test_share_range_and_load_share(tmp_path):
    """The shares of a split (helper for evaluating the test set across ranks) cover every
    row once, in order, balanced; more shares than rows leaves some empty."""
    assert [data.share_range(10, i, 3) for i in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [data.share_range(2, i, 4) for i in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    path = tmp_path / "wide.h5"
    _, _, vx, vy = _wide_dataset(path, n_train=50, n_test=23)
    with data.open_dataset(path) as ds:
        pieces = [ds.load_share("test", i, 5) for i in range(5)]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in pieces]), vx)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in pieces]), vy)
        assert [len(p[1]) for p in pieces] == [5, 5, 5, 4, 4]
        x, y = ds.load_share("test", 30, 40)  # more ranks than rows: an empty share
        assert x.shape == (0, 64) and y.shape == (0,)
        with pytest.raises(DatasetError, match="shard index 5 outside"):
            ds.load_share("test", 5, 5)


@pytest.mark.parametrize("split,row", [("train", 41), ("test", 0)])
def test_a_label_out_of_range_is_named_by_the_scan_and_by_the_read_that_meets_it(tmp_path, split, row):
    """Opening reads no labels, so a bad label is found by check_values (the root's chunked
    pass before a run, naming split and first bad row) and by any load that reads it."""
    path = tmp_path / "d.h5"
    small_dataset(path, n_train=50, n_test=6)
    with h5py.File(path, "r+") as f:
        f[f"{split}/y"][row] = 3
        f[f"{split}/y"][row + 4] = -1
    with data.open_dataset(path) as ds:
        with pytest.raises(DatasetError, match=rf"d\.h5: /{split}/y has labels outside \[0, 3\), "
                                               rf"the first at row {row} \(label 3\)"):
            ds.check_values(chunk_bytes=64)  # 4 rows of x, 16 labels a chunk
        with pytest.raises(DatasetError, match=rf"/{split}/y has labels outside \[0, 3\), the first at "
                                               rf"row {row + 4} \(label -1\)"):
            ds.load(split, row + 1, row + 6)
        x, y = ds.load(split, row + 1, row + 4)  # rows without a bad label read fine
        assert len(y) == 3 and (y >= 0).all() and (y < 3).all()


def image_file(tmp_path, n: int, cols: int):
    """A data set of n random 8 x cols images (labels all 0): (its path, the training x)."""
    path = tmp_path / "images.h5"
    tx = np.random.default_rng(2).random((n, 8, cols, 1), dtype=np.float32)
    data.write_dataset(path, tx, np.zeros(n, np.int32), tx[:10], np.zeros(10, np.int32),
                       attrs={"source": "test", "n_classes": 2})
    return path, tx


@pytest.mark.parametrize("rows", [(0, 4), (4, 8), (2, 3)])
def test_a_band_of_input_rows_reads_only_the_band_where_the_rest_spans_a_page(tmp_path, rows):
    """A partition split by rows reads its band of each example, not whole examples (HDF5's
    64 KiB sieve would read whole ones: 8x here for one row in eight), where the rest of an
    example spans a page or more (rows of 1 KiB here: 4 or 7 of 8 left out)."""
    path, tx = image_file(tmp_path, 3000, 256)
    with data.open_dataset(path) as ds:
        before = bytes_read()
        x, y = ds.load("train", 500, 2500, rows=rows)
        read = bytes_read() - before
    np.testing.assert_array_equal(x, tx[500:2500, rows[0]:rows[1]])
    assert x.flags.c_contiguous
    assert read <= x.nbytes + y.nbytes + METADATA_ALLOWANCE, (read, x.nbytes)


def test_a_band_of_small_examples_is_cut_from_whole_ones_read_in_bounded_chunks(tmp_path, monkeypatch):
    """Below a page of other rows per example, reading each band alone costs a read call per
    example and saves no disk reads: whole examples are read, CHUNK_BYTES at a time."""
    monkeypatch.setattr(data, "CHUNK_BYTES", 4096)  # 8 examples of 512 bytes a chunk
    path, tx = image_file(tmp_path, 1000, 16)
    with data.open_dataset(path) as ds:
        for start, stop, rows in ((3, 998, (2, 5)), (0, 1, (0, 8)), (7, 7, (1, 2)), (100, 117, (7, 8))):
            before = bytes_read()
            x, y = ds.load("train", start, stop, rows=rows)
            read = bytes_read() - before
            np.testing.assert_array_equal(x, tx[start:stop, rows[0]:rows[1]])
            assert x.flags.c_contiguous and len(y) == stop - start
            assert read <= (stop - start) * (512 + 4) + METADATA_ALLOWANCE
        with pytest.raises(DatasetError, match=r"input rows \[3, 9\) are outside the examples' 8 rows"):
            ds.load("train", 0, 5, rows=(3, 9))
