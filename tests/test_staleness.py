"""The staleness-aware step scale (dbmpi.ps.staleness) from the counters a shard reads:
the mean staleness of the pushes a drain merges, the races between a push's data, its
PUSHES and its FETCHED, and the means reported in the shard's record. MPI-free."""
import pytest

from dbmpi.ps.staleness import StalenessScale


def test_a_fresh_push_takes_the_full_step_and_a_stale_one_a_smaller_one():
    scale = StalenessScale(enabled=True)
    assert scale.scale(version=0, pushes=1, fetched=0) == 1.0  # staleness 0: clamped to 1
    assert scale.scale(version=1, pushes=2, fetched=0) == 1.0  # staleness 1
    assert scale.scale(version=10, pushes=3, fetched=2) == pytest.approx(1 / 8)  # fetched 2, applied at 10


def test_merged_pushes_are_scaled_by_their_mean_staleness():
    scale = StalenessScale(enabled=True)
    # Three pushes fetched at versions 4, 6 and 8, merged into the update at version 10:
    # staleness 6, 4, 2, mean 4.
    assert scale.scale(version=10, pushes=3, fetched=4 + 6 + 8) == pytest.approx(1 / 4)
    # Deltas only: the next two fetched at 9 and 9, applied at 11 (mean 2).
    assert scale.scale(version=11, pushes=5, fetched=18 + 9 + 9) == pytest.approx(1 / 2)
    assert scale.mean_staleness() == pytest.approx((6 + 4 + 2 + 2 + 2) / 5)


def test_a_drain_without_a_new_count_keeps_the_last_measure():
    """The data of a push lands before its count: that drain takes the last tau."""
    scale = StalenessScale(enabled=True)
    assert scale.scale(version=5, pushes=1, fetched=1) == pytest.approx(1 / 4)
    assert scale.scale(version=6, pushes=1, fetched=1) == pytest.approx(1 / 4)  # m = 0
    assert scale.scale(version=7, pushes=2, fetched=None) == pytest.approx(1 / 4)  # FETCHED not read
    # The push counted meanwhile is measured with the next read of both (deltas since the last measure).
    assert scale.scale(version=8, pushes=3, fetched=1 + 6 + 6) == pytest.approx(1 / 2)


def test_pushes_seen_before_their_fetched_versions_cancel_at_the_next_measure():
    """One read is atomic per slot only: PUSHES may include a push whose FETCHED has not
    landed (tau too high once), then the next FETCHED delta holds it (clamped at 1)."""
    scale = StalenessScale(enabled=True)
    assert scale.scale(version=10, pushes=2, fetched=9) == pytest.approx(1 / 5.5)  # the second 9 missing
    assert scale.scale(version=11, pushes=3, fetched=9 + 9 + 10) == 1.0  # 11 - 19 < 1: clamped
    # The cumulative mean is exact: staleness 1, 1 (both fetched at 9, applied at 10) and 1.
    assert scale.mean_staleness() == pytest.approx(1.0)


def test_fetched_seen_before_its_push_waits_for_the_count():
    scale = StalenessScale(enabled=True)
    assert scale.scale(version=3, pushes=0, fetched=2) == 1.0  # no count yet: nothing measured
    assert scale.scale(version=4, pushes=1, fetched=2) == pytest.approx(1 / 2)
    assert scale.mean_staleness() == pytest.approx(2.0)


def test_disabled_measures_but_never_scales():
    scale = StalenessScale(enabled=False)
    assert scale.scale(version=10, pushes=1, fetched=2) == 1.0
    assert scale.mean_staleness() == pytest.approx(8.0)
    scale.applied(1.0)
    assert scale.mean_scale() == 1.0


def test_mean_scale_of_the_applied_updates():
    scale = StalenessScale(enabled=True)
    assert scale.mean_scale() == 1.0 and scale.mean_staleness() == 0.0  # before any
    scale.applied(scale.scale(version=0, pushes=1, fetched=0))
    scale.applied(scale.scale(version=4, pushes=2, fetched=0))
    assert scale.mean_scale() == pytest.approx((1 + 1 / 4) / 2)
