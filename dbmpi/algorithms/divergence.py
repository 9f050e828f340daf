"""The divergence warning: one line, once per run, when the periodic test loss diverges.
MPI-free; the training loops feed it each test evaluation (dbmpi.algorithms.sgd, Downpour's
replica 0 in dbmpi.algorithms.replica, Sandblaster's coordinator).

The rule (docs/CONFIG.md, "The divergence warning"): the test loss diverges when it is not
finite, or when PATIENCE consecutive evaluations are each above both FACTOR times the best
loss so far and halfway back from the best to the first evaluation's loss (it has given up
half of what the training gained). Consecutive evaluations keep it quiet on a noisy curve
that jumps up now and then and comes back (a high but workable learning rate); the halfway
bound on overfitting (the loss creeps up from a low best, far below where it started); the
factor on a curve that never improved much (its first loss near its best). Tested on real
curves in tests/test_divergence.py. It is a warning, not a failure: the run goes on and its
exit status is unchanged (non-finite training losses and pushes are failures, see
dbmpi.algorithms.sgd.DivergedError).
"""
from __future__ import annotations

import math
import sys

PATIENCE = 3  # consecutive evaluations above the bound
FACTOR = 1.25  # times the best test loss so far
GUIDANCE = 'docs/CONFIG.md, "The divergence warning"'


class DivergenceWatch:
    """Watches a run's test losses; `observe` returns the warning record the first time
    they diverge, and None otherwise (ever after too: one warning per run)."""

    def __init__(self, optimizer: str, learning_rate: float | None, patience: int = PATIENCE,
                 factor: float = FACTOR, unit: str = "step"):
        """`unit`: what the evaluations' counter counts ("step", or Sandblaster's "iteration")."""
        self.optimizer, self.learning_rate, self.unit = optimizer, learning_rate, unit
        self.patience, self.factor = patience, factor
        self.first: float | None = None
        self.best = math.inf
        self.above = 0  # consecutive evaluations above the bound
        self.warned = False

    def observe(self, step: int, test_loss: float) -> dict | None:
        """Take the test loss of the evaluation at `step` (of `unit`)."""
        if self.warned:
            return None
        if not math.isfinite(test_loss):
            return self._warning(step, test_loss, f"the test loss is {test_loss}")
        if self.first is None:
            self.first = test_loss
        self.above = self.above + 1 if test_loss > self.bound() else 0
        self.best = min(self.best, test_loss)
        if self.above >= self.patience:
            why = (f"the test loss {test_loss:.4g} has been far above its best ({self.best:.4g}, first "
                   f"{self.first:.4g}) for {self.patience} evaluations")
            return self._warning(step, test_loss, why)
        return None

    def bound(self) -> float:
        """The loss above which an evaluation counts towards the warning (inf before any)."""
        if self.first is None or math.isinf(self.best):
            return math.inf
        return max(self.factor * self.best, self.best + (self.first - self.best) / 2)

    def _warning(self, step: int, test_loss: float, why: str) -> dict:
        self.warned = True
        rate = f", learning rate {self.learning_rate:g}" if self.learning_rate is not None else ""
        message = (f"training may be diverging at {self.unit} {step}: {why} (optimizer {self.optimizer}{rate}); "
                   f"the run goes on; see {GUIDANCE}")
        return {"kind": "warning", "warning": "diverging", self.unit: step, "test_loss": test_loss,
                "best_test_loss": None if math.isinf(self.best) else self.best,
                "optimizer": self.optimizer, "learning_rate": self.learning_rate, "message": message}


def emit(record: dict, log) -> None:
    """Print a warning record's line on stderr (`dbmpi: warning: ...`) and `log` the record
    into the run's metrics."""
    sys.stderr.write(f"dbmpi: warning: {record['message']}\n")
    sys.stderr.flush()
    log(record)
