"""Softmax cross-entropy and one-vs-all logistic outputs: values, gradients, stability."""
import numpy as np
import pytest

from dbmpi.kernels import logistic_ova_loss, softmax_xent_loss
from tests.conftest import assert_close, numeric_grad, randn


def softmax_ref(z, labels):
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return np.exp(logp), -logp[np.arange(len(z)), labels].mean()


def logistic_ref(z, labels):
    t = np.eye(z.shape[1])[labels]
    p = 1.0 / (1.0 + np.exp(-z))
    bce = np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))
    return p, bce.sum() / len(z)


CASES = [(softmax_xent_loss, softmax_ref), (logistic_ova_loss, logistic_ref)]
SHAPES = [(1, 1), (1, 10), (7, 3), (33, 17)]


@pytest.mark.parametrize("kernel,ref", CASES)
@pytest.mark.parametrize("n,k", SHAPES)
def test_loss_probs_and_grad(rng, kernel, ref, n, k):
    z = randn(rng, n, k, scale=3.0)
    labels = rng.integers(0, k, n).astype(np.int32)
    probs, grad = np.empty_like(z), np.empty_like(z)
    loss = kernel(z, labels, probs, grad)
    p_ref, loss_ref = ref(z.astype(np.float64), labels)
    assert_close(probs, p_ref, rtol=1e-5, atol=1e-6, name="probs")
    assert abs(loss - loss_ref) <= 1e-5 * max(1.0, abs(loss_ref))
    fd = numeric_grad(lambda v: ref(v, labels)[1], z.astype(np.float64))
    assert_close(grad, fd, rtol=1e-4, atol=1e-6, name="grad")


@pytest.mark.parametrize("kernel,ref", CASES)
def test_scale_and_no_grad(rng, kernel, ref):
    z = randn(rng, 5, 4)
    labels = np.array([0, 1, 2, 3, 0], np.int32)
    probs, grad = np.empty_like(z), np.empty_like(z)
    mean = kernel(z, labels, probs, grad)
    total = kernel(z, labels, probs, None, scale=1.0)
    assert total == pytest.approx(5 * mean, rel=1e-12)
    grad2 = np.empty_like(z)
    kernel(z, labels, probs, grad2, scale=2.0)
    assert_close(grad2, 10 * grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kernel", [softmax_xent_loss, logistic_ova_loss])
def test_extreme_logits_stay_finite(kernel):
    z = np.array([[1e4, -1e4, 0.0], [-3e4, 3e4, 88.0]], np.float32)
    labels = np.array([1, 0], np.int32)  # confidently wrong: huge but finite loss
    probs, grad = np.empty_like(z), np.empty_like(z)
    loss = kernel(z, labels, probs, grad)
    assert np.isfinite(loss) and loss > 1e4
    assert np.isfinite(probs).all() and np.isfinite(grad).all()


@pytest.mark.parametrize("kernel", [softmax_xent_loss, logistic_ova_loss])
@pytest.mark.parametrize("bad", [-1, 3, 1000])
def test_label_out_of_range_is_rejected(kernel, bad):
    z = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="^labels: label"):
        kernel(z, np.array([0, bad], np.int32), np.empty_like(z))


@pytest.mark.parametrize("kernel", [softmax_xent_loss, logistic_ova_loss])
def test_bad_arguments_name_the_argument(kernel):
    z = np.zeros((2, 3), np.float32)
    y = np.zeros(2, np.int32)
    with pytest.raises(ValueError, match="^labels: expected dtype int32"):
        kernel(z, y.astype(np.int64), np.empty_like(z))
    with pytest.raises(ValueError, match="^labels: expected shape"):
        kernel(z, np.zeros(3, np.int32), np.empty_like(z))
    with pytest.raises(ValueError, match="^logits: expected dtype float32"):
        kernel(z.astype(np.float64), y, np.empty_like(z))
    with pytest.raises(ValueError, match="^probs: expected shape"):
        kernel(z, y, np.empty((3, 2), np.float32))
    with pytest.raises(ValueError, match="^grad: must be C-contiguous"):
        kernel(z, y, np.empty_like(z), np.empty((3, 2), np.float32).T)
