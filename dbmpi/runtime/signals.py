"""A graceful stop on SIGTERM or SIGUSR1, the signals Slurm sends before a time limit or a
pre-emption (`--signal=...`, `scancel --signal=...`).

The handler only records the signal; training loops look at it between steps and spread
it to every rank through the shards' RMA control windows (dbmpi.algorithms.downpour), so a signal to
any one rank stops the whole job cleanly: a final checkpoint, then exit status 0.
"""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records the first stop signal received while installed."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str | None:
        return None if self.signal is None else signal.Signals(self.signal).name

    def _handle(self, signum, _frame) -> None:
        if self.signal is None:
            self.signal = signum

    def install(self) -> StopRequest:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.restore()


__all__ = ["STOP_SIGNALS", "StopRequest"]
