"""The staleness-aware step of a shard's updates (Zhang et al., "Staleness-aware async-SGD
for distributed deep learning", IJCAI 2016): a gradient computed from parameters `tau`
updates old is applied with the learning rate divided by `tau` (at least 1). MPI-free.

Pushes from many workers are summed in a shard's inbox, so the shard cannot scale each one.
Instead every counted push adds the shard version its worker had fetched to the FETCHED
slot, in the same exchange that adds one to PUSHES (dbmpi.ps.control). At a drain the
shard knows how many pushes arrived since its last measure (the PUSHES delta m) and the sum
of their fetched versions (the FETCHED delta), so their mean staleness at the update is

    tau = VERSION - FETCHED delta / m,   clamped to >= 1,

and the whole drained sum is applied with its step scaled by 1 / tau: exact when the
merged pushes share one staleness (m = 1, the usual case while a shard keeps up), the
reciprocal of the mean rather than the paper's mean of reciprocals otherwise.

Two races are absorbed by keeping the deltas cumulative. A push's data lands before its
count, so a drain can hold data no counted push announced (m = 0): it takes the last
measured tau. One read is atomic per slot only, so a read may see a push's PUSHES but not
yet its FETCHED (tau too high once, too low at the next measure, where the clamp holds it)
or the reverse (m = 0: the FETCHED delta waits for its count).
"""
from __future__ import annotations


class StalenessScale:
    """Measures the mean staleness of the pushes a shard merges and gives the step scale of
    each update: 1 / tau when `enabled`, else 1 (the staleness is measured either way)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.pushes = 0  # PUSHES at the last measure
        self.fetched = 0  # FETCHED at the last measure
        self.tau = 1.0  # the last measured mean staleness, clamped to >= 1
        self.staleness_sum = 0  # sum over measured pushes of (version at the drain - fetched version)
        self.measured_pushes = 0
        self.scale_sum = 0.0  # sum of the scales of the applied updates
        self.updates = 0

    def scale(self, version: int, pushes: int, fetched: int | None) -> float:
        """The step scale of the update about to be applied at shard version `version`,
        given the PUSHES and FETCHED counts read before the drain (`fetched` None: not read,
        the last measure holds)."""
        merged = pushes - self.pushes
        if merged > 0 and fetched is not None:
            lag = version * merged - (fetched - self.fetched)  # summed staleness of the merged pushes
            self.tau = max(1.0, lag / merged)
            self.staleness_sum += lag
            self.measured_pushes += merged
            self.pushes, self.fetched = pushes, fetched
        return 1.0 / self.tau if self.enabled else 1.0

    def applied(self, scale: float) -> None:
        """Count an update applied with `scale`."""
        self.updates += 1
        self.scale_sum += scale

    def mean_staleness(self) -> float:
        """Mean staleness of the measured pushes at the update that applied them (the
        cumulative sums make the per-read races cancel); 0 before any."""
        return self.staleness_sum / self.measured_pushes if self.measured_pushes else 0.0

    def mean_scale(self) -> float:
        """Mean step scale of the applied updates (1 before any)."""
        return self.scale_sum / self.updates if self.updates else 1.0
