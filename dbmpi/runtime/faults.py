"""Fault injection for the tests, read once from the environment.

Production code asks `FAULTS` (never the environment) whether a fault is due; unset
variables inject nothing. The table of hooks is in CONTRIBUTING.md:

- DBMPI_FAIL_AT="RANK:STEP": that Downpour worker raises at that step (an error on one
  rank must end the whole job).
- DBMPI_SLOW="REPLICA:FACTOR": that Sandblaster replica computes FACTOR times slower (it
  sleeps (FACTOR - 1) x its compute time per portion): a straggler.
- DBMPI_PORTION_DELAY=SECONDS: every Sandblaster portion takes that much longer, so timing
  tests do not depend on the machine's load.
- DBMPI_DIE_AFTER_PUSH="REPLICA:N": that Sandblaster replica's ranks are SIGKILLed right
  after their N-th push lands, before it is reported.
- DBMPI_STEP_SLEEP=SECONDS: every Downpour worker sleeps that long per step beside its
  (tiny) compute, so dozens of replicas share two cores as if each had its own machine.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


def _targeted(spec: str) -> tuple[int, str] | None:
    """"WHO:VALUE" -> (WHO, VALUE); None when unset."""
    who, _, value = spec.partition(":")
    if not value:
        return None
    return int(who), value.strip()


@dataclass(frozen=True)
class Faults:
    fail_at: tuple[int, int] | None = None  # (worker rank, step)
    slow: tuple[int, float] | None = None  # (replica, factor)
    portion_delay_s: float = 0.0
    die_after_push: tuple[int, int] | None = None  # (replica, pushes)
    step_sleep_s: float = 0.0

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> Faults:
        fail_at = _targeted(env.get("DBMPI_FAIL_AT", ""))
        slow = _targeted(env.get("DBMPI_SLOW", ""))
        die = _targeted(env.get("DBMPI_DIE_AFTER_PUSH", ""))
        return cls(fail_at=None if fail_at is None else (fail_at[0], int(fail_at[1])),
                   slow=None if slow is None else (slow[0], float(slow[1])),
                   portion_delay_s=float(env.get("DBMPI_PORTION_DELAY", "0") or 0),
                   die_after_push=None if die is None else (die[0], int(die[1])),
                   step_sleep_s=float(env.get("DBMPI_STEP_SLEEP", "0") or 0))

    def fail_step(self, rank: int) -> int | None:
        """The step at which worker `rank` must raise, if any."""
        return self.fail_at[1] if self.fail_at is not None and self.fail_at[0] == rank else None

    def slowdown(self, replica: int) -> float:
        return self.slow[1] if self.slow is not None and self.slow[0] == replica else 1.0

    def pushes_before_death(self, replica: int) -> int | None:
        return self.die_after_push[1] if self.die_after_push is not None and self.die_after_push[0] == replica else None


FAULTS = Faults.from_environment()
