"""What docs/API.md says about the flat parameter vector, checked against the code: the
canonical order, every built-in layer's tensor shapes and how its forward pass reads them
(the dense layer's (rows, cols, maps) flattening, the local layer's (dy, dx, c) patches),
the PyTorch adapter's names, views and NCHW input, and the kernels' argument contract.
Each reference below is written from the page's statements in plain numpy loops."""
import numpy as np
import pytest

from dbmpi import kernels
from dbmpi.model import FlatModel, Network, tensors_of

# A 3x3/2 local layer on 7x6x2 input: the start of SPATIAL, and with a softmax the model of
# test_local_w_patch_order_is_dy_dx_c.
LOCAL_3X3 = """
[model]
input_shape = [7, 6, 2]
[[model.layers]]
type = "local"
filters = 3
kernel = 3
stride = 2
activation = "identity"
"""

SPATIAL = LOCAL_3X3 + """
[[model.layers]]
type = "l2pool"
size = 2
[[model.layers]]
type = "lcn"
size = 3
[[model.layers]]
type = "dense"
units = 5
activation = "identity"
[[model.layers]]
type = "logistic"
units = 4
"""


def randomised(network: Network, rng) -> Network:
    network.params[:] = rng.standard_normal(network.n_params).astype(np.float32)
    return network


def test_canonical_vector_is_every_layer_w_then_b_in_layer_order():
    net = Network.from_string(SPATIAL)
    names = [t.name for t in net.tensors]
    assert names == ["local0.W", "local0.b", "dense3.W", "dense3.b", "logistic4.W", "logistic4.b"]
    shapes = {t.name: t.shape for t in net.tensors}
    # local: (out_rows, out_cols, filters, k*k*maps); out = (in - k) // stride + 1
    assert shapes["local0.W"] == (3, 2, 3, 3 * 3 * 2) and shapes["local0.b"] == (3, 2, 3)
    # l2pool 2x2 (stride = size) of (3, 2, 3) -> (1, 1, 3); lcn keeps it; dense flattens it
    assert net.layers[1].output_shape == (1, 1, 3) and net.layers[2].output_shape == (1, 1, 3)
    assert shapes["dense3.W"] == (5, 3) and shapes["logistic4.W"] == (4, 5)
    offsets = [t.offset for t in net.tensors]
    assert offsets == list(np.cumsum([0] + [t.size for t in net.tensors[:-1]]))
    assert net.n_params == sum(t.size for t in net.tensors) == net.params.size == net.grad.size


def test_named_params_and_layers_read_views_of_the_flat_vector(rng):
    net = randomised(Network.from_string(SPATIAL), rng)
    x = rng.standard_normal((2, 7, 6, 2)).astype(np.float32)
    for name, array in net.named_params().items():
        assert np.shares_memory(array, net.params), name
    before = net.forward(x).copy()
    net.params[net.tensors[-1].offset:] += 1.0  # the output bias, written through the flat vector
    assert np.allclose(net.forward(x), before + 1.0, atol=1e-5)
    assert net.output_kind == "logistic" and net.n_classes == 4


def test_dense_w_is_units_by_inputs_over_the_row_major_rows_cols_maps_flattening(rng):
    net = randomised(Network.from_string("""
        [model]
        input_shape = [3, 4, 2]
        [[model.layers]]
        type = "dense"
        units = 5
        activation = "identity"
        [[model.layers]]
        type = "softmax"
        units = 3
    """), rng)
    x = rng.standard_normal((6, 3, 4, 2)).astype(np.float32)
    w, b = net.named_params()["dense0.W"], net.named_params()["dense0.b"]
    assert w.shape == (5, 3 * 4 * 2)
    hidden = np.zeros((6, 5))
    for r in range(3):
        for c in range(4):
            for m in range(2):
                hidden += np.outer(x[:, r, c, m], w[:, (r * 4 + c) * 2 + m])
    hidden += b
    ws, bs = net.named_params()["softmax1.W"], net.named_params()["softmax1.b"]
    assert ws.shape == (3, 5)
    assert np.allclose(net.forward(x), hidden @ ws.T + bs, atol=1e-4)


def test_local_w_patch_order_is_dy_dx_c(rng):
    net = randomised(Network.from_string(LOCAL_3X3 + '[[model.layers]]\ntype = "softmax"\nunits = 2\n'), rng)
    k, s, maps = 3, 2, 2
    x = rng.standard_normal((4, 7, 6, 2)).astype(np.float32)
    w, b = net.named_params()["local0.W"], net.named_params()["local0.b"]
    expected = np.zeros((4, 3, 2, 3))
    for oh in range(3):
        for ow in range(2):
            for f in range(3):
                for dy in range(k):
                    for dx in range(k):
                        for c in range(maps):
                            weight = w[oh, ow, f, (dy * k + dx) * maps + c]
                            expected[:, oh, ow, f] += weight * x[:, oh * s + dy, ow * s + dx, c]
                expected[:, oh, ow, f] += b[oh, ow, f]
    assert np.allclose(net.layers[0].forward(x), expected, atol=1e-4)


