"""A run directory: the resolved config, each rank's metrics as JSON lines, and a final
summary.

Every rank appends its own records to its own file, `metrics/rank-NNNNN.jsonl` (its world
rank, five digits), flushed line by line, so a crash keeps what each rank wrote and nothing
of size O(ranks x steps) travels at the end of a run. Every record carries `time`: seconds
since the run started (one clock for all ranks: the lead's start time, broadcast). The
config, layout and summary are written atomically (temp file, fsync, rename) so a crash never
leaves them half written. `read_metrics` reads every rank's file (and the single
`metrics.jsonl` of run directories written before, which still read) into one list, file by
file, and completes what no one rank knows (`complete_records`).
"""
from __future__ import annotations

import json
import resource
import time
from collections import Counter
from pathlib import Path

from dbmpi import config as configuration
from dbmpi.io.atomic import atomic_write_text

METRICS_DIR = "metrics"  # each rank's file in it: rank_metrics_name(rank)
LEGACY_METRICS = "metrics.jsonl"  # run directories written before per-rank files


class RunDirectoryError(ValueError):
    """The run directory cannot be used (it already holds a run, or is not writable)."""


def rank_metrics_name(rank: int) -> str:
    """The metrics file of world rank `rank`, relative to the run directory."""
    return f"{METRICS_DIR}/rank-{rank:05d}.jsonl"


