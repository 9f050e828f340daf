"""Peak resident memory of every rank of a real `dbmpi train`, against `dbmpi plan`'s figure.

As a module under mpiexec it is the probe:

    mpiexec -n N python -m mpi4py -m tests.rss_probe OUT_DIR dbmpi-arguments...

Each rank runs `dbmpi dbmpi-arguments...` (runpy, exactly as the console script does) and,
when the command returns, writes OUT_DIR/rss-<rank>.json: {"rank", "maxrss_bytes", "code"}
(`ru_maxrss`: the process's peak resident set). The training's own records are left alone;
a rank that leaves through os._exit (a failed run) writes nothing.

`measure(workdir, units, ...)` (tests/test_memory.py, bench/scale_memory.py) writes a
two-dense-layer Downpour config and its synthetic data, asks `dbmpi plan --json` for every
rank's memory, runs the training under the probe and returns both per rank.
"""
from __future__ import annotations

import json
import os
import resource
import runpy
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Two dense layers on a 1024-value input: units x 1,025 + 10 x (units + 1) parameters
# (units = 250,000: 258,750,010, 1.04 GB of float32), small activations. Two steps: every
# buffer is in use after the first (the second fetches again and pushes from the second
# accrued buffer; 1, 2 and 4 steps peak alike); no periodic evaluation, a 50-row test split.
DENSE_RUN = """
[model]
input_shape = [1024]
[[model.layers]]
type = "dense"
units = {units}
activation = "relu"
[[model.layers]]
type = "softmax"
units = 10
[data]
path = "{data}"
[train]
algorithm = "downpour"
optimizer = "sgd"
learning_rate = 0.001
batch_size = 8
steps = 2
n_shards = {shards}
n_replicas = 1
n_partitions = {partitions}
eval_every = 1000
eval_batch_size = 50
replica_timeout_s = 600
"""


def dense_run_config(workdir: Path, units: int, shards: int = 2, partitions: int = 1) -> Path:
    """DENSE_RUN's config in `workdir` (its data file is made by `measure`)."""
    path = workdir / "model.toml"
    path.write_text(DENSE_RUN.format(units=units, data=workdir / "data.h5", shards=shards, partitions=partitions))
    return path


def peak_rss_bytes() -> int:
    """This process's peak resident set (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def mpiexec() -> str | None:
    """The environment's mpiexec (the PyPI MPICH wheel's), else the one on PATH."""
    own = Path(sys.executable).with_name("mpiexec")
    return str(own) if own.exists() else shutil.which("mpiexec")


def planned_memory(config: Path) -> list[dict]:
    """`dbmpi plan --json`'s memory of every rank (dbmpi.runtime.memory.RankMemory.to_dict)."""
    planned = subprocess.run([sys.executable, "-m", "dbmpi", "plan", str(config), "--json"], capture_output=True,
                             text=True, timeout=300, cwd=ROOT, env=run_env())
    if planned.returncode != 0:
        raise RuntimeError(f"dbmpi plan failed: {planned.stderr}")
    return json.loads(planned.stdout.strip().splitlines()[-1])["memory"]


class MemoryShort(RuntimeError):
    """The machine's available memory fell below the floor during the run, which was
    stopped: `available` bytes were left, the run's processes held `run_rss` bytes (their
    resident sets summed) against the plan's `plan` (RankMemory.to_dict per rank)."""

    def __init__(self, available: int, run_rss: int, plan: list[dict]):
        self.available, self.run_rss, self.plan = available, run_rss, plan
        super().__init__(f"stopped the run: the machine had {available / 2**30:.1f} GiB available, its ranks held "
                         f"{run_rss / 2**30:.1f} GiB (planned {sum(r['resident'] for r in plan) / 2**30:.1f} GiB)")


def meminfo(key: str = "MemAvailable") -> int:
    """A /proc/meminfo figure in bytes (0 where there is none)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def tree_rss(root: int) -> int:
    """The resident bytes of process `root` and its descendants, summed (from /proc)."""
    parents, rss = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        parents[int(entry.name)] = int(fields.get("PPid", "0"))
        rss[int(entry.name)] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    members, grew = {root}, True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in members and pid not in members:
                members.add(pid)
                grew = True
    return sum(rss.get(pid, 0) for pid in members)


def run_guarded(command: list[str], workdir: Path, timeout: float, plan: list[dict],
                floor: int | None = None) -> tuple[int, str]:
    """Run `command` (its own process group) until it ends: (status, its output's tail).
    Stops the group and raises MemoryShort if the machine's available memory falls below
    `floor` (default: 1 GiB or 5% of the memory, the smaller), TimeoutExpired after `timeout`."""
    floor = min(2**30, meminfo("MemTotal") // 20) if floor is None else floor
    log = workdir / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=run_env(),
                                start_new_session=True)
        began = time.monotonic()
        try:
            while proc.poll() is None:
                if (available := meminfo()) < floor:
                    raise MemoryShort(available, tree_rss(proc.pid), plan)
                if time.monotonic() - began > timeout:
                    raise subprocess.TimeoutExpired(command, timeout)
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return proc.returncode, log.read_text()[-6000:]


def measure(workdir: Path, units: int, shards: int = 2, partitions: int = 1, timeout: int = 600,
            enough: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Per rank: the plan's memory (RankMemory.to_dict) and "measured", its peak RSS in a
    real run. `enough(plan)` (optional) is called before the run (a test skips there); the
    run is stopped with MemoryShort if the machine runs short of memory meanwhile."""
    from dbmpi.data import prepare_synthetic

    config = dense_run_config(workdir, units, shards, partitions)
    prepare_synthetic(workdir / "data.h5", input_shape=[1024], n_classes=10, n_train=1000, n_test=50)
    plan = planned_memory(config)
    if enough is not None:
        enough(plan)
    probe = workdir / "rss"
    code, output = run_guarded([mpiexec(), "-n", str(len(plan)), sys.executable, "-m", "mpi4py", "-m",
                                "tests.rss_probe", str(probe), "train", str(config), "--run-dir",
                                str(workdir / "run")], workdir, timeout, plan)
    if code != 0:
        raise RuntimeError(f"the training failed ({code}): {output}")
    measured = {}
    for path in probe.glob("rss-*.json"):
        got = json.loads(path.read_text())
        measured[got["rank"]] = got["maxrss_bytes"]
    if sorted(measured) != list(range(len(plan))):
        raise RuntimeError(f"ranks {sorted(measured)} reported, {len(plan)} expected")
    return [{**rank, "measured": measured[rank["rank"]]} for rank in plan]


def main() -> None:
    out = Path(sys.argv[1])
    sys.argv = ["dbmpi"] + sys.argv[2:]
    code = 0
    try:
        runpy.run_module("dbmpi", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.rank
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rss-{rank}.json").write_text(json.dumps({"rank": rank, "maxrss_bytes": peak_rss_bytes(),
                                                       "code": code}))
    sys.exit(code)


if __name__ == "__main__":
    main()
