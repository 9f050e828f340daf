"""Sandblaster L-BFGS benchmarks, each against a reference measured in the same run.

(1) iteration: seconds per L-BFGS iteration against the number of replicas R = 1, 2, 3
    (S = 1: R + 2 ranks) on the Fashion-MNIST MLP with one fixed full batch (the first N
    training examples, written to a subset file so that every iteration uses the same
    batch). Reference: the same L-BFGS (dbmpi.algorithms.lbfgs.LBFGS on NumpyVectorSpace) in one
    process with 2 BLAS threads on the same batch. On this 2-core machine R = 2 already
    fills both cores; R = 3 oversubscribes them (shard and coordinator sleep during a batch).
(2) straggler: R = 10 replicas (S = 1, 12 ranks), the last one 10x slower (DBMPI_SLOW=9:10),
    200 portions of 20 examples per batch made sleep-dominated by DBMPI_PORTION_DELAY=0.1
    (the slow replica sleeps 1 s), with and without backup tasks; overhead = mean
    batch seconds / mean batch seconds without the straggler - 1. Also reported: the
    capacity floor R / (R - 0.9) - 1 and the floor of an ideal greedy schedule with backups
    of the same portions (simulated, communication-free).
(3) accuracy: wall time until the test accuracy first reaches a target (default 0.84) on
    Fashion-MNIST (all 60000 training examples) with the MLP, for Sandblaster (R = 2, S = 1; full batch
    and minibatches of several sizes and portion sizes) against scipy.optimize.minimize
    (L-BFGS-B, maxcor 10 = history) in one process with 2 BLAS threads, from the same
    initial point on the same objective (mean softmax cross-entropy, no weight decay).
    Both clocks exclude process start-up, data loading and every test-set evaluation:
    scipy's callback evaluates the test set after each iteration and that time is
    subtracted; Sandblaster's shard keeps a copy of x after every accepted step (a 2.7 MB
    memcpy per iteration, inside the timed run), the copies are evaluated after the run,
    and the time of iteration k is the coordinator's own time_s (from before its first
    evaluation to the end of iteration k). The last copy is checked against the run's own
    final test accuracy. A run cannot stop at the target, so each has a time budget: 1.1x
    scipy's time for full batch, 0.7x (the goal) for minibatches. time_to_acc_vs_scipy is
    the designated configuration (configs/sandblaster_fashion.toml: batch 6000, portions
    of 500), fixed before the run; the best of all runs is reported beside it.

Every timed run records the CPU other processes used meanwhile (/proc/stat minus our own
getrusage); above 0.3 cores the run is repeated once after the machine is quiet again.

Runs are the real command line (`mpiexec -n N python -m mpi4py -m dbmpi train ...`) in a
subprocess; for (3) the same command goes through this file (`--snapshot-child DIR`),
which installs the copy hook and then calls dbmpi.cli.main with the same arguments.
Prints one JSON object per measurement (progress on stderr) and, last, one JSON object
{"straggler_overhead_backup", "straggler_overhead_nobackup", "time_to_acc_vs_scipy", ...};
appends the records to bench/results/sandblaster.jsonl unless --no-record.

    python bench/sandblaster.py [--quick] [--no-record] [--only {iteration,straggler,accuracy}]
"""
import argparse
import heapq
import itertools
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "sandblaster.jsonl"
CONFIG = ROOT / "configs" / "sandblaster_fashion.toml"
MLP_CONFIG = ROOT / "configs" / "mlp_fashion.toml"
FASHION = ROOT / "data" / "fashion-mnist.h5"
SECTIONS = ("iteration", "straggler", "accuracy")
CHILD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
HOOKS = ("DBMPI_SLOW", "DBMPI_PORTION_DELAY")


def progress(message):
    print(f"sandblaster bench: {message}", file=sys.stderr, flush=True)


def mpiexec():
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else shutil.which("mpiexec")


def loadavg():
    return [round(v, 2) for v in os.getloadavg()]


