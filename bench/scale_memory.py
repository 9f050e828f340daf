"""Peak RSS per rank by role against N: measured in real Downpour runs, against `dbmpi plan`'s
figure and against the full vector (4N bytes).

For each size, a two-dense-layer model on a 1024-value input (tests/rss_probe.py: R = 1,
S = 2, 4 steps, SGD on the shards) is trained under mpiexec with every rank's peak RSS
recorded (`ru_maxrss`). One JSON line per rank and size:

    {"n_params", "rank", "role", "measured_bytes", "plan_bytes", "rss_vs_plan",
     "full_vector_bytes", "rss_vs_full_vector", "own_bytes", "mapped_bytes", "baseline_bytes"}

then a last line {"rss_vs_plan_max": the largest |measured / plan - 1| over every rank and
size, "sizes": [...]}. bench/scale.py imports `measure`.

    python bench/scale_memory.py [--units 4000 16000 64000]
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

# Hidden units of the default sizes: about 4.1M, 16.4M and 65.6M parameters.
DEFAULT_UNITS = (4000, 16000, 64000)


def measure(sizes=DEFAULT_UNITS) -> list[dict]:
    """One row per rank and size (`sizes`: hidden units of the model)."""
    rows = []
    for units in sizes:
        with tempfile.TemporaryDirectory(prefix="dbmpi-scale-memory-") as tmp:
            for rank in rss_probe.measure(Path(tmp), units=units, shards=2):
                n = 1025 * units + 10 * (units + 1)
                rows.append({"n_params": n, "rank": rank["rank"], "role": rank["role"],
                             "measured_bytes": rank["measured"], "plan_bytes": rank["resident"],
                             "rss_vs_plan": round(rank["measured"] / rank["resident"], 4),
                             "full_vector_bytes": 4 * n,
                             "rss_vs_full_vector": round(rank["measured"] / (4 * n), 3),
                             "own_bytes": rank["own"], "mapped_bytes": rank["mapped"],
                             "baseline_bytes": rank["baseline"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, nargs="+", default=list(DEFAULT_UNITS),
                        help="hidden units of each model size (parameters: about 1035 x units)")
    args = parser.parse_args()
    rows = measure(args.units)
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"rss_vs_plan_max": max(abs(row["rss_vs_plan"] - 1) for row in rows),
                      "sizes": sorted({row["n_params"] for row in rows})}))


if __name__ == "__main__":
    main()
