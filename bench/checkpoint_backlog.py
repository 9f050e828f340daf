"""What checkpoints and the push-backlog bound cost and buy, each against a run without them.

The main job (Downpour R = 2, S = 2 on digits, 300 steps per replica) under four settings,
`--repeats` runs each, interleaved so machine load hits all alike:

- `plain`: no periodic checkpoints (the reference), the default backlog bound;
- `checkpoints`: a checkpoint every 50 steps, the default bound;
- `unbounded`: no periodic checkpoints, no backlog bound (`max_push_backlog` 10**9);
- `checkpoints_unbounded`: checkpoints every 50 steps and no bound.

Prints one JSON object per run (test accuracy, samples/s, the most pushes one update merged,
the longest checkpoint stall), then one summary: per setting the accuracy range and the
median samples/s relative to `plain`.

    python bench/checkpoint_backlog.py [--repeats 3]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from downpour import emit, mpiexec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "plain": [],
    "checkpoints": ["--set", "train.checkpoint_every=50"],
    "unbounded": ["--set", "train.max_push_backlog=1000000000"],
    "checkpoints_unbounded": ["--set", "train.checkpoint_every=50", "--set", "train.max_push_backlog=1000000000"],
}


def one_run(work: Path, setting: str, repeat: int) -> dict:
    run_dir = work / f"{setting}-{repeat}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [mpiexec(), "-n", "4", sys.executable, "-m", "mpi4py", "-m", "dbmpi", "train",
           str(ROOT / "configs/downpour_digits.toml"), "--run-dir", str(run_dir),
           "--set", "train.steps=300", "--set", "train.warmstart_steps=20",
           "--set", f"data.path={work / 'digits.h5'}", *SETTINGS[setting]]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600, env=env)
    summary = json.loads((run_dir / "summary.json").read_text())
    return emit({"setting": setting, "repeat": repeat, "test_accuracy": summary["test_accuracy"],
                 "samples_per_s": summary["samples_per_s"], "max_merged_pushes": summary["max_merged_pushes"],
                 "checkpoint_stall_s_max": summary["checkpoint_stall_s_max"],
                 "updates_by_shard": summary["updates_by_shard"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for setting in SETTINGS:
                results[setting].append(one_run(Path(tmp), setting, repeat))
    reference = statistics.median(r["samples_per_s"] for r in results["plain"])
    emit({"summary": {name: {"accuracy_min": min(r["test_accuracy"] for r in runs),
                             "accuracy_max": max(r["test_accuracy"] for r in runs),
                             "max_merged_pushes": max(r["max_merged_pushes"] for r in runs),
                             "samples_per_s_vs_plain": round(statistics.median(r["samples_per_s"] for r in runs)
                                                             / reference, 3)}
                      for name, runs in results.items()}})


if __name__ == "__main__":
    main()
