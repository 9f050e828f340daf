"""Model parallelism: a network split across P partitions computes what the whole network does.

For P in {1, 2, 3, 4} (ranks beyond P skip), each partition runs its blocks on its own input
rows, exchanging activations with the others, and must give the loss, the owned logits,
the predictions and the gradient of its own parameter ranges of the unpartitioned network
on the same batch, within float32 tolerance. The models cover dense-only, the locally
connected image model, and a mix of every spatial layer with uneven splits, halos that
reach over more than one neighbour and a one-vs-all output.
"""
from pathlib import Path

import numpy as np
import pytest

from dbmpi import config as configuration
from dbmpi.model import Network
from dbmpi.model.partitioned import PartitionedNetwork
from tests.conftest import assert_close
from tests.mpi import sub_world

ROOT = Path(__file__).resolve().parents[2]

MLP = """
[model]
input_shape = [8, 8, 1]
seed = 3
[[model.layers]]
type = "dense"
units = 13
activation = "relu"
[[model.layers]]
type = "dense"
units = 7
activation = "sigmoid"
[[model.layers]]
type = "softmax"
units = 10
"""

# 16 x 13 x 2 -> local 3x3 (14 rows) -> lcn 5 (reach 4 rows: at P = 4 its halo spans two
# neighbours) -> l2pool 3/2 (6 rows) -> local 3x3 (4 rows: one per partition at P = 4)
# -> dense 9 -> output.
MIXED = """
[model]
input_shape = [16, 13, 2]
seed = 5
[[model.layers]]
type = "local"
filters = 3
kernel = 3
stride = 1
activation = "tanh"
[[model.layers]]
type = "lcn"
size = 5
[[model.layers]]
type = "l2pool"
size = 3
stride = 2
[[model.layers]]
type = "local"
filters = 4
kernel = 3
stride = 1
activation = "relu"
[[model.layers]]
type = "dense"
units = 9
activation = "sigmoid"
[[model.layers]]
type = "{output}"
units = 7
"""

# Strided local layer whose receptive fields overlap partially, then pooling whose stride
# skips rows: needed rows differ from owned rows in both directions.
STRIDED = """
[model]
input_shape = [19, 9, 1]
seed = 11
[[model.layers]]
type = "local"
filters = 2
kernel = 5
stride = 2
activation = "sigmoid"
[[model.layers]]
type = "l2pool"
size = 2
stride = 2
[[model.layers]]
type = "lcn"
size = 3
[[model.layers]]
type = "softmax"
units = 5
"""


def image_local_model():
    return configuration.load(ROOT / "configs" / "image_local.toml", require_train=False)["model"]


def model_of(text):
    return configuration.validate(configuration.parse_toml(text), require_train=False)["model"]


MODELS = {
    "mlp": lambda: model_of(MLP),
    "image_local": image_local_model,
    "mixed_softmax": lambda: model_of(MIXED.format(output="softmax")),
    "mixed_logistic": lambda: model_of(MIXED.format(output="logistic")),
    "strided": lambda: model_of(STRIDED),
}


def batch(network, n=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + network.input_shape).astype(np.float32)
    y = rng.integers(0, network.n_classes, n).astype(np.int32)
    y[0] = network.n_classes - 1  # a label in the last partition's classes
    return x, y


