"""Downpour benchmarks, each against a reference measured in the same run.

(b) samples/s against the number of replicas (1, 2, 3; S = 1) on the Fashion-MNIST MLP, with
    the single-process SGD baseline as reference.
(c) time to 88% test accuracy on Fashion-MNIST for single-replica SGD and Downpour R = 2
    (S = 1, 3 ranks) with each shard optimizer at its tuned learning rate (SHARD_OPTIMIZERS),
    against PyTorch CPU SGD (momentum 0.9, its own tuned rate) on the same MLP, batch, data
    and cores when torch is installed; and Downpour with staleness-aware shards
    (STALENESS_AWARE). `--sweep` runs the learning-rate sweeps these rates
    came from instead (each Downpour run capped by a time budget).
(d) the speech model (42M parameters) on synthetic data: steps/s per replica and the bytes
    each replica fetches and pushes per step.

Every run is the real command line (`mpiexec -n N dbmpi train ...`) in a subprocess; times
come from the runs' own metrics. Prints one JSON object per measurement, and last:
{"samples_per_s_by_replicas", "time_to_88_vs_torch", ...}.

    python bench/downpour.py [--quick] [--skip-speech] [--skip-throughput] [--cores N] [--sweep]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.88


def mpiexec():
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else shutil.which("mpiexec")


def emit(record):
    print(json.dumps(record), flush=True)
    return record


def dbmpi_train(config, run_dir, sets, ranks=None, threads=1, timeout=3600, env=None):
    """Run `dbmpi train` (under mpiexec when ranks is given; `env`: variables added to this
    process's environment); returns (summary, records)."""
    env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "dbmpi", "train", str(config), "--run-dir", str(run_dir), "--quiet"]
    if ranks is not None:
        cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", *cmd[1:]]
    else:
        cmd += ["--threads", str(threads)]
    for item in sets:
        cmd += ["--set", item]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    from dbmpi.io.rundir import read_metrics

    records = read_metrics(run_dir)
    return summary, records


def time_to(records, target):
    """Wall seconds (from the run's start) of the first evaluation at or above target."""
    for r in records:
        if r["kind"] == "eval" and r.get("test_accuracy", 0) >= target:
            return r["time"]
    return None


def bench_replicas(work, data, steps, cores):
    base, _ = dbmpi_train(ROOT / "configs/mlp_fashion.toml", work / "b-single",
                          [f"data.path={data}", f"train.steps={steps}", "train.eval_every=100000"], threads=1)
    by_replicas = {}
    for r in (1, 2, 3):
        summary, _ = dbmpi_train(ROOT / "configs/downpour_fashion.toml", work / f"b-r{r}",
                                 [f"data.path={data}", f"train.n_replicas={r}", "train.n_shards=1",
                                  f"train.steps={steps}", "train.warmstart_steps=0", "train.eval_every=100000"],
                                 ranks=r + 1)
        by_replicas[r] = summary["samples_per_s"]
        emit({"bench": "downpour_samples_per_s", "replicas": r, "shards": 1, "ranks": r + 1, "cores": cores,
              "samples_per_s": summary["samples_per_s"], "single_process_sgd_samples_per_s": base["samples_per_s"],
              "ratio_vs_single": summary["samples_per_s"] / base["samples_per_s"],
              "mean_staleness": summary["mean_staleness"]})
    return by_replicas, base["samples_per_s"]


# (c): each shard optimizer at the learning rate its sweep (--sweep) picked for R = 2, S = 1.
SHARD_OPTIMIZERS = {"sgd": 0.1, "momentum": 0.01, "nesterov": 0.02, "adagrad": 0.03, "adam": 0.001,
                    "adamw": 0.001}
# (c) also: staleness-aware shards (train.staleness_aware) with this optimizer and rate (its
# steps are scaled by 1 / staleness, about 0.7 at R = 2, so the rate is raised by about 1 / 0.7).
STALENESS_AWARE = ("nesterov", 0.03)
TORCH_LR = 0.05  # PyTorch SGD momentum 0.9: the best of its sweep (0.01, 0.02, 0.05)
SWEEP = {"adam": (0.001, 0.002), "nesterov": (0.01, 0.02), "momentum": (0.01,), "sgd": (0.1,),
         "adagrad": (0.05,)}
TORCH_SWEEP = (0.02, 0.05)