def test_initial_values_of_any_range_are_the_whole_vectors_slice():
    net = Network.from_string(SPATIAL)
    whole = net.initial_values(0, net.n_params)
    assert np.array_equal(whole, net.params)
    lo, hi = net.tensors[0].size - 7, net.tensors[2].offset + 3  # straddles tensors and layers
    assert np.array_equal(net.initial_values(lo, hi), whole[lo:hi])
    assert not np.array_equal(net.initial_values(0, net.n_params, seed=1), whole)
    assert np.all(net.named_params()["local0.b"] == 0)


def test_flat_model_base_gives_tensors_views_and_zero_initial_values():
    class Affine(FlatModel):
        def bind(self, params, grad):
            self.w = self.view(self.tensors[0], params)

    model = Affine(tensors_of([("lin.W", (3, 4)), ("lin.b", (3,))]), (4,), 3).allocate()
    assert [(t.name, t.shape, t.offset) for t in model.tensors] == [("lin.W", (3, 4), 0), ("lin.b", (3,), 12)]
    assert model.n_params == 15 and model.params.dtype == np.float32 and not model.params.any()
    model.params[:] = 1.0
    assert np.all(model.w == 1.0) and np.shares_memory(model.w, model.params)
    assert model.partitionable is False and model.output_kind == "softmax"


def test_torch_adapter_names_views_nchw_and_overwritten_gradient(rng):
    torch = pytest.importorskip("torch")
    from dbmpi.model.torch_adapter import TorchModel

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(3 * 3 * 2, 4))
    model = TorchModel(module, (5, 4, 2)).allocate()
    assert [t.name for t in model.tensors] == [n for n, _ in module.named_parameters()]
    assert [t.shape for t in model.tensors] == [tuple(p.shape) for p in module.parameters()]
    for t, p in zip(model.tensors, module.parameters(), strict=True):
        assert p.data_ptr() == model.params.ctypes.data + 4 * t.offset, t.name  # a view at its offset
        assert p.grad.data_ptr() == model.grad.ctypes.data + 4 * t.offset, t.name
    x = rng.standard_normal((3, 5, 4, 2)).astype(np.float32)  # NHWC as the data files store it
    with torch.no_grad():
        nchw = module(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    assert np.allclose(model.forward(x), nchw, atol=1e-5)
    labels = np.array([0, 3, 1])
    model.loss_and_grad(x, labels)
    first = model.grad.copy()
    model.loss_and_grad(x, labels)
    assert first.any() and np.allclose(model.grad, first)  # overwritten, not accumulated


def test_kernels_refuse_wrong_dtype_layout_and_shape_naming_the_argument():
    x = np.zeros((2, 3), np.float32)
    w, b, y = np.zeros((4, 3), np.float32), np.zeros(4, np.float32), np.zeros((2, 4), np.float32)
    kernels.dense_forward(x, w, b, y, "relu")
    with pytest.raises(ValueError, match="x: expected dtype float32"):
        kernels.dense_forward(x.astype(np.float64), w, b, y)
    with pytest.raises(ValueError, match="w: must be C-contiguous"):
        kernels.dense_forward(x, np.zeros((3, 4), np.float32).T, b, y)
    with pytest.raises(ValueError, match=r"y: expected shape \(2, 4\)"):
        kernels.dense_forward(x, w, b, np.zeros((2, 5), np.float32))
    y.flags.writeable = False
    with pytest.raises(ValueError, match="y: must be writeable"):
        kernels.dense_forward(x, w, b, y)
    labels = np.array([0, 4], np.int32)
    with pytest.raises(ValueError, match="labels: label 4"):
        kernels.softmax_xent_loss(np.zeros((2, 4), np.float32), labels, np.zeros((2, 4), np.float32))


def test_torch_recipes_for_dense_columns_and_local_patches(rng):
    """The page's two recipes: a dense W over (rows, cols, maps) as nn.Linear after NCHW
    flattening, and a Conv2d weight as every position's local W (a shared local layer)."""
    torch = pytest.importorskip("torch")
    rows, cols, maps, k = 5, 4, 2, 3
    x = rng.standard_normal((3, rows, cols, maps)).astype(np.float32)
    nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    w = rng.standard_normal((6, rows * cols * maps)).astype(np.float32)
    b, y = np.zeros(6, np.float32), np.empty((3, 6), np.float32)
    kernels.dense_forward(x.reshape(3, -1), w, b, y)
    linear = torch.from_numpy(np.ascontiguousarray(w.reshape(6, rows, cols, maps).transpose(0, 3, 1, 2).reshape(6, -1)))
    assert np.allclose(y, (nchw.flatten(1) @ linear.T).numpy(), atol=1e-4)

    conv = torch.nn.Conv2d(maps, 3, k, bias=False)
    per_position = conv.weight.detach().permute(0, 2, 3, 1).reshape(3, -1).numpy()
    out_rows, out_cols = rows - k + 1, cols - k + 1
    local_w = np.ascontiguousarray(np.broadcast_to(per_position, (out_rows, out_cols) + per_position.shape))
    local_y = np.empty((3, out_rows, out_cols, 3), np.float32)
    kernels.local_forward(x, local_w, np.zeros((out_rows, out_cols, 3), np.float32), local_y, k, 1)
    with torch.no_grad():
        expected = conv(nchw).permute(0, 2, 3, 1).numpy()
    assert np.allclose(local_y, expected, atol=1e-4)
