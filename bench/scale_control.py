"""The control plane against the number of replicas W (issue 14): failure-detection time
and end-of-run time of an oversubscribed Downpour run.

Per W: W tiny replicas and 2 shards under the failover launcher on this machine, each
step's compute a sleep (DBMPI_STEP_SLEEP) beside a batch of 8 digits, every replica
training for a time budget; the last replica is SIGKILLed once training runs
(tests.test_failover.kill_one_of_many, also what the W = 32 test runs). Reported:

- `detection_s`: from the kill to the shard's replica_failed record (the timeout, 10 s, plus
  up to one heartbeat interval and the detector's round; what grows with W is the cost of
  the rounds);
- `end_of_run_s`: from the survivors' time budget running out to the job's exit (hand-in,
  the final checkpoint, every rank's O(1) totals to shard 0, the split final evaluation,
  the release);
- `wall_s`: the whole job, startup included, for reference.

Prints one JSON line per W, then one summary line. The ranks share this machine's cores
(2 here): the times include waiting for a core and are upper bounds for W machines.

    python bench/scale_control.py [--workers 8 16 32 64]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.test_failover import kill_one_of_many  # noqa: E402


def measure(worker_counts=(8, 16, 32, 64), timeout_s: float = 10.0, budget_s: float = 40.0) -> list[dict]:
    """One oversubscribed run per W with its last replica killed: the times against W."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in worker_counts:
            started = time.monotonic()
            run = kill_one_of_many(Path(tmp), n, timeout_s=timeout_s, budget_s=budget_s)
            record = {"workers": n, "ranks": run["ranks"], "replica_timeout_s": timeout_s, "budget_s": budget_s,
                      "status": run["status"], "failed_replicas": run["summary"]["failed_replicas"],
                      "detection_s": None if run["detection_s"] is None else round(run["detection_s"], 2),
                      "end_of_run_s": round(run["end_of_run_s"], 2),
                      "wall_s": round(time.monotonic() - started, 1)}
            print(json.dumps(record), flush=True)
            results.append(record)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--timeout", type=float, default=10.0, help="train.replica_timeout_s")
    parser.add_argument("--budget", type=float, default=40.0, help="train.time_budget_s of every replica")
    args = parser.parse_args()
    results = measure(tuple(args.workers), args.timeout, args.budget)
    print(json.dumps({"detection_s_by_workers": {r["workers"]: r["detection_s"] for r in results},
                      "end_of_run_s_by_workers": {r["workers"]: r["end_of_run_s"] for r in results}}), flush=True)


if __name__ == "__main__":
    main()
