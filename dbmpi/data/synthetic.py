"""Synthetic data for the ``synthetic`` source of ``dbmpi.data``: ``Teacher``, the fixed
random network that labels it, and ``synthetic_blocks``, the seeded, chunked generator of
(x, y) blocks. The source itself (``prepare_synthetic``) lives in ``dbmpi.data``; this
module is pure Python + numpy.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["NORMAL_CLIP", "Teacher", "chunk_rows", "synthetic_blocks"]



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
