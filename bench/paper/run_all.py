"""Run the whole paper-experiment suite (issue 7): Figures 3, 4 and 5 and the speech-like
task, one after the other, each as its own process.

    python bench/paper/run_all.py [--quick] [--only fig3,fig4,fig5,speech]

Each experiment writes bench/paper/results/<name>.json (and prints it as one JSON line)
and docs/img/paper/<name>.png (<name>_quick.* with --quick, which git ignores, so a quick
run never overwrites the committed full results); docs/RESULTS.md explains them. Figure 5 reuses Figure 4's
warm-start checkpoint (made once in bench/paper/runs/). --quick: about 8 minutes on 2 cores;
the full suite about 35. On a shared machine wrap each experiment in a lock, e.g.
`flock /tmp/dbmpi-cpu.lock python bench/paper/fig4_accuracy_time.py`, so timings do not overlap.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPERIMENTS = {"fig3": "fig3_partitions.py", "fig4": "fig4_accuracy_time.py",
               "fig5": "fig5_time_to_accuracy.py", "speech": "speech.py"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the short version of every experiment")
    parser.add_argument("--only", default=",".join(EXPERIMENTS), help="comma list of " + ", ".join(EXPERIMENTS))
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        parser.error(f"--only: unknown {unknown}")
    failed, started = [], time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        print(f"run_all: {name} ...", file=sys.stderr, flush=True)
        code = subprocess.call([sys.executable, str(HERE / EXPERIMENTS[name])] + (["--quick"] if args.quick else []))
        print(f"run_all: {name} {'ok' if code == 0 else f'FAILED ({code})'} in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
        if code != 0:
            failed.append(name)
    print(f"run_all: {len(names) - len(failed)}/{len(names)} done in {time.perf_counter() - started:.0f} s"
          + (f"; failed: {failed}" if failed else ""), file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
