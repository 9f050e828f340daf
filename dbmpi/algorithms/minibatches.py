"""What SGD-like training loops share (the serial baseline, each Downpour replica; MPI-free):
the training budget and the shuffled minibatches.

`Budget`: [train] steps, or epochs over the examples a loop sees, and/or time_budget_s.
`Minibatches`: the examples in a seeded random order, reshuffled when fewer than a batch
remain (each batch's rows sorted, for contiguous reads), the next batch gathered by a helper
thread while the current one is used (numpy's copies release the GIL). The order depends
only on the seed, so a run repeats. `SplitMinibatches`: the same batches when the examples
are split among processes (a replica's partitions), each holding a contiguous piece.
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

    def __init__(self, x: np.ndarray, y: np.ndarray, batch: int, seed: int, n: int | None = None):
        self.x, self.y, self.batch = x, y, batch
        self.n = len(x) if n is None else int(n)  # the examples drawn from (SplitMinibatches: all pieces)
        self.rng = np.random.default_rng(seed)
        self.order, self.cursor = self.rng.permutation(self.n), 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbmpi-prefetch")
        self.future = self.pool.submit(self._make)

    def _make(self):
        if self.cursor + self.batch > self.n:
            self.order, self.cursor = self.rng.permutation(self.n), 0
        index = np.sort(self.order[self.cursor:self.cursor + self.batch])
        self.cursor += self.batch
        return self._take(index)

    def _take(self, index: np.ndarray):
        """The batch of examples `index` (sorted) from the examples held."""
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


class SplitMinibatches(Minibatches):
    """The batches Minibatches(x, y, batch, seed) gives over `n` examples, when this process
    holds only the `len(x)` consecutive examples from `first` on, and its peers hold the
    rest (a replica's partitions, each a contiguous piece of the replica's slice in
    order). Each draws the same order, takes the batch's examples it holds (in the helper
    thread), and `exchange(x, y, counts)` joins every holder's piece in holder order
    (`counts[i]`: how many examples of this batch holder i gives); the batch is the same,
    row for row, as if one process held all `n`. `bounds`: where each holder's piece starts,
    then `n`."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch: int, seed: int, *, bounds,
                 first: int, exchange: Callable):
        self.first, self.bounds, self.exchange = int(first), np.asarray(bounds), exchange
        super().__init__(x, y, batch, seed, n=int(bounds[-1]))

    def _take(self, index: np.ndarray):
        edges = np.searchsorted(index, self.bounds)
        mine = index[(index >= self.first) & (index < self.first + len(self.x))] - self.first
        xb, yb = super()._take(mine)
        return xb, yb, np.diff(edges)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        xb, yb, counts = self.future.result()
        self.future = self.pool.submit(self._make)
        return self.exchange(xb, yb, counts)
