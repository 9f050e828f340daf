"""Helpers behind the ``mnist`` and ``synthetic`` data sources of ``dbmpi.data``.

* ``fetch``: download one file over HTTP(S) with urllib into a cache, verifying its SHA-256
  before it is used; the download goes to a temp name and is renamed only once it checks out.
* ``Teacher`` and ``synthetic_blocks``: the fixed random network that labels synthetic data,
  and the seeded, chunked generator of (x, y) blocks.

The sources themselves (``prepare_mnist``, ``prepare_synthetic``), their constants and
their documentation live in ``dbmpi.data``; this module is pure Python + numpy too.
"""
from __future__ import annotations

import hashlib
import http.client
import math
import os
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import numpy as np

from dbmpi.data import DatasetError, _err
from dbmpi.io.atomic import atomic_path

__all__ = ["default_cache_dir", "sha256_file", "fetch", "Teacher", "synthetic_blocks"]


# --------------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------------

def default_cache_dir(name: str) -> Path:
    """``$XDG_CACHE_HOME/dbmpi/<name>``, by default ``~/.cache/dbmpi/<name>``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dbmpi" / name


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unverified(dest: Path, digest: str) -> None:
    warnings.warn(f"{dest}: no known SHA-256 for this file, so it was accepted unverified; "
                  f"its SHA-256 is {digest}", stacklevel=3)


def fetch(url: str, dest, sha256: str | None, *, timeout: float = 30.0,
          hint: str = "pass a directory holding the files with --source-dir DIR") -> str:
    """Make ``dest`` a verified copy of ``url`` and return its SHA-256 (hex).

    A ``dest`` already present whose digest is ``sha256`` is used as is (no network). A
    present file with another digest is a stale or corrupt cache entry: it is deleted and
    downloaded again. The download is streamed to ``.<name>.tmp-<pid>`` beside ``dest``,
    fsynced, checked and only then renamed onto ``dest``; a digest mismatch deletes it and
    raises ``DatasetError`` naming the file and both digests. ``sha256=None`` means "not yet
    known": the file is accepted with a warning that gives its digest. Network failures
    (no route, refused, timed out after ``timeout`` seconds of silence) raise
    ``DatasetError`` saying the machine seems offline, followed by ``hint``.
    """
    dest = Path(dest)
    expected = None if sha256 is None else sha256.strip().lower()
    if dest.is_file():
        got = sha256_file(dest)
        if expected is None:
            _unverified(dest, got)
            return got
        if got == expected:
            return got
        dest.unlink()  # a stale or corrupt cache entry: fetch it again
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _err(dest.parent, f"cannot create the download cache directory: {e}") from None
    h = hashlib.sha256()
    with atomic_path(dest) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    f.write(chunk)
                    h.update(chunk)
                f.flush()
        except urllib.error.HTTPError as e:
            raise DatasetError(f"{url}: download failed: the server answered HTTP {e.code} "
                               f"{e.reason}; check the URL (--url), or {hint}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            host = urllib.parse.urlsplit(url).netloc or url
            raise DatasetError(f"{url}: download failed ({type(e).__name__}: {reason}); this "
                               f"machine seems to be offline or cannot reach {host}. Download "
                               f"the files elsewhere and {hint}") from None
        except OSError as e:
            raise _err(dest, f"cannot write the download: {e}") from None
        got = h.hexdigest()
        if expected is not None and got != expected:
            raise _err(dest.name, f"SHA-256 mismatch for the download from {url}: expected "
                                  f"{expected}, got {got}; the download was deleted (a damaged "
                                  f"transfer, or the server holds a different file)")
    if expected is None:
        _unverified(dest, got)
    return got


# --------------------------------------------------------------------------------------------
# Synthetic data: a fixed random teacher network
# --------------------------------------------------------------------------------------------

# Standard-normal inputs are clipped here, so the file's x_range is a true bound; a value
# beyond 6 sigma turns up about twice in a billion.
NORMAL_CLIP = 6.0


class Teacher:
    """A fixed random 2-layer tanh network: ``labels = argmax(tanh(s(x) @ W1) @ W2)``.

    ``s(x)`` standardises the inputs: ``x`` itself for standard-normal inputs, ``(x - 0.5) *
    sqrt(12)`` for uniform [0, 1] (image-like) inputs, so every input has mean 0, variance 1.
    Weights are drawn from ``numpy.random.Generator(PCG64(seed))``, W1 first, then W2:

    * W1 (d x hidden): the Q factor of a standard normal matrix's QR decomposition (signs
      fixed so it is unique): orthonormal columns when d >= hidden, else orthonormal rows
      scaled by sqrt(hidden / d). Either way each hidden pre-activation has variance about
      1, so tanh works in its curved range and the hidden code is roughly isotropic.
    * W2 (hidden x classes): standard normal with every column scaled to unit length, so no
      class logit has a larger scale than another and argmax is spread over all classes.

    No biases. Logits are computed in float64 so ties between classes are vanishingly rare.
    """

    def __init__(self, input_shape, n_classes: int, hidden: int, seed: int, *, image: bool):
        self.input_shape = tuple(int(d) for d in input_shape)
        self.d = math.prod(self.input_shape)
        self.n_classes, self.hidden, self.seed, self.image = int(n_classes), int(hidden), int(seed), image
        rng = np.random.Generator(np.random.PCG64(self.seed))
        d, hidden = self.d, self.hidden
        q, r = np.linalg.qr(rng.standard_normal((max(d, hidden), min(d, hidden))))
        q *= np.where(np.diag(r) < 0, -1.0, 1.0)
        self.W1 = q if d >= hidden else q.T * math.sqrt(hidden / d)
        w2 = rng.standard_normal((hidden, self.n_classes))
        self.W2 = w2 / np.linalg.norm(w2, axis=0)

    def logits(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(len(x), self.d)
        if self.image:
            x = (x - 0.5) * math.sqrt(12.0)
        return np.tanh(x @ self.W1) @ self.W2

    def labels(self, x: np.ndarray) -> np.ndarray:
        return self.logits(x).argmax(axis=1).astype(np.int32)

    def describe(self) -> str:
        s = "(x - 0.5) * sqrt(12)" if self.image else "x"
        return (f"labels = argmax(tanh({s} @ W1) @ W2), float64, no biases; W1 ({self.d} x "
                f"{self.hidden}) orthonormal from the QR of a standard normal matrix"
                f"{'' if self.d >= self.hidden else f' (rows, scaled by sqrt({self.hidden}/{self.d}))'}, "
                f"W2 ({self.hidden} x {self.n_classes}) standard normal with unit-norm columns; "
                f"drawn in that order from numpy Generator(PCG64({self.seed}))")


def chunk_rows(d: int, hidden: int, n_classes: int, budget_bytes: int = 64 << 20) -> int:
    """Rows per generated block: at most 4096, and few enough that the float64 work arrays
    (inputs, hidden code, logits) stay near ``budget_bytes`` each."""
    return max(1, min(4096, budget_bytes // (8 * max(d, hidden, n_classes))))


def synthetic_blocks(teacher: Teacher, n: int, *, stream: int, label_noise: float = 0.0):
    """Yield (x float32, y int32) blocks of ``n`` rows labelled by ``teacher``.

    Inputs come from ``Generator(PCG64([seed, stream]))`` (stream 1: train, 2: test, so the
    test rows do not depend on n_train). Label noise: each label is replaced, with
    probability ``label_noise``, by a class drawn uniformly at random (coin flips from
    ``[seed, stream, 1]``, classes from ``[seed, stream, 2]``: one draw of each per row, so
    the data do not depend on the block size).
    x is uniform [0, 1) for image-like teachers, else standard normal clipped to +-6.
    """
    shape, k = teacher.input_shape, teacher.n_classes
    rng_x = np.random.Generator(np.random.PCG64([teacher.seed, stream]))
    rng_flip = np.random.Generator(np.random.PCG64([teacher.seed, stream, 1]))
    rng_class = np.random.Generator(np.random.PCG64([teacher.seed, stream, 2]))
    rows = chunk_rows(teacher.d, teacher.hidden, k)
    for start in range(0, n, rows):
        m = min(rows, n - start)
        if teacher.image:
            x = rng_x.random((m, *shape), dtype=np.float32)
        else:
            x = rng_x.standard_normal((m, *shape), dtype=np.float32)
            np.clip(x, -NORMAL_CLIP, NORMAL_CLIP, out=x)
        y = teacher.labels(x)
        if label_noise > 0:
            flip = rng_flip.random(m) < label_noise
            y = np.where(flip, rng_class.integers(0, k, size=m, dtype=np.int32), y).astype(np.int32)
        yield x, y
