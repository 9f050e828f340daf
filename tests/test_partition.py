"""The MPI-free model-parallel plan: blocks, receptive fields, halos, parameters, bytes."""
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from dbmpi.model import Network
from dbmpi.parallel.partition import (
    BandOrder,
    PartitionError,
    PartitionPlan,
    band_orders,
    receptive_rows,
    sent_rows,
)
from tests.models import DENSE_ON_IMAGE, MIXED_UNEVEN

ROOT = Path(__file__).resolve().parents[1]

def networks():
    return {
        "mlp": Network.from_toml(ROOT / "configs/mlp_fashion.toml"),
        "image": Network.from_toml(ROOT / "configs/image_local.toml"),
        "mixed": Network.from_string(MIXED_UNEVEN),
        "dense_on_image": Network.from_string(DENSE_ON_IMAGE),
    }


NETWORKS = networks()
CASES = [(name, p) for name in NETWORKS for p in (1, 2, 3, 4)]


@pytest.fixture(params=CASES, ids=[f"{n}-P{p}" for n, p in CASES])
def case(request):
    name, p = request.param
    network = NETWORKS[name]
    return network, PartitionPlan.for_network(network, p)


def row_inputs(layer, r):
    """The input rows output row r of a spatial layer reads, by its definition."""
    if layer.kind == "local":
        return set(range(r * layer.stride, r * layer.stride + layer.kernel))
    if layer.kind == "l2pool":
        return set(range(r * layer.stride, r * layer.stride + layer.size))
    reach = 2 * (layer.size // 2)
    return set(range(max(0, r - reach), min(layer.input_shape[0], r + reach + 1)))


def test_owned_blocks_tile_each_layer(case):
    network, plan = case
    for layer, lp in zip(network.layers, plan.layers, strict=True):
        blocks = lp.blocks
        assert blocks[0][0] == 0 and blocks[-1][1] == layer.output_shape[0]
        assert all(a[1] == b[0] for a, b in itertools.pairwise(blocks))
        sizes = [b - a for a, b in blocks]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)  # the larger blocks come first
        assert lp.split == ("rows" if layer.kind in ("local", "l2pool", "lcn") else "units")


def test_needed_inputs_are_the_receptive_field_union(case):
    network, plan = case
    for layer, lp in zip(network.layers, plan.layers, strict=True):
        for part in lp.parts:
            a, b = part.needed
            if lp.split == "units":
                assert (a, b) == (0, int(np.prod(layer.input_shape)))
                continue
            union = set().union(*(row_inputs(layer, r) for r in range(*part.owned)))
            assert set(range(a, b)) == union


def test_halo_is_needed_minus_own_and_comes_from_its_owners(case):
    network, plan = case
    for lp in plan.layers:
        for part in lp.parts:
            if lp.from_file:
                assert part.halo == () and part.own_input is None
                continue
            own = set(range(*part.own_input))
            halo = set()
            for q, a, b in part.halo:
                assert q != part.partition
                qa, qb = lp.parts[q].own_input
                assert qa <= a < b <= qb  # partition q owns the rows it supplies
                assert halo.isdisjoint(range(a, b))
                halo |= set(range(a, b))
            assert halo == set(range(*part.needed)) - own
            assert part.halo_above + part.halo_below == len(halo)
            assert part.halo_above == len({r for r in halo if r < part.own_input[0]})


def test_own_input_is_the_layer_below_block(case):
    network, plan = case
    for i in range(1, len(plan.layers)):
        lp, below = plan.layers[i], plan.layers[i - 1]
        width = 1 if lp.input_split == "rows" else below.output_width
        assert [part.own_input for part in lp.parts] == [(a * width, b * width) for a, b in below.blocks]


def test_param_ranges_tile_the_canonical_vector(case):
    network, plan = case
    ranges = sorted(r for p in range(plan.n_partitions) for r in plan.param_ranges(p))
    assert ranges[0][0] == 0 and ranges[-1][1] == network.n_params
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))  # disjoint and covering
    for p in range(plan.n_partitions):
        mine = plan.param_ranges(p)
        assert all(a[1] < b[0] for a, b in itertools.pairwise(mine))  # merged and sorted
    assert sum(plan.n_params_of(p) for p in range(plan.n_partitions)) == network.n_params


