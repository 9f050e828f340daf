"""Shared plumbing of the paper experiments (bench/paper): launching dbmpi under mpiexec,
reading run directories, writing results and figures."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "paper" / "results"
FIGURES = ROOT / "docs" / "img" / "paper"
RUNS = ROOT / "bench" / "paper" / "runs"  # run directories (ignored by git)


def mpiexec() -> str:
    beside = Path(sys.executable).with_name("mpiexec")
    return str(beside) if beside.exists() else "mpiexec"


def dbmpi(*args, ranks: int | None = None, timeout: float = 3600, env: dict | None = None) -> float:
    """Run `dbmpi ARGS` (under mpiexec with `ranks` ranks); returns its wall time. Raises
    with the tail of its output if it fails."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "dbmpi", *map(str, args)]
    if ranks is not None:
        cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m", "dbmpi", *map(str, args)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=environment, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def records(run_dir: Path) -> list[dict]:
    """Every rank's records of a run directory (dbmpi.io.rundir.read_metrics)."""
    from dbmpi.io.rundir import read_metrics

    return read_metrics(run_dir)


def fresh_run_dir(name: str) -> Path:
    path = RUNS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    RUNS.mkdir(parents=True, exist_ok=True)
    return path


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "loadavg": list(os.getloadavg())}


def output_name(name: str, quick: bool) -> str:
    """NAME, or NAME_quick for a --quick run (so it never overwrites the full run's files)."""
    return f"{name}_quick" if quick else name


def write_result(name: str, result: dict) -> Path:
    """Print `result` as one JSON line and store it as bench/paper/results/NAME.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIGURES.mkdir(parents=True, exist_ok=True)
    return plt
