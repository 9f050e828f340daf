"""Optimizer kernels and L-BFGS vector ops against NumPy."""
import numpy as np
import pytest

from dbmpi import kernels
from tests.conftest import assert_close, randn

SIZES = [1, 7, 1000, 4097]


@pytest.mark.parametrize("n", SIZES)
def test_sgd_step(rng, n):
    p, g = randn(rng, n), randn(rng, n)
    expect = p.astype(np.float64) - 0.1 * g
    kernels.sgd_step(p, g, 0.1)
    assert_close(p, expect, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n", SIZES)
def test_momentum_step(rng, n):
    p, g, v = randn(rng, n), randn(rng, n), randn(rng, n)
    v_ref = 0.9 * v.astype(np.float64) + g
    p_ref = p - 0.05 * v_ref
    kernels.momentum_step(p, g, v, 0.05, 0.9)
    assert_close(v, v_ref, rtol=1e-6, atol=1e-6)
    assert_close(p, p_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", SIZES)
def test_adagrad_step_over_several_steps(rng, n):
    p = randn(rng, n)
    acc = np.full(n, 0.1, np.float32)
    p64, acc64 = p.astype(np.float64), acc.astype(np.float64)
    for _ in range(3):
        g = randn(rng, n)
        acc64 += g.astype(np.float64) ** 2
        p64 -= 0.5 * g / (np.sqrt(acc64) + 1e-8)
        kernels.adagrad_step(p, g, acc, 0.5, 1e-8)
    assert_close(acc, acc64, rtol=1e-5, atol=1e-6)
    assert_close(p, p64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", SIZES)
def test_nesterov_step_over_several_steps(rng, n):
    p, v = randn(rng, n), np.zeros(n, np.float32)
    p64, v64 = p.astype(np.float64), v.astype(np.float64)
    for _ in range(3):
        g = randn(rng, n)
        v64 = 0.9 * v64 + g
        p64 -= 0.05 * (g + 0.9 * v64)
        kernels.nesterov_step(p, g, v, 0.05, 0.9)
    assert_close(v, v64, rtol=1e-5, atol=1e-6)
    assert_close(p, p64, rtol=1e-5, atol=1e-6)


def adam_reference(p, m, v, g, t, lr, b1, b2, eps, wd):
    """Adam(W) in float64, as torch.optim.AdamW documents it (wd = 0: Adam)."""
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adam_step_over_several_steps(rng, n, wd):
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    p = randn(rng, n)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    p64, m64, v64 = p.astype(np.float64), m.astype(np.float64), v.astype(np.float64)
    for t in range(1, 5):
        g = randn(rng, n)
        p64, m64, v64 = adam_reference(p64, m64, v64, g.astype(np.float64), t, lr, b1, b2, eps, wd)
        kernels.adam_step(p, g, m, v, lr / (1 - b1 ** t), b1, b2, 1 / np.sqrt(1 - b2 ** t), eps, 1 - lr * wd)
    assert_close(m, m64, rtol=1e-5, atol=1e-6)
    assert_close(v, v64, rtol=1e-5, atol=1e-6)
    assert_close(p, p64, rtol=1e-5, atol=1e-5)


def test_dot_accumulates_in_float64():
    # 2**25 ones: a float32 accumulator stalls at 2**24, float64 is exact.
    x = np.ones(2**25, np.float32)
    assert kernels.dot(x, x) == 2.0**25
    assert isinstance(kernels.dot(x[:3], x[:3]), float)


@pytest.mark.parametrize("n", SIZES)
def test_vector_ops(rng, n):
    x, y = randn(rng, n), randn(rng, n)
    assert kernels.dot(x, y) == pytest.approx(float(x.astype(np.float64) @ y), rel=1e-9, abs=1e-9)
    y_ref = y + 0.25 * x.astype(np.float64)
    kernels.axpy(0.25, x, y)
    assert_close(y, y_ref, rtol=1e-6, atol=1e-7)
    x_ref = -2.0 * x.astype(np.float64)
    kernels.scale(-2.0, x)
    assert_close(x, x_ref, rtol=0, atol=0)
    out = np.empty_like(x)
    kernels.multiply(x, y, out)
    assert_close(out, x.astype(np.float64) * y, rtol=1e-6, atol=1e-7)
    kernels.multiply(x, y, x)  # in place
    assert_close(x, out, rtol=0, atol=0)
    kernels.copy(y, out)
    assert np.array_equal(out, y)


def test_axpy_count_nonfinite(rng):
    x, y = randn(rng, 100), randn(rng, 100)
    expect = y + 0.5 * x.astype(np.float64)
    assert kernels.axpy_count_nonfinite(0.5, x, y) == 0
    assert_close(y, expect, rtol=1e-6, atol=1e-7)
    x[[3, 50]] = [np.nan, np.inf]
    assert kernels.axpy_count_nonfinite(1.0, x, y) == 2
    x[:] = 0
    assert kernels.axpy_count_nonfinite(1.0, x, y) == 2  # non-finite values stay counted in y


def test_count_nonfinite():
    x = np.zeros(10, np.float32)
    assert kernels.count_nonfinite(x) == 0
    x[[1, 4, 9]] = [np.nan, np.inf, -np.inf]
    assert kernels.count_nonfinite(x) == 3


@pytest.mark.parametrize("call,name", [
    (lambda a, b: kernels.sgd_step(a, b[:-1], 0.1), "grad"),
    (lambda a, b: kernels.sgd_step(a.astype(np.float64), b, 0.1), "param"),
    (lambda a, b: kernels.adagrad_step(a, b, b[::2].copy(), 0.1), "accum"),
    (lambda a, b: kernels.momentum_step(a, b, np.zeros((2, 5), np.float32), 0.1, 0.9), "velocity"),
    (lambda a, b: kernels.nesterov_step(a, b, np.zeros(9, np.float32), 0.1, 0.9), "velocity"),
    (lambda a, b: kernels.adam_step(a, b, np.zeros(10, np.float32), b[::2].copy(), 0.1, 0.9, 0.999, 1.0, 1e-8), "v"),
    (lambda a, b: kernels.adam_step(a, b, np.zeros(9, np.float32), a.copy(), 0.1, 0.9, 0.999, 1.0, 1e-8), "m"),
    (lambda a, b: kernels.dot(a, b[::-1]), "y"),
    (lambda a, b: kernels.axpy(1.0, a[None], b), "x"),
    (lambda a, b: kernels.multiply(a, b, np.empty(9, np.float32)), "out"),
    (lambda a, b: kernels.copy(a, np.empty(10, np.int32)), "out"),
])
def test_bad_arguments_name_the_argument(rng, call, name):
    a, b = randn(rng, 10), randn(rng, 10)
    with pytest.raises(ValueError, match=f"^{name}:"):
        call(a, b)


def test_read_only_parameter_is_rejected(rng):
    p, g = randn(rng, 4), randn(rng, 4)
    p.flags.writeable = False
    with pytest.raises(ValueError, match="^param: must be writeable"):
        kernels.sgd_step(p, g, 0.1)