def test_param_ranges_are_the_owned_output_units(case):
    network, plan = case
    marker = np.zeros(network.n_params, dtype=np.int32) - 1
    for p in range(plan.n_partitions):
        for a, b in plan.param_ranges(p):
            marker[a:b] = p
    for t in network.tensors:
        owner = Network.view(t, marker)
        for part in plan.layers[t.layer].parts:
            assert (owner[part.owned[0]:part.owned[1]] == part.partition).all(), t.name


def test_bytes_are_symmetric(case):
    network, plan = case
    totals = [plan.bytes_per_example(p) for p in range(plan.n_partitions)]
    for direction in ("forward", "backward"):
        assert sum(t[f"{direction}_send"] for t in totals) == sum(t[f"{direction}_recv"] for t in totals)
    for lp in plan.layers:
        for direction in ("forward", "backward"):
            assert (sum(getattr(x, f"{direction}_send") for x in lp.parts)
                    == sum(getattr(x, f"{direction}_recv") for x in lp.parts))
    if plan.n_partitions == 1:
        assert all(v == 0 for t in totals for v in t.values())
    else:
        assert all(t["forward_recv"] > 0 for t in totals)


def test_describe_and_to_dict(case):
    network, plan = case
    text = plan.describe(64)
    assert f"{plan.n_partitions} partition(s)" in text
    for lp in plan.layers:
        assert lp.name in text
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["n_partitions"] == plan.n_partitions
    assert len(data["partitions"]) == plan.n_partitions
    assert sum(units for units in (plan.units_of(p) for p in range(plan.n_partitions))) == sum(
        int(np.prod(layer.output_shape)) for layer in network.layers)


def test_dense_bytes_by_hand():
    plan = PartitionPlan.for_network(NETWORKS["mlp"], 3)  # 512 -> [171, 171, 170]; 10 -> [4, 3, 3]
    b = plan.bytes_per_example(2)
    # dense1 gathers the 342 units of dense0 it does not own; softmax2 gathers 342 of dense1;
    # the softmax Allreduces a float32 max and a float64 sum with each of the 2 others.
    assert b["forward_recv"] == 4 * (342 + 342) + (4 + 8) * 2
    assert b["forward_send"] == 4 * (170 * 2 + 170 * 2) + (4 + 8) * 2
    assert b["backward_send"] == 4 * (342 + 342) and b["backward_recv"] == 4 * (170 * 2 * 2)
    first = plan.layers[0]
    assert first.from_file and all(x.forward_recv == 0 for x in first.parts)


def test_halo_bytes_by_hand():
    plan = PartitionPlan.for_network(NETWORKS["image"], 2)
    lcn = plan.layers[2]  # lcn size 5 on (12, 12, 8), rows [0,6) [6,12): reach 4 each way
    assert [x.needed for x in lcn.parts] == [(0, 10), (2, 12)]
    assert lcn.parts[0].halo == ((1, 6, 10),) and lcn.parts[1].halo == ((0, 2, 6),)
    assert lcn.parts[0].halo_below == 4 and lcn.parts[1].halo_above == 4
    assert lcn.parts[0].forward_recv == 4 * 4 * 12 * 8 == lcn.parts[0].backward_send


def test_halo_beyond_the_neighbours():
    plan = PartitionPlan.for_network(NETWORKS["image"], 4)
    lcn = plan.layers[5]  # lcn size 3 on 4 rows, one row each: reach 2
    assert lcn.parts[0].halo == ((1, 1, 2), (2, 2, 3))
    assert lcn.parts[3].halo == ((1, 1, 2), (2, 2, 3))


def test_input_rows():
    image = PartitionPlan.for_network(NETWORKS["image"], 3)  # local0 rows [0,8) [8,16) [16,24), k=5
    assert [image.input_rows(p) for p in range(3)] == [(0, 12), (8, 20), (16, 28)]
    assert PartitionPlan.for_network(NETWORKS["dense_on_image"], 2).input_rows(1) == (0, 6)
    assert PartitionPlan.for_network(NETWORKS["mlp"], 4).input_rows(3) == (0, 784)
    with pytest.raises(PartitionError):
        image.input_rows(3)