def busy_cores(seconds=1.0):
    """Cores in use (all processes) over the next `seconds`, from /proc/stat."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return sum(values[:8]), idle
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    if total1 == total0:
        return 0.0
    return round((1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1), 2)


def wait_quiet(label, first, max_wait=300):
    """Wait until the machine is quiet before timing. At the start (`first`) that is the
    1-minute load average <= 1.0; later our own previous runs inflate that average, so it is
    the cores in use right now (<= 0.5, measured over 2 s), which sees other work at once.
    Returns what was seen, for the records."""
    start = time.monotonic()
    while True:
        load, busy = loadavg(), busy_cores(2.0)
        quiet = load[0] <= 1.0 if first else busy <= 0.5
        waited = time.monotonic() - start
        if quiet or waited >= max_wait:
            record = {"section": label, "loadavg": load, "busy_cores": busy, "waited_s": round(waited, 1),
                      "rule": "loadavg_1min<=1.0" if first else "busy_cores<=0.5", "quiet": quiet}
            if not quiet:
                progress(f"{label}: still busy after {waited:.0f} s (load {load}, {busy} cores busy): timing anyway")
            return record
        progress(f"{label}: waiting for a quiet machine (load {load}, {busy} cores busy)")
        time.sleep(10)


class CpuMeter:
    """CPU seconds spent by other processes than ours while a measurement runs: all busy
    CPU time on the machine (/proc/stat) minus this process's and its waited-for
    descendants' (getrusage). foreign_cores = those seconds / wall seconds; a few
    hundredths is the kernel and the MPI launcher's helpers."""

    def __init__(self, children=False):
        import resource

        self.resource, self.children = resource, children
        self.start = self._snapshot()

    @staticmethod
    def _busy():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def _ours(self):
        usage = [self.resource.getrusage(self.resource.RUSAGE_SELF)]
        if self.children:
            usage.append(self.resource.getrusage(self.resource.RUSAGE_CHILDREN))
        return sum(u.ru_utime + u.ru_stime for u in usage)

    def _snapshot(self):
        return time.perf_counter(), self._busy(), self._ours()

    def stop(self):
        wall0, busy0, ours0 = self.start
        wall1, busy1, ours1 = self._snapshot()
        wall, busy, ours = wall1 - wall0, busy1 - busy0, ours1 - ours0
        foreign = max(0.0, busy - ours)
        return {"wall_s": round(wall, 2), "our_cpu_s": round(ours, 2), "foreign_cpu_s": round(foreign, 2),
                "foreign_cores": round(foreign / wall, 3) if wall > 0 else None}


FOREIGN = []  # foreign_cores of every timed measurement, in order


# Data ---------------------------------------------------------------------------------------
def write_subset(path, n_train):
    """The first n_train training examples and the whole test set of Fashion-MNIST."""
    from dbmpi import data as datasets

    with datasets.open_dataset(FASHION) as d:
        x, y = d.load("train", 0, n_train)
        tx, ty = d.load("test")
        skip = ("format", "format_version", "layout", "n_train", "n_test", "input_shape")
        attrs = {k: v for k, v in d.attrs.items() if k not in skip}
    attrs["description"] = f"first {n_train} training examples of {FASHION.name} (benchmark subset)"
    datasets.write_dataset(path, x, y, tx, ty, attrs=attrs)
    return path


def load_split(path, split, stop=None):
    from dbmpi import data as datasets

    with datasets.open_dataset(path) as d:
        return d.load(split, 0, stop)


# Running dbmpi ------------------------------------------------------------------------------
FOREIGN_LIMIT = 0.3  # foreign_cores above which a measurement is taken again (once)


def train(run_dir, ranks, sets, env=None, snapshots=None, timeout=900):
    """One `dbmpi train` under mpiexec; returns (summary, iteration records, all records,
    the command, seconds the command took, CpuMeter.stop() over it). If other processes
    took more than FOREIGN_LIMIT cores meanwhile, waits for a quiet machine and runs it
    once more (the first attempt's figures stay in cpu["first_attempt"])."""
    first = _train(run_dir, ranks, sets, env, snapshots, timeout)
    if first[5]["foreign_cores"] is None or first[5]["foreign_cores"] <= FOREIGN_LIMIT:
        return first
    progress(f"{Path(run_dir).name}: other processes used {first[5]['foreign_cores']} cores meanwhile; "
             f"measuring again")
    wait_quiet(f"retry {Path(run_dir).name}", False, max_wait=180)
    again = _train(Path(f"{run_dir}-retry"), ranks, sets, env, snapshots, timeout)
    again[5]["first_attempt"] = {"cpu": first[5], "command_wall_s": round(first[4], 2),
                                 "wall_time_s": first[0]["wall_time_s"]}
    return again


