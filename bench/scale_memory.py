"""Peak RSS per rank by role against N: measured in real Downpour runs, against `dbmpi plan`'s
figure and against the full vector (4N bytes).

For each size and partition count, a two-dense-layer model on a 1024-value input
(tests/rss_probe.py: R = 1, S = 2, P = 1 by default, 2 steps, SGD on the shards) is trained
under mpiexec with every rank's peak RSS recorded (`ru_maxrss`). One JSON line per rank,
size and P:

    {"n_params", "partitions", "rank", "role", "measured_bytes", "plan_bytes", "rss_vs_plan",
     "full_vector_bytes", "rss_vs_full_vector", "own_bytes", "mapped_bytes", "baseline_bytes"}

then a last line {"rss_vs_plan_max": the largest |measured / plan - 1| over every rank and
size, "sizes": [...], "partitions": [...]}. bench/scale.py imports `measure`.

    python bench/scale_memory.py [--sizes 4000000 16000000 64000000] [--partitions 1 2]

tests/test_memory.py runs the 259M-parameter size at P = 1; its P = 2 twin (about 6 GB at
peak, a minute or more on 2 cores) is `--sizes 258750010 --partitions 2`.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import rss_probe  # noqa: E402 - the repository root first

# Parameter counts of the default sizes (the model's hidden units are chosen to match).
DEFAULT_SIZES = (4_000_000, 16_000_000, 64_000_000)


def units_for(n_params: int) -> int:
    """Hidden units of the two-layer model closest to n_params (1035 per unit, + 10)."""
    return max(1, round((n_params - 10) / 1035))


def measure(sizes=DEFAULT_SIZES, partitions=(1,)) -> list[dict]:
    """One row per rank, size (`sizes`: about that many parameters each) and partition count."""
    rows = []
    for size in sizes:
        for parts in partitions:
            rows += _measure_one(size, parts)
    return rows


def _measure_one(size: int, partitions: int) -> list[dict]:
    rows = []
    units = units_for(size)
    n = 1025 * units + 10 * (units + 1)
    with tempfile.TemporaryDirectory(prefix="dbmpi-scale-memory-") as tmp:
        for rank in rss_probe.measure(Path(tmp), units=units, shards=2, partitions=partitions):
            rows.append({"n_params": n, "partitions": partitions, "rank": rank["rank"], "role": rank["role"],
                         "measured_bytes": rank["measured"], "plan_bytes": rank["resident"],
                         "rss_vs_plan": round(rank["measured"] / rank["resident"], 4),
                         "full_vector_bytes": 4 * n,
                         "rss_vs_full_vector": round(rank["measured"] / (4 * n), 3),
                         "own_bytes": rank["own"], "mapped_bytes": rank["mapped"],
                         "baseline_bytes": rank["baseline"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
                        help="about how many parameters each model has")
    parser.add_argument("--partitions", type=int, nargs="+", default=[1],
                        help="model partitions per replica (train.n_partitions) to run each size with")
    args = parser.parse_args()
    rows = measure(args.sizes, args.partitions)
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"rss_vs_plan_max": max(abs(row["rss_vs_plan"] - 1) for row in rows),
                      "sizes": sorted({row["n_params"] for row in rows}), "partitions": args.partitions}))


if __name__ == "__main__":
    main()
