"""Range-direct initialisation: any canonical range's initial values, bit-identical to the
whole vector's as every earlier release drew it (so old checkpoints and runs stay valid)."""
import math

import numpy as np
import pytest

from dbmpi.model import Network
from dbmpi.model import network as network_module
from tests.models import DENSE_ON_IMAGE, LOCAL_DENSE, MIXED_UNEVEN, mixed_spatial

MODELS = {"mixed_softmax": mixed_spatial("softmax"), "mixed_logistic": mixed_spatial("logistic"),
          "uneven_relu": MIXED_UNEVEN, "local_dense_relu": LOCAL_DENSE, "dense_on_image_relu": DENSE_ON_IMAGE}


def reference_init(net: Network, seed: int) -> np.ndarray:
    """The former formula, written out: layer i draws all of its W at once with
    default_rng([seed, i]).uniform(-limit, limit, W.shape).astype(float32) (He for relu,
    Glorot otherwise, over the layer's fans); b is zero."""
    full = np.zeros(net.n_params, np.float32)
    for index, layer in enumerate(net.layers):
        if not layer.has_params:
            continue
        if layer.kind == "local":
            fan_in, fan_out = layer.patch, layer.filters
        else:
            fan_in, fan_out = layer.n_in, layer.units
        relu = getattr(layer, "activation", None) == "relu"
        limit = math.sqrt(6.0 / fan_in) if relu else math.sqrt(6.0 / (fan_in + fan_out))
        w = next(t for t in net.tensors if t.layer == index and t.name.endswith(".W"))
        values = np.random.default_rng([seed, index]).uniform(-limit, limit, size=w.shape).astype(np.float32)
        full[w.offset:w.offset + w.size] = values.ravel()
    return full


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_whole_vector_is_the_former_initialisation(name):
    net = Network.from_string(MODELS[name])
    assert {layer.kind for layer in net.layers if layer.has_params} <= {"local", "dense", "softmax", "logistic"}
    assert np.array_equal(net.params, reference_init(net, net.seed))
    net.init_params(seed=11)
    assert np.array_equal(net.params, reference_init(net, 11))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_any_range_is_bit_identical_to_the_whole_vector(name, monkeypatch):
    # A tiny chunk makes every range cross chunk boundaries as well as tensors and layers.
    monkeypatch.setattr(network_module, "INIT_CHUNK", 7)
    net = Network.from_string(MODELS[name])
    structure = Network(net.config, allocate=False)
    full = reference_init(net, net.seed)
    rng = np.random.default_rng(0)
    n = net.n_params
    ranges = [(0, n), (0, 0), (n, n), (n - 1, n), (0, 1)]
    ranges += [tuple(sorted(rng.integers(0, n + 1, 2))) for _ in range(60)]
    # Every tensor boundary, with a value either side.
    ranges += [(max(t.offset - 1, 0), min(t.offset + 1, n)) for t in net.tensors]
    for lo, hi in ranges:
        got = structure.initial_values(int(lo), int(hi))
        assert got.dtype == np.float32 and got.shape == (hi - lo,)
        assert np.array_equal(got, full[lo:hi]), (name, lo, hi)
    assert not structure.allocated and not hasattr(structure, "params")


def test_initial_values_writes_into_a_given_slice_and_checks_it():
    net = Network.from_string(MODELS["mixed_softmax"])
    out = np.full(net.n_params, np.nan, np.float32)
    net.initial_values(5, 40, out[5:40])
    assert np.array_equal(out[5:40], net.params[5:40])
    assert np.isnan(out[:5]).all() and np.isnan(out[40:]).all()
    with pytest.raises(ValueError, match="outside"):
        net.initial_values(3, net.n_params + 1)
    with pytest.raises(ValueError, match="out: expected float32"):
        net.initial_values(0, 4, np.zeros(4, np.float64))


def test_a_structure_allocates_once_when_a_role_needs_the_model():
    net = Network(Network.from_string(MODELS["mixed_softmax"]).config, allocate=False)
    assert not net.allocated
    assert net.allocate() is net and net.allocated
    first = net.params
    net.params[:] = 1.0
    assert net.allocate() is net and net.params is first and (net.params == 1.0).all()  # a no-op
    fresh = Network(net.config, allocate=False).allocate(initialise=False)
    assert not fresh.params.any()
