"""The sigmoid's vectorised exp (cython_kernels/activations.pxd) against float64, through
dense_forward: accuracy over a dense grid and the tails, infinities, NaN, loop tails."""
import numpy as np
import pytest

from dbmpi.kernels import dense_forward

F32 = np.finfo(np.float32)
SPECIAL = [0.0, -0.0, 1e-8, -1e-8, 1e-30, -1e-30, 1e-40, -1e-40, 0.5, -0.5, 1.0, -1.0,
           16.6, -16.6, 16.7, -16.7, 87.3, -87.3, 87.33654, -87.33654, 87.5, -87.5,
           87.68, -87.68, 88.0, -88.0, 88.38, -88.38, 88.72, -88.72, 88.73, -88.73,
           88.75, -88.75, 89.0, -89.0, 100.0, -100.0, 1e4, -1e4, 1e30, -1e30,
           F32.max, -F32.max, np.inf, -np.inf, np.nan]


def sigmoid64(z):
    z = np.asarray(z, dtype=np.float64)
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))


def sigmoid_kernel(z):
    """sigmoid(z) by dense_forward with one input unit, weight 1 and bias 0: y = z exactly."""
    z = np.ascontiguousarray(z, dtype=np.float32).reshape(-1, 1)
    y = np.full(z.shape, -1.0, np.float32)
    dense_forward(z, np.ones((1, 1), np.float32), np.zeros(1, np.float32), y, "sigmoid")
    return y.reshape(-1)


def check_sigmoid(z, y):
    z = np.asarray(z, np.float32).reshape(-1)
    y = np.asarray(y).reshape(-1)
    nan = np.isnan(z)
    assert np.isnan(y[nan]).all(), "NaN input must give NaN"
    z, y = z[~nan], y[~nan].astype(np.float64)
    assert not np.isnan(y).any()
    assert ((y >= 0.0) & (y <= 1.0)).all(), "sigmoid output outside [0, 1]"
    ref = sigmoid64(z)
    big = ref > 1e-30
    rel = np.abs(y[big] - ref[big]) / ref[big]
    assert rel.max(initial=0.0) <= 4e-7, (
        f"max rel err {rel.max():.3g} at z = {z[big][rel.argmax()]!r}")
    # Below 1e-30 an absolute 1e-37, plus the relative bound: on its own 1e-37 would ask
    # for a relative 1e-7 (under 1 ulp) just below 1e-30 (the all-float32 sweep finds
    # 1.05e-37 at z = -69.32, where the reference is 8.4e-31).
    tiny = np.abs(y[~big] - ref[~big]) - 4e-7 * ref[~big]
    assert tiny.max(initial=0.0) <= 1e-37, (
        f"abs err {tiny.max():.3g} over 4e-7 ref at z = {z[~big][tiny.argmax()]!r}")


def test_dense_grid_and_special_values():
    z = np.concatenate([np.linspace(-100, 100, 400_001, dtype=np.float32),
                        np.array(SPECIAL, np.float32)])
    assert 0.0 in z
    check_sigmoid(z, sigmoid_kernel(z))


def test_every_float_near_the_cutoffs():
    # exp(-z) flushes to 0 below 2^-126.5 (z > ~87.7), becomes inf above 2^127.5
    # (z < ~-88.38) and |z| is clamped at 88.75: every float32 with 87.2 <= |z| <= 89.
    lo, hi = np.float32(87.2).view(np.int32), np.float32(89.0).view(np.int32)
    a = np.arange(lo, hi + 1, dtype=np.int32).view(np.float32)
    z = np.concatenate([a, -a])
    check_sigmoid(z, sigmoid_kernel(z))


def test_random_bit_patterns(rng):
    # All exponents, subnormals, infinities and NaN payloads of either sign.
    z = rng.integers(0, 2**32, 1_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    check_sigmoid(z, sigmoid_kernel(z))


def test_worst_cases_of_the_all_float32_sweep():
    # Largest relative error over all 2^32 float32 inputs (1.92e-7, 3.2 ulp) and largest
    # absolute error where the reference is below 1e-30.
    z = np.array([-16.6498547, -69.3195114], np.float32)
    check_sigmoid(z, sigmoid_kernel(z))


def test_exact_values():
    z = np.array([np.inf, -np.inf, 0.0, -0.0, 1e4, -1e4, 89.0, -89.0, F32.max, -F32.max],
                 np.float32)
    np.testing.assert_array_equal(sigmoid_kernel(z),
                                  [1.0, 0.0, 0.5, 0.5, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0])


@pytest.mark.parametrize("n", list(range(1, 20)) + [31, 33, 1000])
def test_every_length_and_nan_position(n):
    # The vectorised loop has a scalar tail: every element of short arrays, NaN anywhere.
    z = np.linspace(-30, 30, n, dtype=np.float32)
    for k in range(n):
        zk = z.copy()
        zk[k] = np.nan
        y = sigmoid_kernel(zk)
        assert np.isnan(y[k]) and not np.isnan(np.delete(y, k)).any()
        check_sigmoid(zk, y)


@pytest.mark.parametrize("n,units", [(1, 1), (3, 5), (7, 16), (16, 33)])
def test_identity_weights_with_bias(rng, n, units):
    # y = sigmoid(x @ eye + b) = sigmoid(fl32(x + b)): one nonzero product per output.
    x = (rng.uniform(-100, 100, (n, units))).astype(np.float32)
    x.flat[:: 3] = rng.choice(np.array([0.0, 1e-8, -1e-8, 88.0, -88.0, 1e4, -1e4], np.float32),
                              x.flat[:: 3].shape)
    b = rng.uniform(-5, 5, units).astype(np.float32)
    y = np.empty((n, units), np.float32)
    dense_forward(x, np.eye(units, dtype=np.float32), b, y, "sigmoid")
    check_sigmoid(x + b, y)
