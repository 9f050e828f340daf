"""The MPI-free rank layout: roles, balanced shard ranges, segments, validation."""
import itertools
import json

import pytest

from dbmpi.runtime.layout import Layout, LayoutError, balanced_ranges


def test_roles_in_rank_order():
    layout = Layout(n_params=100, n_shards=2, n_replicas=3, n_partitions=2, coordinator=True)
    assert layout.world_size == 3 * 2 + 2 + 1
    kinds = [str(layout.role(r)) for r in range(layout.world_size)]
    assert kinds[:3] == ["replica 0 partition 0", "replica 0 partition 1", "replica 1 partition 0"]
    assert kinds[6:] == ["shard 0", "shard 1", "coordinator"]
    assert layout.worker_rank(2, 1) == 5 and layout.shard_rank(1) == 7 and layout.coordinator_rank == 8
    with pytest.raises(LayoutError):
        layout.role(9)


@pytest.mark.parametrize("total,parts", [(10, 3), (7, 7), (1001, 3), (5, 1), (42, 8)])
def test_balanced_ranges_tile_and_balance(total, parts):
    ranges = balanced_ranges(total, parts)
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_segments_cover_a_range_across_shards():
    layout = Layout(n_params=10, n_shards=3, n_replicas=1)  # shards [0,4) [4,7) [7,10)
    segs = layout.segments(2, 9)
    assert [(s.shard, s.shard_offset, s.count, s.local_offset) for s in segs] == [
        (0, 2, 2, 0), (1, 0, 3, 2), (2, 0, 2, 5)]
    assert sum(s.count for s in layout.segments(0, 10)) == 10
    with pytest.raises(LayoutError):
        layout.segments(3, 11)


def test_world_size_must_match_with_an_actionable_message():
    layout = Layout(n_params=100, n_shards=2, n_replicas=2)
    layout.check_world(4)
    with pytest.raises(LayoutError, match=r"^5 MPI ranks were started but the layout needs .* = 4; "
                                          r"run with mpiexec -n 4"):
        layout.check_world(5)


@pytest.mark.parametrize("kwargs,key", [
    (dict(n_params=3, n_shards=4, n_replicas=1), "train.n_shards: 4 shards for only 3 parameters"),
    (dict(n_params=3, n_shards=0, n_replicas=1), "train.n_shards: must be a positive integer"),
    (dict(n_params=3, n_shards=1, n_replicas=0), "train.n_replicas: must be a positive integer"),
])
def test_bad_counts(kwargs, key):
    with pytest.raises(LayoutError, match=key):
        Layout(**kwargs)


def test_description_and_json():
    layout = Layout(n_params=41_777_152, n_shards=4, n_replicas=2)
    text = layout.describe("adagrad")
    assert "2 replica(s) x 1 partition(s) + 4 shard(s) = 6 ranks" in text
    assert "[0, 10,444,288)" in text
    data = json.loads(layout.to_json())
    assert data["world_size"] == 6 and data["roles"][2] == "shard 0"
    assert "memory" not in text.splitlines()[1]  # only with the memory model's figures
    assert not text.splitlines()[2].endswith("MiB")
    sized = layout.describe("adagrad", memory=[3 * 2**20] * 6).splitlines()
    assert "memory" in sized[1] and sized[2].endswith("3.0 MiB")