def downpour_time_to_accuracy(work, data, optimizer, lr, epochs, eval_every, extra=()):
    """Downpour R = 2, S = 1 (3 ranks, the least oversubscribed layout on 2 cores) with the
    shards applying `optimizer`: (seconds to TARGET or None, final accuracy, wall, steps to
    TARGET of replica 0 or None)."""
    name = f"c-{optimizer}-{lr:g}-{len(list(work.glob('c-*')))}"
    sets = [f"data.path={data}", f"train.epochs={epochs}", f"train.eval_every={eval_every}",
            f"train.optimizer={optimizer}", f"train.learning_rate={lr}", "train.n_shards=1", *extra]
    summary, records = dbmpi_train(ROOT / "configs/downpour_fashion.toml", work / name, sets, ranks=3)
    return (time_to(records, TARGET), summary["test_accuracy"], summary["wall_time_s"],
            steps_to(records, TARGET))


def steps_to(records, target):
    """The step of the first evaluation at or above target."""
    return next((r.get("step") for r in records if r["kind"] == "eval" and r.get("test_accuracy", 0) >= target),
                None)


def bench_time_to_accuracy(work, data, epochs, eval_every, cores, cap=2.0):
    """(c). PyTorch first: every dbmpi run is stopped by a time budget of `cap` times its
    time to TARGET (a run that has not reached TARGET by then reports None). Each run's
    record is printed as it ends, with the load average then (other jobs share the cores)."""
    runs = {}

    def record(name, lr, result):
        runs[name] = result
        t, acc, wall, steps = result
        emit({"bench": "time_to_accuracy", "run": name, "target": TARGET, "seconds": t, "steps": steps,
              "final_test_accuracy": acc, "wall_s": wall, "cores": cores, "lr": lr,
              "load_1min_after": round(os.getloadavg()[0], 2)})

    record("torch_sgd", TORCH_LR, torch_time_to_accuracy(data, epochs, eval_every, cores, TORCH_LR))
    budget = [f"train.time_budget_s={cap * runs['torch_sgd'][0]:.0f}"] if runs["torch_sgd"][0] else []
    common = [f"data.path={data}", f"train.epochs={epochs}", f"train.eval_every={eval_every}", *budget]
    summary, records = dbmpi_train(ROOT / "configs/mlp_fashion.toml", work / "c-single", common, threads=cores)
    record("single_sgd", "config (momentum 0.9, 0.02)",
           (time_to(records, TARGET), summary["test_accuracy"], summary["wall_time_s"], steps_to(records, TARGET)))
    for optimizer, lr in SHARD_OPTIMIZERS.items():
        record(f"downpour_{optimizer}_r2", lr,
               downpour_time_to_accuracy(work, data, optimizer, lr, 2 * epochs, eval_every, budget))
    optimizer, lr = STALENESS_AWARE
    record(f"downpour_{optimizer}_staleness_aware_r2", lr,
           downpour_time_to_accuracy(work, data, optimizer, lr, 2 * epochs, eval_every,
                                     [*budget, "train.staleness_aware=true"]))
    return runs


def bench_sweep(work, data, cores, budget_s=90.0):
    """The learning-rate sweeps behind SHARD_OPTIMIZERS and TORCH_LR (one run at a time)."""
    cap = [f"train.time_budget_s={budget_s}"]
    for lr in TORCH_SWEEP:
        t, acc, wall, steps = torch_time_to_accuracy(data, 12, 150, cores, lr)
        emit({"bench": "sweep", "run": "torch_sgd", "lr": lr, "seconds": t, "steps": steps,
              "final_test_accuracy": acc, "wall_s": wall})
    for optimizer, rates in SWEEP.items():
        for lr in rates:
            t, acc, wall, steps = downpour_time_to_accuracy(work, data, optimizer, lr, 24, 150, cap)
            emit({"bench": "sweep", "run": f"downpour_{optimizer}_r2", "lr": lr, "seconds": t, "steps": steps,
                  "final_test_accuracy": acc, "wall_s": wall})
    for rhythm in (2,):  # fetch and push every 2 steps
        extra = [*cap, f"train.n_fetch={rhythm}", f"train.n_push={rhythm}"]
        t, acc, wall, steps = downpour_time_to_accuracy(work, data, "adam", 0.001, 24, 150, extra)
        emit({"bench": "sweep", "run": "downpour_adam_r2", "lr": 0.001, "n_fetch": rhythm, "n_push": rhythm,
              "seconds": t, "steps": steps, "final_test_accuracy": acc, "wall_s": wall})


