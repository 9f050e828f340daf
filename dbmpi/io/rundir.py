"""A run directory: the resolved config, metrics as JSON lines, and a final summary.

Every file is written atomically (temp file, fsync, rename) so a crash never leaves a
half-written config or summary; metrics.jsonl is appended and flushed line by line.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from dbmpi import config as configuration
from dbmpi.io.atomic import atomic_write_text


class RunDirectoryError(ValueError):
    """The run directory cannot be used (it already holds a run, or is not writable)."""


class RunDirectory:
    """The files of one training run."""

    def __init__(self, path: str | Path, resume: bool = False):
        """`resume`: continue a run in place (append to its metrics) instead of refusing it."""
        self.path = Path(path)
        if (self.path / "metrics.jsonl").exists() and not resume:
            raise RunDirectoryError(
                f"{self.path}: already holds a run (metrics.jsonl exists); "
                "choose another --run-dir or remove it")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirectoryError(f"{self.path}: cannot create run directory: {exc.strerror}") from None
        try:
            self._metrics = open(self.path / "metrics.jsonl", "a", buffering=1)
        except OSError as exc:  # e.g. a read-only directory
            raise RunDirectoryError(f"{self.path}: cannot write the run there: {exc.strerror}") from None
        self.started = time.time()

    @staticmethod
    def default_path(config_path: str | Path) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return Path("runs") / f"{Path(config_path).stem}-{stamp}"

    def write_config(self, config: dict) -> None:
        atomic_write_text(self.path / "config.toml", configuration.dumps(config))

    def log(self, record: dict) -> None:
        """Append one metrics record (a JSON object per line), stamped with wall time."""
        record = {"time": round(time.time() - self.started, 4), **record}
        self._metrics.write(json.dumps(record) + "\n")

    def write_json(self, name: str, data: dict) -> None:
        atomic_write_text(self.path / name, json.dumps(data, indent=2) + "\n")

    def close(self) -> None:
        self._metrics.close()
