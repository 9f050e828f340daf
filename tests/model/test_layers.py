"""The layers' banded passes, which model parallelism uses to compute behind its exchanges:
bands of output rows, and a local layer's backward in two halves, give the whole pass's
values bit for bit."""
import numpy as np
import pytest

from dbmpi.model import Network
from tests.models import SPATIAL_BANDS as SPATIAL


@pytest.fixture
def layers():
    network = Network.from_string(SPATIAL)
    rng = np.random.default_rng(3)
    network.params += (0.1 * rng.standard_normal(network.n_params)).astype(np.float32)
    x = rng.standard_normal((5, 13, 9, 2)).astype(np.float32)
    return network.layers[0], network.layers[1], x


def test_forward_rows_in_bands_equal_forward(layers):
    local, pool, x = layers
    for layer, inp in ((local, x), (pool, local.forward(x).copy())):
        whole = layer.forward(inp).copy()
        layer._buffers["y"][...] = np.nan
        rows = layer.output_shape[0]
        for r0, r1 in ((rows // 2, rows), (0, 1), (1, rows // 2)):
            y = layer.forward_rows(inp, r0, r1)
        assert y is layer.y and layer.x is inp
        assert np.array_equal(y, whole), layer.kind


@pytest.mark.parametrize("lr", [None, 0.05])
def test_local_backward_in_two_halves_equals_backward(layers, lr):
    local, _, x = layers
    y = local.forward(x)
    gy = np.random.default_rng(5).standard_normal(y.shape).astype(np.float32)
    before = {k: v.copy() for k, v in local.params.items()}
    gx = local.backward(gy.copy(), True, lr).copy()
    expected = {k: v.copy() for k, v in (local.grads if lr is None else local.params).items()}
    for k, v in before.items():  # undo a fused update, then split the same backward
        local.params[k][...] = v
    for v in local.grads.values():
        v[...] = np.nan
    g = gy.copy()
    split_gx = local.backward_input(g)
    assert np.array_equal(split_gx, gx)
    if lr is None:  # the parameter gradients are not written yet
        assert all(np.isnan(v).all() for v in local.grads.values())
    local.backward_params(g, lr)
    for k, v in (local.grads if lr is None else local.params).items():
        assert np.array_equal(v, expected[k]), k