def _train(run_dir, ranks, sets, env, snapshots, timeout):
    full_env = {k: v for k, v in os.environ.items() if k not in HOOKS}
    full_env.update(CHILD_ENV)
    full_env.update(env or {})
    args = ["train", str(CONFIG), "--run-dir", str(run_dir), "--quiet"]
    for item in ["train.eval_every=1000000", *sets]:  # timed: no test evaluations unless asked
        args += ["--set", item]
    if snapshots is None:
        cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m", "dbmpi", *args]
    else:
        cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", str(Path(__file__).resolve()),
               "--snapshot-child", str(snapshots), *args]
    meter = CpuMeter(children=True)
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
    seconds = time.perf_counter() - started
    cpu = meter.stop()
    FOREIGN.append(cpu["foreign_cores"])
    shown = shlex.join([f"{k}={v}" for k, v in (env or {}).items()]
                       + ["mpiexec", *cmd[1:3], "python", *[str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT))
                                                           else c for c in cmd[4:]]])
    if result.returncode != 0:
        raise RuntimeError(f"{shown} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    from dbmpi.io.rundir import read_metrics

    records = read_metrics(run_dir)
    iterations = [r for r in records if r.get("kind") == "iteration"]
    return summary, iterations, records, shown, seconds, cpu


def revocations(iterations):
    """Revoked commits (recomputed portions) and rejected duplicates over the iterations;
    batch seconds of single-evaluation iterations with and without a revocation."""
    single = [r for r in iterations if len(r["batch_seconds"]) == 1]
    with_ = [r["batch_seconds"][0] for r in single if r["revoked"]]
    without = [r["batch_seconds"][0] for r in single if not r["revoked"]]
    return {"portions_revoked": sum(r["revoked"] for r in iterations),
            "iterations_with_revocations": sum(1 for r in iterations if r["revoked"]),
            "duplicates_rejected": sum(r["duplicates_rejected"] for r in iterations),
            "median_batch_s_with_revocation": round(statistics.median(with_), 4) if with_ else None,
            "median_batch_s_without_revocation": round(statistics.median(without), 4) if without else None}


def iteration_seconds(iterations):
    """Seconds of each L-BFGS iteration (1..K) from the coordinator's time_s."""
    times = [r["time_s"] for r in iterations]
    return [b - a for a, b in itertools.pairwise(times)]


def snapshot_child(out_dir, argv):
    """Inside mpiexec: keep a copy of the shard's x after every accepted step, then run
    dbmpi's command line unchanged. LBFGS moves x only by copy(x_trial -> x) in _accept,
    which a shard runs as kernels.copy(src, its x): the hook copies x right after it."""
    import numpy as np
    from mpi4py import MPI

    from dbmpi import kernels as real_kernels
    from dbmpi.algorithms import sandblaster
    from dbmpi.cli import main

    shards, copies = [], []

    class Kernels:
        def __getattr__(self, name):
            return getattr(real_kernels, name)

        @staticmethod
        def copy(src, dst):
            real_kernels.copy(src, dst)
            for shard in shards:
                if dst is shard.vectors.get("x"):
                    copies.append(dst.copy())

    original_init, original_close = sandblaster.ShardVectors.__init__, sandblaster.ShardVectors.close

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        shards.append(self)

    def close(self):
        original_close(self)
        stacked = np.stack(copies) if copies else np.zeros((0, self.zeros.size), np.float32)
        np.save(Path(out_dir) / f"x_rank{MPI.COMM_WORLD.rank}.npy", stacked)

    sandblaster.kernels = Kernels()
    sandblaster.ShardVectors.__init__ = init
    sandblaster.ShardVectors.close = close
    return main(argv)


# (1) Seconds per iteration against R --------------------------------------------------------
def bench_iteration(args, work, emit):
    from threadpoolctl import threadpool_limits

    from dbmpi import config
    from dbmpi.algorithms.lbfgs import LBFGS, NumpyVectorSpace
    from dbmpi.model import Network

    n = 3000 if args.quick else 12000
    portion = 250 if args.quick else 500
    iters = 2 if args.quick else 6
    replicas = (1, 2, 3)
    path = write_subset(work / f"fashion_first{n}.h5", n)
    quiet = wait_quiet("iteration", args.first_section)
    args.first_section = False

    # Reference: the same L-BFGS in this process, 2 BLAS threads, same batch and start.
    x, y = load_split(path, "train")
    network = Network(config.load(MLP_CONFIG, require_train=False)["model"])

    def fun(point):
        network.params[:] = point
        return network.loss_and_grad(x, y), network.grad

    with threadpool_limits(limits=2, user_api="blas"):
        lbfgs = LBFGS(NumpyVectorSpace(network.params.copy(), fun), m=10)
        meter = CpuMeter()
        t0 = time.perf_counter()
        losses = [lbfgs.start()]
        marks = [time.perf_counter() - t0]
        for _ in range(iters):
            losses.append(lbfgs.step()["loss"])
            marks.append(time.perf_counter() - t0)
        serial_evals = lbfgs.evaluations
        cpu = meter.stop()
        FOREIGN.append(cpu["foreign_cores"])
        network.params[:] = lbfgs.space.vectors["x"]
        eval_2t = min(timeit(lambda: network.loss_and_grad(x, y)) for _ in range(3))
    with threadpool_limits(limits=1, user_api="blas"):
        eval_1t = min(timeit(lambda: network.loss_and_grad(x, y)) for _ in range(3))
    serial_iter = [b - a for a, b in itertools.pairwise(marks)]
    reference = {"bench": "sandblaster_iteration_reference", "what": "serial LBFGS + NumpyVectorSpace, one process",
                 "blas_threads": 2, "batch": n, "iterations": iters, "evaluations": serial_evals,
                 "median_iteration_s": round(statistics.median(serial_iter), 4),
                 "iteration_s": [round(s, 4) for s in serial_iter],
                 "evaluation_s_2threads": round(eval_2t, 4), "evaluation_s_1thread": round(eval_1t, 4),
                 "losses": [round(v, 6) for v in losses], "cpu": cpu}
    emit(reference)
    progress(f"iteration reference: {reference['median_iteration_s']} s per serial iteration "
             f"(evaluation {eval_2t:.3f} s with 2 threads, {eval_1t:.3f} s with 1)")

    by_r = {}
    for r in replicas:
        sets = [f"data.path=\"{path}\"", f"train.n_replicas={r}", "train.n_shards=1", f"train.batch_size={n}",
                f"train.portion_size={portion}", f"train.iterations={iters}"]
        summary, its, _, cmd, wall, cpu = train(work / f"iter-r{r}", r + 2, sets)
        per_iter = iteration_seconds(its)
        batches = [s for rec in its[1:] for s in rec["batch_seconds"]]
        overhead = [t - sum(rec["batch_seconds"]) for t, rec in zip(per_iter, its[1:], strict=True)]
        record = {"bench": "sandblaster_iteration", "replicas": r, "shards": 1, "ranks": r + 2,
                  "cores": os.cpu_count(), "oversubscribed": r > (os.cpu_count() or 1),
                  "batch": n, "portion_size": portion, "iterations": len(per_iter),
                  "evaluations_per_iteration": [rec["evaluations"] for rec in its[1:]],
                  "median_iteration_s": round(statistics.median(per_iter), 4),
                  "iteration_s": [round(s, 4) for s in per_iter],
                  "median_batch_s": round(statistics.median(batches), 4),
                  "median_non_batch_s_per_iteration": round(statistics.median(overhead), 4),
                  "portions_by_replica": summary["portions_computed_by_replica"],
                  "backups_issued": summary["backups_issued"], "backups_won": summary["backups_won"],
                  "revocations": revocations(its),
                  "serial_median_iteration_s": reference["median_iteration_s"],
                  "speedup_vs_serial_2threads": round(reference["median_iteration_s"] / statistics.median(per_iter), 3),
                  "losses": [round(rec["loss"], 6) for rec in its], "command": cmd, "command_wall_s": round(wall, 2),
                  "cpu": cpu}
        by_r[r] = record
        emit(record)
        progress(f"iteration R={r}: {record['median_iteration_s']} s per iteration, "
                 f"batch {record['median_batch_s']} s (serial {reference['median_iteration_s']} s)")
    base = by_r[1]["median_iteration_s"]
    for r in replicas:
        by_r[r]["speedup_vs_r1"] = round(base / by_r[r]["median_iteration_s"], 3)
    return {"batch": n, "portion_size": portion, "iterations": iters, "load": quiet,
            "median_iteration_s_by_replicas": {str(r): by_r[r]["median_iteration_s"] for r in replicas},
            "median_batch_s_by_replicas": {str(r): by_r[r]["median_batch_s"] for r in replicas},
            "speedup_vs_r1": {str(r): by_r[r]["speedup_vs_r1"] for r in replicas},
            "speedup_vs_serial_2threads": {str(r): by_r[r]["speedup_vs_serial_2threads"] for r in replicas},
            "portions_revoked": {str(r): by_r[r]["revocations"]["portions_revoked"] for r in replicas},
            "serial_2threads_median_iteration_s": reference["median_iteration_s"],
            "serial_evaluation_s": {"1thread": reference["evaluation_s_1thread"],
                                    "2threads": reference["evaluation_s_2threads"]},
            "note": f"{os.cpu_count()} cores: R=2 (4 ranks) fills them, R=3 oversubscribes (3 computing "
                    f"ranks on {os.cpu_count()} cores; the shard and coordinator sleep during a batch)"}


def timeit(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# (2) Straggler ------------------------------------------------------------------------------
def ideal_batches(n_portions, replicas, delay, slow, factor, backups, batches=200, jitter=0.02, seed=0):
    """Mean batch seconds of the scheduler's policy without communication or compute: portions
    handed out in order on request; when none is free an idle replica (the slow one too)
    backs up the outstanding portion with the fewest copies (oldest first); a portion is
    done at its first finish. A replica still computing when the batch ends (a losing copy,
    or the slow replica's portion) carries that into the next batch, as in the real run.
    Portion times are jittered by +-jitter (uniform) so that ties break at random."""
    import random

    rng = random.Random(seed)
    busy_until = [0.0] * replicas  # relative to the start of the next batch
    times = []
    for _ in range(batches):
        done = [False] * n_portions
        copies = [0] * n_portions
        remaining, next_free, end = n_portions, 0, 0.0
        events = [(busy_until[r], r, None) for r in range(replicas)]
        heapq.heapify(events)
        finishing = {}
        while events:
            t, r, portion = heapq.heappop(events)
            if portion is not None:
                copies[portion] -= 1
                if not done[portion]:
                    done[portion] = True
                    remaining -= 1
                    end = t
            if remaining == 0:
                finishing[r] = max(t, end)
                continue
            if next_free < n_portions:
                p, next_free = next_free, next_free + 1
            elif backups:
                p = min((i for i in range(n_portions) if not done[i]), key=lambda i: (copies[i], i))
            else:
                continue  # idle until the batch ends
            copies[p] += 1
            speed = delay * (factor if r == slow else 1.0) * rng.uniform(1 - jitter, 1 + jitter)
            heapq.heappush(events, (t + speed, r, p))
        busy_until = [max(0.0, finishing.get(r, end) - end) for r in range(replicas)]
        times.append(end)
    return statistics.mean(times[10:])  # steady state


def bench_straggler(args, work, emit):
    r = 4 if args.quick else 10
    portions = 24 if args.quick else 200
    portion_size = 20
    delay = 0.05 if args.quick else 0.1
    factor = 10.0
    slow = r - 1
    iters = 2 if args.quick else 4
    n = portions * portion_size
    path = write_subset(work / f"fashion_first{n}.h5", n)
    quiet = wait_quiet("straggler", args.first_section)
    args.first_section = False
    common = [f"data.path=\"{path}\"", f"train.n_replicas={r}", "train.n_shards=1", f"train.batch_size={n}",
              f"train.portion_size={portion_size}", f"train.iterations={iters}"]
    env = {"DBMPI_PORTION_DELAY": str(delay)}
    cases = {
        "none_backup": (env, ["train.backup_tasks=true"]),
        "none_nobackup": (env, ["train.backup_tasks=false"]),
        "slow_backup": ({**env, "DBMPI_SLOW": f"{slow}:{factor:g}"}, ["train.backup_tasks=true"]),
        "slow_nobackup": ({**env, "DBMPI_SLOW": f"{slow}:{factor:g}"}, ["train.backup_tasks=false"]),
    }
    out = {}
    for name, (case_env, sets) in cases.items():
        summary, its, _, cmd, wall, cpu = train(work / f"strag-{name}", r + 2, common + sets, env=case_env)
        batches = [s for rec in its for s in rec["batch_seconds"]]
        later = batches[1:]  # the first evaluation also opens files and fetches cold
        out[name] = {"bench": "sandblaster_straggler", "case": name, "replicas": r, "shards": 1, "ranks": r + 2,
                     "portions": portions, "portion_size": portion_size, "portion_delay_s": delay,
                     "slow_replica": slow if "slow" in name else None, "slow_factor": factor if "slow" in name else 1.0,
                     "backup_tasks": "nobackup" not in name, "iterations": summary["iterations"],
                     "evaluations": len(batches), "mean_batch_s": round(statistics.mean(later), 4),
                     "mean_batch_s_all": round(statistics.mean(batches), 4),
                     "batch_seconds": batches, "backups_issued": summary["backups_issued"],
                     "backups_won": summary["backups_won"],
                     "revoked": sum(rec["revoked"] for rec in its),
                     "duplicates_rejected": sum(rec["duplicates_rejected"] for rec in its),
                     "portions_by_replica": [sum(rec["portions_by_replica"][i] for rec in its) for i in range(r)],
                     "portions_computed_by_replica": summary["portions_computed_by_replica"],
                     "losses": [round(rec["loss"], 6) for rec in its], "command": cmd,
                     "command_wall_s": round(wall, 2), "cpu": cpu}
        progress(f"straggler {name}: mean batch {out[name]['mean_batch_s']} s, backups "
                 f"{out[name]['backups_won']}/{out[name]['backups_issued']}, revoked {out[name]['revoked']}")
    base = out["none_backup"]["mean_batch_s"]
    base_nb = out["none_nobackup"]["mean_batch_s"]
    ideal_none = ideal_batches(portions, r, delay, None, factor, True)
    ideal_backup = ideal_batches(portions, r, delay, slow, factor, True)
    ideal_nobackup = ideal_batches(portions, r, delay, slow, factor, False)
    for rec in out.values():
        rec["overhead_vs_none_backup"] = round(rec["mean_batch_s"] / base - 1, 4)
        rec["overhead_vs_none_same_backup_setting"] = round(
            rec["mean_batch_s"] / (base if rec["backup_tasks"] else base_nb) - 1, 4)
        emit(rec)
    floor = r / (r - 1 + 1 / factor) - 1
    result = {
        "replicas": r, "shards": 1, "ranks": r + 2, "slow_replica": slow, "slow_factor": factor,
        "portions": portions, "portion_size": portion_size, "portion_delay_s": delay,
        "env": f"DBMPI_PORTION_DELAY={delay} DBMPI_SLOW={slow}:{factor:g}", "iterations": iters, "load": quiet,
        "mean_batch_s": {name: rec["mean_batch_s"] for name, rec in out.items()},
        "overhead_backup": out["slow_backup"]["overhead_vs_none_backup"],
        "overhead_nobackup": out["slow_nobackup"]["overhead_vs_none_backup"],
        "overhead_nobackup_vs_none_nobackup": out["slow_nobackup"]["overhead_vs_none_same_backup_setting"],
        # Against the faster no-straggler case (backups cost a little even without stragglers).
        "overhead_backup_vs_none_nobackup": round(out["slow_backup"]["mean_batch_s"] / base_nb - 1, 4),
        "capacity_floor": round(floor, 4),
        "ideal_schedule": {"none_s": round(ideal_none, 4), "slow_backup_s": round(ideal_backup, 4),
                           "slow_nobackup_s": round(ideal_nobackup, 4),
                           "overhead_backup": round(ideal_backup / ideal_none - 1, 4),
                           "overhead_nobackup": round(ideal_nobackup / ideal_none - 1, 4)},
        "measured_vs_ideal_none": round(base / ideal_none, 3),
        "backups_won": out["slow_backup"]["backups_won"], "backups_issued": out["slow_backup"]["backups_issued"],
        "slow_replica_share_backup": round(out["slow_backup"]["portions_by_replica"][slow]
                                           / max(1, sum(out["slow_backup"]["portions_by_replica"])), 4),
    }
    emit({"bench": "sandblaster_straggler_summary", **result})
    return result


# (3) Time to accuracy -----------------------------------------------------------------------
def scipy_reference(train_path, target, cap_s):
    first = _scipy_reference(train_path, target, cap_s)
    if first["cpu"]["foreign_cores"] <= FOREIGN_LIMIT:
        return first
    progress(f"scipy: other processes used {first['cpu']['foreign_cores']} cores meanwhile; measuring again")
    wait_quiet("retry scipy", False, max_wait=180)
    again = _scipy_reference(train_path, target, cap_s)
    again["cpu"]["first_attempt"] = {"cpu": first["cpu"], "seconds_to_target": first["seconds_to_target"]}
    return again


def _scipy_reference(train_path, target, cap_s, chunk=10000):
    """L-BFGS-B from the MLP's initial point with 2 BLAS threads; the test set is evaluated
    after every iteration and that time is taken out of the clock."""
    import numpy as np
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_info, threadpool_limits

    import dbmpi.model  # noqa: F401  (loads the OpenBLAS the kernels use, for threadpoolctl to see)
    from dbmpi import config
    from dbmpi.model import Network

    network = Network(config.load(MLP_CONFIG, require_train=False)["model"])
    x, y = load_split(train_path, "train")
    tx, ty = load_split(train_path, "test")
    n = len(x)
    with threadpool_limits(limits=2, user_api="blas"):
        blas = [{"filepath": Path(i["filepath"]).name, "num_threads": i["num_threads"]}
                for i in threadpool_info() if i["user_api"] == "blas"]
        # Does the limit take effect? One gradient chunk with 2 threads against 1.
        probe = min(n, 6000)
        two = min(timeit(lambda: network.loss_and_grad(x[:probe], y[:probe])) for _ in range(3))
        with threadpool_limits(limits=1, user_api="blas"):
            one = min(timeit(lambda: network.loss_and_grad(x[:probe], y[:probe])) for _ in range(3))
        network.init_params()

        def fun(point):
            network.params[:] = point
            loss, grad = 0.0, np.zeros(network.n_params)
            for a in range(0, n, chunk):
                b = min(a + chunk, n)
                loss += network.loss_and_grad(x[a:b], y[a:b]) * ((b - a) / n)
                grad += network.grad * ((b - a) / n)
            return loss, grad

        trace, state = [], {"evaluating": 0.0, "reached": None}
        x0 = network.params.astype(np.float64)
        meter = CpuMeter()
        start = time.perf_counter()

        def callback(intermediate_result):
            now = time.perf_counter()
            clock = now - start - state["evaluating"]
            network.params[:] = intermediate_result.x
            _, acc = network.evaluate(tx, ty)
            state["evaluating"] += time.perf_counter() - now
            trace.append({"iteration": len(trace) + 1, "time_s": round(clock, 3), "test_accuracy": acc,
                          "loss": round(float(intermediate_result.fun), 6)})
            if acc >= target and state["reached"] is None:
                state["reached"] = trace[-1]
            if state["reached"] is not None or clock > cap_s:
                raise StopIteration

        result = minimize(fun, x0, jac=True, method="L-BFGS-B", callback=callback,
                          options={"maxcor": 10, "maxiter": 100000})
        cpu = meter.stop()
        FOREIGN.append(cpu["foreign_cores"])
    reached = state["reached"]
    return {"bench": "sandblaster_accuracy_reference", "what": "scipy.optimize.minimize L-BFGS-B, one process",
            "blas": blas, "grad_s_2threads": round(two, 4), "grad_s_1thread": round(one, 4),
            "blas_limit_effective": one / two > 1.2, "n_train": n, "target": target,
            "seconds_to_target": reached["time_s"] if reached else None,
            "iterations_to_target": reached["iteration"] if reached else None,
            "function_evaluations": int(result.nfev), "message": str(result.message),
            "evaluation_seconds_excluded": round(state["evaluating"], 2),
            "final_test_accuracy": trace[-1]["test_accuracy"] if trace else None, "cpu": cpu,
            "accuracy_trace": [[t["iteration"], t["time_s"], t["test_accuracy"]] for t in trace]}


def sandblaster_to_target(work, name, train_path, sets, target, cap_s, emit):
    import numpy as np
    from threadpoolctl import threadpool_limits

    import dbmpi.model  # noqa: F401
    from dbmpi import config
    from dbmpi.model import Network

    snaps = work / f"snap-{name}"
    snaps.mkdir()
    run_dir = work / f"acc-{name}"
    all_sets = [f"data.path=\"{train_path}\"", "train.n_replicas=2", "train.n_shards=1",
                "train.iterations=100000", f"train.time_budget_s={cap_s}", *sets]
    summary, its, _, cmd, wall, cpu = train(run_dir, 4, all_sets, snapshots=snaps)
    copies = np.load(snaps / "x_rank2.npy")  # rank 2 is the shard of R = 2, S = 1
    stepped = [rec for rec in its[1:] if rec.get("status") in ("ok", "recovered")]
    if len(stepped) != len(copies):
        raise RuntimeError(f"{name}: {len(copies)} copies of x for {len(stepped)} accepted steps")
    network = Network(config.load(MLP_CONFIG, require_train=False)["model"])
    tx, ty = load_split(train_path, "test")
    reached, trace = None, []
    with threadpool_limits(limits=2, user_api="blas"):
        for rec, params in zip(stepped, copies, strict=True):
            network.params[:] = params
            _, acc = network.evaluate(tx, ty)
            trace.append([rec["iteration"], rec["time_s"], acc])
            if acc >= target:
                reached = {"iteration": rec["iteration"], "time_s": rec["time_s"], "test_accuracy": acc}
                break
        final_acc = None
        if len(copies):
            network.params[:] = copies[-1]
            final_acc = network.evaluate(tx, ty)[1]
    evals = [len(rec["batch_seconds"]) for rec in its[1:]]
    batches = [s for rec in its[1:] for s in rec["batch_seconds"]]
    record = {"bench": "sandblaster_accuracy", "run": name, "replicas": 2, "shards": 1, "ranks": 4,
              "batch_size": summary["batch_size"], "portion_size": summary["portion_size"], "target": target,
              "seconds_to_target": reached["time_s"] if reached else None,
              "iterations_to_target": reached["iteration"] if reached else None,
              "iterations": summary["iterations"], "status": summary["status"],
              "evaluations": summary["evaluations"],
              "mean_evaluations_per_iteration": round(statistics.mean(evals), 2) if evals else None,
              "median_batch_s": round(statistics.median(batches), 4) if batches else None,
              "time_budget_s": cap_s, "final_test_accuracy": summary["test_accuracy"],
              "final_copy_test_accuracy": final_acc,
              "copy_check": None if final_acc is None else abs(final_acc - summary["test_accuracy"]) <= 2e-4,
              "run_time_s": summary["wall_time_s"], "command_wall_s": round(wall, 2), "cpu": cpu,
              "backups_won": summary["backups_won"], "backups_issued": summary["backups_issued"],
              "revocations": revocations(its), "accuracy_trace": trace, "command": cmd}
    emit(record)
    progress(f"accuracy {name}: {record['seconds_to_target']} s to {target} "
             f"({record['iterations_to_target']} iterations; final {summary['test_accuracy']:.4f})")
    return record


def bench_accuracy(args, work, emit):
    if args.quick:
        n = 6000
        train_path = write_subset(work / f"fashion_first{n}.h5", n)
        target, scipy_cap = 0.70, 20.0
        configs = {"mb1500_p250": ["train.batch_size=1500", "train.portion_size=250"]}
        designated = "mb1500_p250"
    else:
        n, train_path = 60000, FASHION
        target, scipy_cap = args.target, 200.0
        configs = {
            "full_p1000": ["train.batch_size=60000", "train.portion_size=1000"],
            "mb12000_p1000": ["train.batch_size=12000", "train.portion_size=1000"],
            "mb6000_p500": ["train.batch_size=6000", "train.portion_size=500"],
            "mb6000_p250": ["train.batch_size=6000", "train.portion_size=250"],
            "mb3000_p250": ["train.batch_size=3000", "train.portion_size=250"],
        }
        designated = "mb6000_p500"  # configs/sandblaster_fashion.toml
    quiet = wait_quiet("accuracy", args.first_section)
    args.first_section = False
    progress(f"accuracy: scipy L-BFGS-B to {target} on {n} examples")
    reference = scipy_reference(train_path, target, scipy_cap)
    emit(reference)
    t_ref = reference["seconds_to_target"]
    progress(f"accuracy: scipy reached {target} in {t_ref} s ({reference['iterations_to_target']} iterations)")
    # A run cannot stop when it reaches the target (accuracy is known only afterwards), so
    # each gets a time budget: full batch 1.1x scipy's time (to see how it compares), the
    # minibatch runs 0.7x (the goal; one that has not reached the target by then is
    # reported as not reached, ratio > 0.7); at least 4 s, at most 150 s.
    caps = {name: round(min(150.0, max(4.0, (1.1 if name.startswith("full") else 0.7) * (t_ref or scipy_cap))), 1)
            for name in configs}
    runs = {}
    for name, sets in configs.items():
        wait_quiet(f"accuracy {name}", False, max_wait=120)
        runs[name] = sandblaster_to_target(work, name, train_path, sets, target, caps[name], emit)
    reached = {k: v["seconds_to_target"] for k, v in runs.items() if v["seconds_to_target"] is not None}
    best = min(reached, key=reached.get) if reached else None
    best_ratio = None if (best is None or not t_ref) else round(reached[best] / t_ref, 3)
    ratio = None if (designated not in reached or not t_ref) else round(reached[designated] / t_ref, 3)
    return {"target": target, "n_train": n, "load": quiet,
            "target_choice": ("the highest whole percent that scipy's full-batch L-BFGS-B reaches within "
                              "about 2 minutes here (exploratory runs: 0.80 after ~24 iterations / ~50 s, 0.84 "
                              "after ~60 iterations / ~120 s; 0.85 needs well over 3 minutes) and that "
                              "minibatch Sandblaster reaches (batch 6000 levels off near 0.845-0.85)")
            if not args.quick else "quick mode",
            "scipy_seconds": t_ref, "scipy_iterations": reference["iterations_to_target"],
            "scipy_blas": reference["blas"], "scipy_blas_limit_effective": reference["blas_limit_effective"],
            "sandblaster_time_budget_s": caps,
            "sandblaster_seconds": {k: v["seconds_to_target"] for k, v in runs.items()},
            "sandblaster_iterations": {k: v["iterations_to_target"] for k, v in runs.items()},
            "ratio_vs_scipy": {k: (None if v["seconds_to_target"] is None or not t_ref
                                   else round(v["seconds_to_target"] / t_ref, 3)) for k, v in runs.items()},
            "designated": designated, "time_to_acc_vs_scipy": ratio,
            "best": best, "time_to_acc_vs_scipy_best": best_ratio,
            "headline": "time_to_acc_vs_scipy is the designated run (configs/sandblaster_fashion.toml's settings, "
                        "chosen before this run); the best of all runs is a post-hoc pick among noisy single runs",
            "time_to_acc_vs_scipy_full_batch": (None if "full_p1000" not in runs or not t_ref
                                                or runs["full_p1000"]["seconds_to_target"] is None
                                                else round(runs["full_p1000"]["seconds_to_target"] / t_ref, 3)),
            "copy_checks": {k: v["copy_check"] for k, v in runs.items()},
            "revocations": {k: v["revocations"] for k, v in runs.items()},
            "final_test_accuracy": {k: v["final_test_accuracy"] for k, v in runs.items()},
            "clock": "both exclude start-up, data loading and test evaluations; Sandblaster: coordinator "
                     "time_s (R=2, S=1, 4 ranks on 2 cores); scipy: perf_counter around minimize minus "
                     "callback evaluation time"}


# Main ---------------------------------------------------------------------------------------
def environment():
    import numpy as np
    from mpi4py import MPI
    from threadpoolctl import threadpool_info

    import dbmpi.model  # noqa: F401

    blas = [{k: i.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return {"bench": "environment", "python": platform.python_version(), "numpy": np.__version__,
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "mpi": MPI.Get_library_version().splitlines()[0].strip(), "loadavg": loadavg(), "blas": blas,
            "argv": sys.argv[1:]}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small cases (a smoke test, under a minute)")
    parser.add_argument("--no-record", action="store_true", help=f"do not append to {RESULTS.relative_to(ROOT)}")
    parser.add_argument("--only", choices=SECTIONS, action="append", help="run only this section (repeatable)")
    parser.add_argument("--target", type=float, default=0.84, help="test accuracy target of (3) (default 0.84)")
    return parser.parse_args()


def main():
    args = parse_args()
    sections = args.only or list(SECTIONS)
    args.first_section = True
    lines = []

    def emit(record):
        lines.append(json.dumps(record))
        print(lines[-1], flush=True)
        return record

    if not FASHION.exists():
        from dbmpi import data as datasets
        progress(f"preparing {FASHION}")
        datasets.prepare("fashion-mnist", FASHION)
    env = emit(environment())
    work = Path(tempfile.mkdtemp(prefix="dbmpi-sandblaster-bench-"))
    started = time.perf_counter()
    results = {}
    try:
        for section in SECTIONS:
            if section in sections:
                progress(f"section {section}")
                results[section] = {"iteration": bench_iteration, "straggler": bench_straggler,
                                    "accuracy": bench_accuracy}[section](args, work, emit)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    strag, acc = results.get("straggler", {}), results.get("accuracy", {})
    final = {
        "straggler_overhead_backup": strag.get("overhead_backup"),
        "straggler_overhead_nobackup": strag.get("overhead_nobackup"),
        "time_to_acc_vs_scipy": acc.get("time_to_acc_vs_scipy"),
        "time_to_acc_vs_scipy_best": acc.get("time_to_acc_vs_scipy_best"),
        "straggler_floor": strag.get("capacity_floor"),
        "straggler_replicas": strag.get("replicas"),
        "median_iteration_s_by_replicas": results.get("iteration", {}).get("median_iteration_s_by_replicas"),
        **{section: results.get(section) for section in SECTIONS},
        "quick": args.quick, "cpu_count": os.cpu_count(), "mpi": env["mpi"],
        "loadavg_start": env["loadavg"], "loadavg_end": loadavg(),
        "foreign_cores_max": max((f for f in FOREIGN if f is not None), default=None),
        "foreign_cores_all": FOREIGN,
        "bench_seconds": round(time.perf_counter() - started, 1),
    }
    emit(final)
    if not args.no_record:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--snapshot-child":
        sys.exit(snapshot_child(sys.argv[2], sys.argv[3:]))
    main()