def holds_run(path: str | Path) -> bool:
    """Whether `path` already holds a run's metrics (per-rank or the single older file)."""
    path = Path(path)
    return (path / LEGACY_METRICS).exists() or any((path / METRICS_DIR).glob("rank-*.jsonl"))


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (getrusage: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RankMetrics:
    """One rank's metrics file in a run directory that exists: records appended and flushed
    line by line, stamped with `time` since `started` (the run's start, seconds since the epoch)."""

    def __init__(self, run_path: str | Path, rank: int, started: float | None = None):
        self.path = Path(run_path) / rank_metrics_name(rank)
        self.started = time.time() if started is None else started
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_torn_line(self.path)
            self._file = open(self.path, "a", buffering=1)
        except OSError as exc:  # e.g. a read-only directory
            raise RunDirectoryError(f"{self.path.parent.parent}: cannot write the run there: {exc.strerror}") from None

    def log(self, record: dict) -> None:
        """Append one record (a JSON object per line), stamped with the run's wall time."""
        record = {"time": round(time.time() - self.started, 4), **record}
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


def _drop_torn_line(path: Path, chunk: int = 1 << 16) -> None:
    """Cut the partial last line a writer killed mid-line (an earlier start of this rank)
    left, so the records appended now start on a line of their own and the file stays
    readable to the end."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        end = f.seek(0, 2)
        keep = end
        while keep > 0:
            start = max(0, keep - chunk)
            f.seek(start)
            newline = f.read(keep - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            keep = start
        if keep != end:
            f.truncate(keep)


class RunDirectory:
    """The files of one training run, as its lead rank (`rank`) writes them: the config, the
    summary and the lead's own metrics file."""

    def __init__(self, path: str | Path, resume: bool = False, rank: int = 0):
        """`resume`: continue a run in place (append to its metrics) instead of refusing it."""
        self.path = Path(path)
        if holds_run(self.path) and not resume:
            raise RunDirectoryError(
                f"{self.path}: already holds a run (it has metrics); choose another --run-dir or remove it")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirectoryError(f"{self.path}: cannot create run directory: {exc.strerror}") from None
        self.metrics = RankMetrics(self.path, rank)

    @property
    def started(self) -> float:
        return self.metrics.started

    @staticmethod
    def default_path(config_path: str | Path) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return Path("runs") / f"{Path(config_path).stem}-{stamp}"

    def write_config(self, config: dict) -> None:
        atomic_write_text(self.path / "config.toml", configuration.dumps(config))

    def log(self, record: dict) -> None:
        """Append one record to the lead's metrics file."""
        self.metrics.log(record)

    def write_json(self, name: str, data: dict) -> None:
        write_json(self.path, name, data)

    def close(self) -> None:
        self.metrics.close()


def write_json(run_path: str | Path, name: str, data: dict) -> None:
    """A JSON file of the run directory (summary.json), written atomically."""
    atomic_write_text(Path(run_path) / name, json.dumps(data, indent=2) + "\n")


# Reading ----------------------------------------------------------------------------------
def metrics_files(run_path: str | Path) -> list[Path]:
    """Every metrics file of a run directory: the older single file first, then each rank's."""
    run_path = Path(run_path)
    legacy = [run_path / LEGACY_METRICS] if (run_path / LEGACY_METRICS).exists() else []
    return legacy + sorted((run_path / METRICS_DIR).glob("rank-*.jsonl"))


def _read_lines(path: Path) -> list[dict]:
    """A metrics file's records; a torn last line (its writer was killed mid-line) is left out,
    a bad line elsewhere is an error naming the file and line."""
    lines = path.read_text().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: torn, not bad
                continue
            raise RunDirectoryError(f"{path}:{number}: not a JSON line") from None
    return records


def read_metrics(run_path: str | Path) -> list[dict]:
    """Every record of a run directory: the older single file's, then each rank's file's
    (by rank), each in the order written, then what `complete_records` adds. Not sorted by
    `time`: a run resumed in place starts its clock again, and a file's order is the truth.
    RunDirectoryError when there are none."""
    files = metrics_files(run_path)
    if not files:
        raise RunDirectoryError(f"{run_path}: no metrics (not a run directory?)")
    records = [r for path in files for r in _read_lines(path)]
    if not records:
        raise RunDirectoryError(f"{run_path}: no records yet")
    return complete_records(records)


def complete_records(records: list[dict]) -> list[dict]:
    """What no single rank knows, computed at read time (Downpour, grouped by the run start
    `run_started` each rank's final record carries): each `shard` record completed with what
    the workers counted for it (`add_push_counts`), and one `checkpoint` record per
    checkpoint from the shards' own (`checkpoint_records`). Records of older run
    directories (already complete) are left as they are."""
    starts: dict[float, list[dict]] = {}
    for r in records:
        if r.get("kind") in ("shard", "replica") and "run_started" in r:
            starts.setdefault(r["run_started"], []).append(r)
    extra = []
    for _, group in sorted(starts.items()):
        shards = sorted((r for r in group if r["kind"] == "shard"), key=lambda r: r["shard"])
        workers = [r for r in group if r["kind"] == "replica"]
        if shards and "n_replicas" in shards[0]:
            add_push_counts(shards, workers, shards[0]["n_replicas"])
            extra += checkpoint_records(shards)
    return records + extra


def add_push_counts(shards: list[dict], workers: list[dict], n_replicas: int) -> None:
    """Complete each Downpour shard's record with what its workers counted for it
    (dbmpi.ps.client): the staleness histogram of the pushes (labelled with the shard
    record's `bucket_labels`), the pushes by replica, and per replica the pushes the shard
    had counted before that replica's first one (-1: it never pushed; a replica that failed
    before writing its final record shows as none)."""
    for record in shards:
        k = record["shard"]
        histogram = [0] * len(record["bucket_labels"])
        by_replica, first = [0] * n_replicas, [-1] * n_replicas
        for w in workers:
            if k not in w.get("shards", ()):
                continue
            i, r = w["shards"].index(k), w["replica"]
            histogram = [a + b for a, b in zip(histogram, w["staleness_histogram_by_shard"][i], strict=True)]
            by_replica[r] += w["pushes_by_shard"][i]
            after = w["first_push_after_by_shard"][i]
            if after >= 0:
                first[r] = after if first[r] < 0 else min(first[r], after)
        record.update({"staleness_histogram": {label: n for label, n in zip(record["bucket_labels"], histogram,
                                                                             strict=True) if n},
                       "pushes_by_replica": by_replica, "first_push_after": first})


def checkpoint_records(shards: list[dict]) -> list[dict]:
    """One `checkpoint` record per Downpour checkpoint, from the shards' own records (sorted
    by shard; their checkpoint times in seconds since the run started): its file and step,
    the shards' update counts at their snapshots, and per shard how long updates stalled, how
    many were applied while it was written and the most pushes one of them merged."""
    if not shards:
        return []
    records = []
    for i, head in enumerate(shards[0]["checkpoints"]):
        mine = [s["checkpoints"][i] if i < len(s["checkpoints"]) else {} for s in shards]
        records.append({"kind": "checkpoint", "time": head["time"], "step": head["step"],
                        "file": head.get("file"), "duration_s": head["duration_s"],
                        "shard_versions": [c.get("version") for c in mine],
                        "stall_s_by_shard": [c.get("stall_s", 0.0) for c in mine],
                        "updates_during_by_shard": [c.get("updates_during") for c in mine],
                        "max_merged_during_by_shard": [c.get("max_merged_during") for c in mine]})
    return records


def merge_counts(histograms) -> dict:
    """The sum of labelled histograms ({label: count} dicts)."""
    return dict(sum((Counter(h) for h in histograms), Counter()))
