"""Waiting without hogging a core (MPI-free: the supervisor uses it too).

Ranks often share cores, and a rank that spins while it waits takes the core from the rank
it waits for. `poll` is the one waiting loop of the package; `Backoff` is its pause, for
loops that do work between polls (a shard's serving loop).
"""
from __future__ import annotations

import time
from collections.abc import Callable

LOW_S, HIGH_S = 5e-5, 2e-3  # the default first and longest pause


class Backoff:
    """Sleeps that double from `low` up to `high`; `reset()` after progress."""

    def __init__(self, low: float = LOW_S, high: float = HIGH_S):
        self.low, self.high = low, high
        self.pause_s = low

    def reset(self) -> None:
        self.pause_s = self.low

    def pause(self) -> None:
        time.sleep(self.pause_s)
        self.pause_s = min(2 * self.pause_s, self.high)


def poll(done: Callable[[], bool], *, spin: float = 0.0, low: float = LOW_S, high: float = HIGH_S,
         beat: Callable[[], None] | None = None, limit_s: float | None = None) -> bool:
    """Call `done()` until it is true without hogging a core: for `spin` seconds in a tight
    loop, then with exponential back-off between `low` and `high`, calling `beat()` (a
    heartbeat) every round. False if `limit_s` passed first."""
    if done():
        return True
    start = time.monotonic()
    until = time.perf_counter() + spin
    while time.perf_counter() < until:
        if done():
            return True
    backoff = Backoff(low, high)
    while not done():
        if beat is not None:
            beat()
        if limit_s is not None and time.monotonic() - start > limit_s:
            return False
        backoff.pause()
    return True