def test_too_many_partitions_names_the_layer():
    with pytest.raises(PartitionError, match=r"train.n_partitions: 11 partitions but layer softmax2 "
                                             r"\(model.layers\[2\]\) has only 10 output units"):
        PartitionPlan.for_network(NETWORKS["mlp"], 11)
    with pytest.raises(PartitionError, match=r"layer l2pool4 \(model.layers\[4\]\) has only 4 output rows"):
        PartitionPlan.for_network(NETWORKS["image"], 5)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(PartitionError, match="train.n_partitions: must be a positive integer"):
            PartitionPlan.for_network(NETWORKS["mlp"], bad)
    assert issubclass(PartitionError, ValueError)


@pytest.mark.parametrize("name", ["image", "mixed"])
def test_receptive_rows_match_the_layers(name):
    """Perturbing one input row changes exactly the output rows whose field holds it."""
    network = NETWORKS[name]
    rng = np.random.default_rng(0)
    for layer in network.layers:
        if layer.kind not in ("local", "l2pool", "lcn"):
            continue
        x = rng.standard_normal((1,) + layer.input_shape).astype(np.float32)
        base = layer.forward(x).copy()
        for i in range(layer.input_shape[0]):
            y = x.copy()
            y[0, i] += 1.0
            changed = np.flatnonzero(np.abs(layer.forward(y) - base)[0].reshape(base.shape[1], -1).max(axis=1) > 0)
            expected = [r for r in range(base.shape[1]) if i in row_inputs(layer, r)]
            assert changed.tolist() == expected, (layer.name, i)
        for r in range(base.shape[1]):
            assert set(range(*receptive_rows(layer, r, r + 1))) == row_inputs(layer, r)


def _rows(bands):
    return [r for a, b in bands for r in range(a, b)]


def test_band_orders_compute_every_owned_row_once_in_a_valid_order(case):
    """Overlapped exchanges reorder a block's rows, never drop or repeat one: interior rows
    read only rows the partition owns (the rest read a halo row); with "sent", the rows the
    next layer's partitions receive come first."""
    network, plan = case
    for p in range(plan.n_partitions):
        orders = band_orders(network, plan, p)
        assert len(orders) == len(network.layers)
        for index, (layer, order) in enumerate(zip(network.layers, orders, strict=True)):
            if order is None:
                continue
            assert plan.n_partitions > 1 and layer.kind in ("local", "l2pool")
            part = plan.layers[index].parts[p]
            a, b = part.owned
            assert sorted(_rows(order.before + order.after)) == list(range(b - a))
            assert order.before and order.after
            if order.mode == "interior":
                c0, c1 = part.own_input
                for r in _rows(order.before):
                    lo, hi = receptive_rows(layer, a + r, a + r + 1)
                    assert c0 <= lo and hi <= c1
                for r in _rows(order.after):
                    lo, hi = receptive_rows(layer, a + r, a + r + 1)
                    assert lo < c0 or hi > c1
            else:
                assert order.mode == "sent" and not part.halo
                wanted = {r - a for q in plan.layers[index + 1].parts if q.partition != p
                          for src, r0, r1 in q.halo if src == p for r in range(r0, r1)}
                assert set(_rows(order.before)) == wanted


def test_band_orders_of_the_image_model_by_hand():
    """image_local at P = 2: l2pool 1 (12 rows, 6 each) computes first the 4 rows the other
    partition's lcn reads; local 2 (8 rows, 4 each) computes the 2 rows its own input covers
    while the 2 halo rows travel."""
    network = NETWORKS["image"]
    plan = PartitionPlan.for_network(network, 2)
    assert band_orders(network, plan, 0) == (
        None, BandOrder("sent", ((2, 6),), ((0, 2),)), None,
        BandOrder("interior", ((0, 2),), ((2, 4),)), None, None, None)
    assert band_orders(network, plan, 1)[1] == BandOrder("sent", ((0, 4),), ((4, 6),))
    assert band_orders(network, plan, 1)[3] == BandOrder("interior", ((2, 4),), ((0, 2),))
    assert sent_rows(plan, 1, 0) == ((2, 6),) and sent_rows(plan, 6, 0) == ()
    assert band_orders(network, PartitionPlan.for_network(network, 1), 0) == (None,) * 7
