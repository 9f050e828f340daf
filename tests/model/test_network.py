"""Network: canonical parameter layout, deterministic init, gradients, fused SGD step."""
from pathlib import Path

import numpy as np
import pytest

from dbmpi.config import ConfigError
from dbmpi.model import Network
from tests.models import LOCAL_DENSE, MIXED_UNEVEN, mixed_spatial

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

def mixed(output="softmax"):
    return Network.from_string(mixed_spatial(output))


def test_speech_model_has_the_papers_42m_parameters():
    net = Network.from_toml(CONFIGS / "speech.toml")
    expected = (440 * 2560 + 2560) + 3 * (2560 * 2560 + 2560) + (2560 * 8192 + 8192)
    assert net.n_params == expected == 41_777_152
    assert [t.name for t in net.tensors][:2] == ["dense0.W", "dense0.b"]


def test_image_and_mlp_configs_build():
    image = Network.from_toml(CONFIGS / "image_local.toml")
    assert [layer.kind for layer in image.layers] == ["local", "l2pool", "lcn", "local", "l2pool", "lcn", "softmax"]
    assert image.layers[0].output_shape == (24, 24, 8)
    assert image.layers[-2].output_shape == (4, 4, 16)
    mlp = Network.from_toml(CONFIGS / "mlp_fashion.toml")
    assert mlp.n_params == 784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10


def test_tensors_tile_the_flat_vector_output_unit_major():
    net = mixed()
    offset = 0
    for t in net.tensors:
        assert t.offset == offset
        offset += t.size
    assert offset == net.n_params == net.params.size
    views = net.named_params()
    for t in net.tensors:
        assert np.shares_memory(views[t.name], net.params)
    # A block of output rows of the first local layer is one contiguous range of its W.
    w = net.tensors[0]
    rows, cols, filters, patch = w.shape
    block = net.params[w.offset + 2 * cols * filters * patch: w.offset + 5 * cols * filters * patch]
    assert np.array_equal(block, views["local0.W"][2:5].ravel())
    # Writing the flat vector updates the layers (views, never copies).
    net.params[:] = 0.5
    assert np.all(net.layers[0].params["W"] == 0.5)


def test_initialisation_is_deterministic_and_per_layer():
    a, b = mixed(), mixed()
    assert np.array_equal(a.params, b.params)
    b.init_params(seed=4)
    assert not np.array_equal(a.params, b.params)
    # Changing a later layer leaves earlier layers' initial values unchanged.
    c = Network.from_string(mixed_spatial("softmax").replace("units = 7", "units = 9"))
    assert np.array_equal(a.named_params()["local0.W"], c.named_params()["local0.W"])
    for t in a.tensors:
        if t.name.endswith(".b"):
            assert not a.view(t, a.params).any()
        else:
            assert a.view(t, a.params).std() > 0


@pytest.mark.parametrize("output", ["softmax", "logistic"])
def test_gradient_matches_directional_differences(output):
    net = mixed(output)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 10, 9, 2)).astype(np.float32)
    labels = rng.integers(0, 4, 5).astype(np.int32)
    net.loss_and_grad(x, labels)
    grad = net.grad.astype(np.float64).copy()
    base = net.params.copy()
    for _ in range(4):
        d = rng.standard_normal(net.n_params)
        d /= np.linalg.norm(d)
        eps = 1e-2
        net.params[:] = base + eps * d
        plus = net.loss(x, labels)
        net.params[:] = base - eps * d
        minus = net.loss(x, labels)
        net.params[:] = base
        numeric, analytic = (plus - minus) / (2 * eps), grad @ d
        assert numeric == pytest.approx(analytic, rel=2e-2, abs=2e-4)


def test_fused_sgd_step_equals_gradient_then_update():
    a, b = mixed(), mixed()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 10, 9, 2)).astype(np.float32)
    labels = rng.integers(0, 4, 6).astype(np.int32)
    loss_a = a.loss_and_grad(x, labels)
    expected = a.params - 0.1 * a.grad
    loss_b = b.sgd_step(x, labels, 0.1)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    np.testing.assert_allclose(b.params, expected, rtol=1e-5, atol=1e-6)


def test_predict_and_evaluate_agree():
    net = mixed()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((23, 10, 9, 2)).astype(np.float32)
    labels = rng.integers(0, 4, 23).astype(np.int32)
    pred = net.predict(x, batch_size=5)
    loss, acc = net.evaluate(x, labels, batch_size=7)
    assert acc == pytest.approx(np.mean(pred == labels))
    assert loss == pytest.approx(net.loss(x, labels), rel=1e-5)
    # Flat examples of the right size are accepted, a wrong size is not.
    assert np.array_equal(net.predict(x.reshape(23, -1), batch_size=5), pred)
    with pytest.raises(ValueError, match="^x: expected examples of shape"):
        net.forward(np.zeros((2, 10, 9, 3), np.float32))
    with pytest.raises(ValueError, match="^labels: expected shape"):
        net.loss_and_grad(x, labels[:-1])


def test_layer_that_does_not_fit_its_input_names_the_key():
    text = mixed_spatial("softmax").replace("kernel = 3", "kernel = 11")
    with pytest.raises(ConfigError, match=r"model.layers\[0\].kernel: 11 is larger than the input"):
        Network.from_string(text)
    text = """
[model]
input_shape = [12]
[[model.layers]]
type = "local"
filters = 2
kernel = 3
activation = "relu"
[[model.layers]]
type = "softmax"
units = 2
"""
    with pytest.raises(ConfigError, match=r"model.layers\[0\]: a local layer needs"):
        Network.from_string(text)


@pytest.mark.parametrize("text", [mixed_spatial("softmax"), mixed_spatial("logistic"), MIXED_UNEVEN, LOCAL_DENSE])
def test_activation_bytes_are_the_buffers_the_passes_keep(text):
    """dbmpi plan's activation term (dbmpi.runtime.memory) is exactly what the layers hold."""
    rng = np.random.default_rng(0)
    for training in (True, False):
        net = Network.from_string(text)
        x = rng.random((6,) + net.input_shape).astype(np.float32)
        labels = np.zeros(6, np.int32)
        net.loss_and_grad(x, labels) if training else net.evaluate(x, labels)
        held = sum(buf.nbytes for layer in net.layers for buf in layer._buffers.values())
        assert held == net.activation_bytes(6, training=training) > 0