def perturbed(model):
    """The network with nonzero biases too, so every parameter matters to the gradient."""
    network = Network(model)
    rng = np.random.default_rng(42)
    network.params += (0.05 * rng.standard_normal(network.n_params)).astype(np.float32)
    return network


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("n_partitions", [1, 2, 3, 4])
def test_partitions_match_the_whole_network(name, n_partitions):
    comm = sub_world(n_partitions)
    if comm is None:
        return
    model = MODELS[name]()
    whole = perturbed(model)
    x, y = batch(whole)
    loss = whole.loss_and_grad(x, y)
    grad = whole.grad.copy()
    logits = whole.forward(x).copy()

    part = PartitionedNetwork(perturbed(model), comm)
    r0, r1 = part.input_rows
    x_mine = np.ascontiguousarray(x[:, r0:r1])
    part_loss = part.loss_and_grad(x_mine, y)
    assert_close(part_loss, loss, rtol=1e-5, atol=1e-6, name=f"{name} loss")

    expected = np.concatenate([grad[a:b] for a, b in part.ranges])
    assert_close(part.grad, expected, rtol=1e-3, atol=1e-5, name=f"{name} gradient of partition {comm.rank}")

    c0, c1 = part.class_range
    assert_close(part.forward(x_mine), logits[:, c0:c1], rtol=1e-4, atol=1e-5, name=f"{name} logits")
    assert np.array_equal(part.predict(x_mine, batch_size=4), logits.argmax(axis=1))

    test_loss, test_acc = part.evaluate(x_mine, y, batch_size=4)
    ref_loss, ref_acc = whole.evaluate(x, y, batch_size=4)
    assert_close(test_loss, ref_loss, rtol=1e-5, atol=1e-6, name=f"{name} evaluate loss")
    assert test_acc == ref_acc

    # Every partition holds exactly its ranges, and together they cover the network once.
    owned = comm.allgather(part.ranges)
    covered = np.zeros(whole.n_params, np.int32)
    for ranges in owned:
        for a, b in ranges:
            covered[a:b] += 1
    assert (covered == 1).all()
    comm.Free()


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("name", ["mixed_softmax", "image_local"])
def test_bytes_exchanged_match_the_plan(name):
    """Each partition sends and receives what `dbmpi plan` says, per example, per step."""
    comm = sub_world(3)
    if comm is None:
        return
    network = Network(MODELS[name]())
    part = PartitionedNetwork(network, comm)
    x, y = batch(network, n=5)
    r0, r1 = part.input_rows
    part.loss_and_grad(np.ascontiguousarray(x[:, r0:r1]), y)
    plan = part.plan.bytes_per_example(comm.rank)
    assert part.bytes_received == 5 * (plan["forward_recv"] + plan["backward_recv"])
    assert part.bytes_sent == 5 * (plan["forward_send"] + plan["backward_send"])
    # Halo exchange moves a small part of the spatial activations, not all of them.
    if name == "image_local":
        first_local = part.plan.layers[0].parts[comm.rank]
        assert first_local.halo == ()  # reads its own input rows from the file
    comm.Free()


@pytest.mark.mpi(min_size=2)
def test_partitioned_sgd_follows_the_whole_network():
    """Ten SGD steps on the partitions stay on the whole network's trajectory."""
    comm = sub_world(2)
    if comm is None:
        return
    model = MODELS["mixed_softmax"]()
    whole, part = perturbed(model), PartitionedNetwork(perturbed(model), comm)
    r0, r1 = part.input_rows
    for step in range(10):
        x, y = batch(whole, n=8, seed=step)
        whole_loss = whole.loss_and_grad(x, y)
        whole.params -= 0.1 * whole.grad
        part_loss = part.loss_and_grad(np.ascontiguousarray(x[:, r0:r1]), y)
        part.params -= 0.1 * part.grad
        assert_close(part_loss, whole_loss, rtol=1e-4, atol=1e-5, name=f"loss at step {step}")
    expected = np.concatenate([whole.params[a:b] for a, b in part.ranges])
    assert_close(part.params, expected, rtol=1e-3, atol=1e-5, name="parameters after 10 steps")
    comm.Free()


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("name, n_partitions", [("mixed_softmax", 2), ("mixed_softmax", 3),
                                                ("strided", 3), ("image_local", 2), ("image_local", 3)])
def test_overlapped_exchanges_give_the_same_results_bit_for_bit(name, n_partitions):
    """Computing rows behind the exchanges (interior first, rows the peers need first,
    the input gradient's halo rows sent before the weight gradients) reorders the work but
    not the arithmetic: loss, logits and gradient equal those of exchanges run to completion,
    exactly, at even and uneven splits; and the bytes moved are the same."""
    comm = sub_world(n_partitions)
    if comm is None:
        return
    model = MODELS[name]()
    plain = PartitionedNetwork(perturbed(model), comm, overlap=False)
    over = PartitionedNetwork(perturbed(model), comm, overlap=True)
    assert over.overlap and not plain.overlap
    # The models reorder rows somewhere at these P (the test is not vacuous).
    modes = {o.mode for orders in comm.allgather(over.orders) for o in orders if o is not None}
    assert modes, f"{name} at P = {n_partitions} overlaps nothing"
    r0, r1 = over.input_rows
    for step in range(2):
        x, y = batch(plain.network, n=7, seed=step)
        x_mine = np.ascontiguousarray(x[:, r0:r1])
        assert over.loss_and_grad(x_mine, y) == plain.loss_and_grad(x_mine, y)
        assert np.array_equal(over.grad, plain.grad)
        assert np.array_equal(over.forward(x_mine), plain.forward(x_mine))
    assert (over.bytes_sent, over.bytes_received) == (plain.bytes_sent, plain.bytes_received)
    comm.Free()