def torch_time_to_accuracy(data, epochs, eval_every, cores, lr):
    """PyTorch SGD momentum 0.9 on the same MLP, batch and data with `cores` threads, until
    TARGET or `epochs`: (seconds to TARGET or None, last accuracy, wall, steps to TARGET or None)."""
    try:
        import torch
    except ImportError:
        return (None, None, None, None)
    import numpy as np

    from dbmpi.data import open_dataset

    torch.set_num_threads(cores)
    torch.manual_seed(0)
    with open_dataset(data) as ds:
        x, y = ds.load("train")
        tx, ty = ds.load("test")
    x, tx = torch.from_numpy(x.reshape(len(x), -1)), torch.from_numpy(tx.reshape(len(tx), -1))
    y, ty = torch.from_numpy(y.astype(np.int64)), torch.from_numpy(ty.astype(np.int64))
    model = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                                torch.nn.ReLU(), torch.nn.Linear(512, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    start, step = time.perf_counter(), 0
    for _ in range(int(np.ceil(epochs))):
        order = torch.from_numpy(rng.permutation(len(x)))
        for i in range(0, len(x) - 127, 128):
            idx = order[i:i + 128]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
            if step % eval_every == 0:
                with torch.no_grad():
                    acc = (model(tx).argmax(1) == ty).float().mean().item()
                if acc >= TARGET:
                    return (time.perf_counter() - start, acc, time.perf_counter() - start, step)
    with torch.no_grad():
        acc = (model(tx).argmax(1) == ty).float().mean().item()
    return (None, acc, time.perf_counter() - start, None)


def speech_config(work, steps):
    """A Downpour config of the speech model (R = 2, S = 2) on synthetic data, for `steps`
    steps and no evaluation; None without the synthetic data source."""
    from dbmpi import data as datasets

    if "synthetic" not in datasets.SOURCES:
        return None
    path = work / "speech.h5"
    if not path.exists():
        datasets.prepare("synthetic", path, config=str(ROOT / "configs/speech.toml"), n_train=4096, n_test=1024)
    config = work / f"speech_downpour_{steps}.toml"
    config.write_text((ROOT / "configs/speech.toml").read_text() + f"""
[data]
path = "{path}"

[train]
algorithm = "downpour"
n_replicas = 2
n_shards = 2
optimizer = "adagrad"
learning_rate = 0.01
batch_size = 128
steps = {steps}
log_every = 1
eval_every = 1000000  # throughput only: no evaluation during training
""")
    return config


def bench_speech(work, steps):
    config = speech_config(work, steps)
    if config is None:
        return emit({"bench": "speech_downpour", "skipped": "no synthetic data source"})
    summary, records = dbmpi_train(config, work / "d-speech", [], ranks=4)
    replicas = [r for r in records if r["kind"] == "replica"]
    n_params = summary["n_params"]
    return emit({"bench": "speech_downpour", "n_params": n_params, "replicas": 2, "shards": 2,
                 "steps_per_s_by_replica": [round(r["steps"] / r["wall_s"], 3) for r in replicas],
                 "bytes_fetched_per_step": [r["bytes_fetched"] / r["steps"] for r in replicas],
                 "bytes_pushed_per_step": [r["bytes_pushed"] / r["steps"] for r in replicas],
                 "parameter_bytes": 4 * n_params})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test of the script)")
    parser.add_argument("--skip-speech", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true", help="leave out (b)")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--sweep", action="store_true", help="the learning-rate sweeps of (c) only")
    args = parser.parse_args()
    from dbmpi import data as datasets

    work = Path(tempfile.mkdtemp(prefix="dbmpi-bench-"))
    try:
        fashion = work / "fashion.h5"
        datasets.prepare("fashion-mnist", fashion)
        if args.sweep:
            return bench_sweep(work, fashion, args.cores)
        steps = 100 if args.quick else 400
        by_replicas, single = ({}, None) if args.skip_throughput else bench_replicas(work, fashion, steps, args.cores)
        runs = bench_time_to_accuracy(work, fashion, 1 if args.quick else 12, 200 if args.quick else 150,
                                      args.cores)
        if not args.skip_speech:
            bench_speech(work, 2 if args.quick else 6)
        torch_t = runs["torch_sgd"][0]
        downpour = {name: run[0] for name, run in runs.items() if name.startswith("downpour")}
        best = min((t for t in downpour.values() if t), default=None)
        print(json.dumps({
            "samples_per_s_by_replicas": {str(r): v for r, v in by_replicas.items()},
            "single_process_samples_per_s": single,
            "time_to_88_s": {name: run[0] for name, run in runs.items()},
            "time_to_88_vs_torch_by_optimizer": {name: None if not (torch_t and t) else round(t / torch_t, 3)
                                                 for name, t in downpour.items()},
            "time_to_88_vs_torch": None if not (torch_t and best) else round(best / torch_t, 3),
        }), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
