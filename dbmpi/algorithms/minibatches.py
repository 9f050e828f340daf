"""What SGD-like training loops share (the serial baseline, each Downpour replica; MPI-free):
the training budget and the shuffled minibatches.

`Budget`: [train] steps, or epochs over the examples a loop sees, and/or time_budget_s.
`Minibatches`: the examples in a seeded random order, reshuffled when fewer than a batch
remain (each batch's rows sorted, for contiguous reads), the next batch gathered by a helper
thread while the current one is used (numpy's copies release the GIL). The order depends
only on the seed, so a run repeats.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


@dataclass
class Budget:
    """How long a loop trains: `steps` (math.inf: no step limit), and `seconds` (None: no
    limit) from `start()` on, by `clock`."""

    steps: float
    steps_per_epoch: int
    seconds: float | None = None
    clock: Callable[[], float] = time.perf_counter
    deadline: float = math.inf  # on `clock`; set by start()

    @classmethod
    def of(cls, tcfg: dict, n_examples: int, batch: int, clock: Callable[[], float] = time.perf_counter) -> Budget:
        """The budget [train] gives a loop over `n_examples` in batches of `batch`: steps, or
        epochs (at least one step), and train.time_budget_s."""
        steps_per_epoch = max(1, n_examples // batch)
        if tcfg["steps"] is not None:
            steps = tcfg["steps"]
        elif tcfg["epochs"] is not None:
            steps = max(1, round(tcfg["epochs"] * steps_per_epoch))
        else:
            steps = math.inf
        return cls(steps, steps_per_epoch, tcfg.get("time_budget_s"), clock)

    def start(self, now: float | None = None) -> Budget:
        """The time budget counts from `now` (the clock's now if None)."""
        if self.seconds:
            self.deadline = (self.clock() if now is None else now) + self.seconds
        return self

    @property
    def limited(self) -> bool:
        """Whether there is a step limit."""
        return self.steps != math.inf

    def out_of_time(self) -> bool:
        return self.clock() >= self.deadline


class Minibatches:
    """Shuffled minibatches of (x, y); the next one is gathered in a thread while the current
    one is used. `close()` when done."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch: int, seed: int):
        self.x, self.y, self.batch = x, y, batch
        self.rng = np.random.default_rng(seed)
        self.order, self.cursor = self.rng.permutation(len(x)), 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbmpi-prefetch")
        self.future = self.pool.submit(self._make)

    def _make(self):
        if self.cursor + self.batch > len(self.x):
            self.order, self.cursor = self.rng.permutation(len(self.x)), 0
        index = np.sort(self.order[self.cursor:self.cursor + self.batch])
        self.cursor += self.batch
        return np.take(self.x, index, axis=0), np.take(self.y, index, axis=0)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        batch = self.future.result()
        self.future = self.pool.submit(self._make)
        return batch

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Minibatches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
