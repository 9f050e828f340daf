"""PyTorch models (issue 16): a torch CNN trained by dbmpi against PyTorch's own ways of
training it, all on the same cores, and the adapter's cost per step.

(a) Time to a fixed test accuracy (--target, 0.86) on Fashion-MNIST for examples/torch_cnn.py's
    make_cnn (28x28x1 inputs, widths CNN_ARGS), batch BATCH per worker, Adam at each
    contender's own rate (RATES, from --sweep), for three contenders:
    - dbmpi Downpour, R = 2 replicas, S = 1 shard (3 ranks on 2 cores: one fewer rank than
      S = 2, and a 203K-parameter model's Adam update is little work for one shard): the
      real `mpiexec -n 3 python -m mpi4py -m dbmpi train CONFIG` in a subprocess;
    - PyTorch DistributedDataParallel, gloo backend, 2 processes of 1 thread, each its half
      of the training set (so each step averages 2 x BATCH examples);
    - one PyTorch process with 2 threads.
    No contender evaluates while it trains: every SNAPSHOT_EVERY steps (of replica 0, of DDP
    rank 0, of the single process) the parameters are saved with the seconds since training
    started (dbmpi: its checkpoints, written by the shard, and the `time` they carry, counted
    from replica 0's first step), and after the run the snapshots are scored on the whole
    test set, in order, by the same evaluator, until one reaches the target. So the times
    exclude evaluation and start-up (process launch, imports, data loading) alike, and
    dbmpi's include the checkpoint writes. Each run stops after --budget seconds.
(b) The adapter's overhead: TorchModel.loss_and_grad (NHWC numpy batch in, gradient in the
    flat vector) against the bare PyTorch step (zero_grad, forward, cross_entropy, backward
    on NCHW tensors) on two copies of the same module and the same batches, one thread,
    interleaved rounds, median of the per-round ratios.

Prints one JSON object per measurement, and last {"adapter_overhead", "time_to_acc_vs_ddp",
"time_to_acc_vs_torch_single", ...}: ratios are dbmpi's time over the reference's (< 1:
dbmpi is faster); adapter_overhead is adapter / bare - 1.

    flock /tmp/bench.lock python bench/torch_models.py [--quick] [--target 0.86] [--budget 60] [--sweep]
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from downpour import dbmpi_train, emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CNN = ROOT / "examples" / "torch_cnn.py"
CNN_ARGS = {"image": 28, "width": 8, "hidden": 64}
BATCH = 128
SEED = 0
SNAPSHOT_EVERY = 25  # steps of replica 0 / DDP rank 0 / the single process
# Adam's learning rate per contender: the fewest steps to the target in the sweep (--sweep).
RATES = {"dbmpi_downpour": 0.004, "torch_ddp": 0.004, "torch_single": 0.004}
SWEEP_RATES = (0.0005, 0.001, 0.002, 0.004)


# The model and the data -------------------------------------------------------------------
def make_module():
    """make_cnn(**CNN_ARGS) after torch.manual_seed(SEED): the same initial values everywhere."""
    import torch

    from dbmpi.model.loader import load_factory

    torch.manual_seed(SEED)
    return load_factory(f"{CNN}:make_cnn")(**CNN_ARGS)


def load_fashion(path):
    """((x, y), (test_x, test_y)) as dbmpi stores them: NHWC float32, int32 labels."""
    from dbmpi.data import open_dataset

    with open_dataset(path) as ds:
        return ds.load("train"), ds.load("test")


def nchw(x):
    """A torch tensor of NHWC rows, as the module takes them (N, C, H, W), contiguous."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def flat_params(module) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch.nn.utils.parameters_to_vector(module.parameters()).numpy().copy()


class Snapshots:
    """Parameter vectors saved while training, each with its step and seconds since the
    first step; written to an .npz for the scoring after the run."""

    def __init__(self):
        self.steps, self.seconds, self.params = [], [], []

    def add(self, step, seconds, params):
        self.steps.append(step)
        self.seconds.append(seconds)
        self.params.append(params)

    def save(self, path):
        np.savez(path, steps=np.array(self.steps), seconds=np.array(self.seconds),
                 params=np.array(self.params, dtype=np.float32).reshape(len(self.steps), -1))


def first_at_target(snapshots, test, target, threads=2):
    """Score the snapshots ((step, seconds, params) in order) on the test set until one
    reaches target: (seconds, step, accuracy) of that one, or (None, None, best accuracy)."""
    import torch

    torch.set_num_threads(threads)
    module = make_module().eval()
    tx, ty = nchw(test[0]), torch.from_numpy(test[1].astype(np.int64))
    best = None
    for step, seconds, params in snapshots:
        torch.nn.utils.vector_to_parameters(torch.from_numpy(np.asarray(params, np.float32)), module.parameters())
        with torch.no_grad():
            correct = sum(int((module(tx[i:i + 1000]).argmax(1) == ty[i:i + 1000]).sum())
                          for i in range(0, len(ty), 1000))
        accuracy = correct / len(ty)
        if accuracy >= target:
            return seconds, step, accuracy
        best = accuracy if best is None else max(best, accuracy)
    return None, None, best


def npz_snapshots(path):
    with np.load(path) as f:
        return list(zip(f["steps"].tolist(), f["seconds"].tolist(), f["params"], strict=True))


# Contender: one PyTorch process ------------------------------------------------------------
def torch_single(train, lr, budget, threads=2):
    """One process, `threads` threads, Adam: Snapshots of `budget` seconds of training."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    module = make_module()
    x, y = nchw(train[0]), torch.from_numpy(train[1].astype(np.int64))
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    snaps = Snapshots()
    run_epochs(module, opt, F, x, y, np.random.default_rng(SEED), budget, snaps)
    return snaps


def run_epochs(module, opt, F, x, y, rng, budget, snaps, stop_agreed=None):
    """Adam steps over shuffled batches of (x, y) until `budget` seconds have passed (or,
    for DDP, until `stop_agreed(elapsed)` says so at a snapshot); a snapshot every
    SNAPSHOT_EVERY steps. Returns the steps taken."""
    module.train()
    start, step = time.perf_counter(), 0
    while True:
        order = rng.permutation(len(x))
        for i in range(0, len(x) - BATCH + 1, BATCH):
            idx = torch_index(order[i:i + BATCH])
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(module(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
            if step % SNAPSHOT_EVERY == 0:
                elapsed = time.perf_counter() - start
                if snaps is not None:
                    snaps.add(step, elapsed, flat_params(getattr(module, "module", module)))
                done = stop_agreed(elapsed) if stop_agreed else elapsed >= budget
                if done:
                    return step


def torch_index(order):
    import torch

    return torch.from_numpy(np.ascontiguousarray(order))


# Contender: PyTorch DDP ----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torch_ddp(data, lr, budget, work, world=2):
    """DDP with gloo: `world` processes of this script (--ddp-rank), 1 thread each, under a
    timeout; rank 0's Snapshots come back in an .npz."""
    port, out = free_port(), work / f"ddp-{lr:g}-{time.time_ns()}.npz"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--data", str(data), "--lr", str(lr), "--budget", str(budget),
           "--ddp-out", str(out), "--ddp-rank"]
    procs = [subprocess.Popen([*cmd, str(r)], env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    failed = []
    for r, p in enumerate(procs):
        try:
            _, err = p.communicate(timeout=budget + 300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError(f"DDP rank {r} ran past its timeout") from None
        if p.returncode != 0:
            failed.append(f"rank {r} (exit {p.returncode}): {err[-2000:]}")
    if failed:
        raise RuntimeError("DDP failed: " + "\n".join(failed))
    return npz_snapshots(out)


def ddp_worker(rank, data, lr, budget, out):
    """One DDP rank: its half of the training set (a fixed split, reshuffled every epoch),
    Adam; rank 0 decides when the budget is spent (an all-reduce at every snapshot)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    (x, y), _ = load_fashion(data)
    half = len(x) // world
    x, y = nchw(x[rank * half:(rank + 1) * half]), torch.from_numpy(y[rank * half:(rank + 1) * half].astype(np.int64))
    model = torch.nn.parallel.DistributedDataParallel(make_module())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    snaps = Snapshots() if rank == 0 else None

    def stop_agreed(elapsed):
        flag = torch.tensor([1.0 if elapsed >= budget else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    dist.barrier()
    run_epochs(model, opt, F, x, y, np.random.default_rng(SEED + rank), budget, snaps, stop_agreed)
    if rank == 0:
        snaps.save(out)
    dist.destroy_process_group()


# Contender: dbmpi Downpour -------------------------------------------------------------------
def downpour_config(work, data, lr, budget) -> Path:
    """A Downpour R = 2, S = 1 config of the CNN: Adam on the shard, a checkpoint every
    SNAPSHOT_EVERY steps of replica 0 (all kept), no evaluation while training."""
    config = work / f"downpour-{lr:g}.toml"
    args = "\n".join(f"{k} = {v}" for k, v in CNN_ARGS.items())
    config.write_text(f"""
[model]
name = "cnn-fashion-torch"
input_shape = [28, 28, 1]
seed = {SEED}
python = "{CNN}:make_cnn"

[model.args]
{args}

[data]
path = "{data}"
source = "fashion-mnist"

[train]
algorithm = "downpour"
n_replicas = 2
n_shards = 1
warmstart_steps = 0
optimizer = "adam"
learning_rate = {lr}
batch_size = {BATCH}
epochs = 1000
time_budget_s = {budget}
log_every = {SNAPSHOT_EVERY}
eval_every = 100000000
checkpoint_every = {SNAPSHOT_EVERY}
checkpoint_keep = 100000
seed = {SEED}
threads = 1
""")
    return config


def dbmpi_downpour(work, data, lr, budget):
    """The real `mpiexec -n 3 ... dbmpi train`; its checkpoints as (step, seconds since
    replica 0's first step, params), and the run's summary."""
    from dbmpi.io.checkpoint import open_checkpoint

    run_dir = work / f"run-downpour-{lr:g}-{time.time_ns()}"
    summary, records = dbmpi_train(downpour_config(work, data, lr, budget), run_dir, [], ranks=3,
                                   timeout=budget + 600)
    first = next(r for r in records if r["kind"] == "train" and r.get("replica") == 0)
    training_started = first["time"] - first["elapsed_s"]  # the run's clock at replica 0's start
    snaps = []
    for r in records:
        if r["kind"] == "checkpoint" and r.get("file"):
            with open_checkpoint(run_dir / "checkpoints" / Path(r["file"]).name, verify=False) as ckpt:
                snaps.append((r["step"], r["time"] - training_started, ckpt.read_range("params", 0, ckpt.n_params)))
    return sorted(snaps, key=lambda s: s[0]), summary


# (a) and the sweep ---------------------------------------------------------------------------
def run_contender(name, work, data, train, test, lr, budget, target):
    """Train one contender for `budget` seconds, score its snapshots: its record."""
    wall = time.perf_counter()
    extra = {}
    if name == "dbmpi_downpour":
        snaps, summary = dbmpi_downpour(work, data, lr, budget)
        extra = {"ranks": 3, "replicas": 2, "shards": 1, "mean_staleness": summary.get("mean_staleness")}
    elif name == "torch_ddp":
        snaps = torch_ddp(data, lr, budget, work)
        extra = {"processes": 2, "backend": "gloo", "threads_per_process": 1}
    else:
        result = torch_single(train, lr, budget)
        snaps = list(zip(result.steps, result.seconds, result.params, strict=True))
        extra = {"threads": 2}
    trained = time.perf_counter() - wall
    seconds, step, accuracy = first_at_target(snaps, test, target)
    last_step, last_seconds = (snaps[-1][0], snaps[-1][1]) if snaps else (None, None)
    return emit({"bench": "time_to_accuracy", "run": name, "target": target, "seconds": seconds,
                 "steps": step, "accuracy_at": accuracy, "lr": lr, "optimizer": "adam", "batch": BATCH,
                 "snapshots": len(snaps), "last_step": last_step, "last_snapshot_s": last_seconds,
                 "steps_per_s": None if not last_seconds else round(last_step / last_seconds, 2),
                 "run_wall_s": round(trained, 1), "load_1min_after": round(os.getloadavg()[0], 2), **extra})


def bench_time_to_accuracy(work, data, train, test, budget, target):
    return {name: run_contender(name, work, data, train, test, RATES[name], budget, target)
            for name in ("torch_single", "torch_ddp", "dbmpi_downpour")}


def bench_sweep(work, data, train, test, budget, target):
    """The learning-rate sweep behind RATES: every contender at every SWEEP_RATES rate; the
    best rate takes the fewest steps to the target (seconds, then, break ties): steps do not
    depend on the load other jobs put on the machine, seconds do."""
    best = {}
    for name in RATES:
        for lr in SWEEP_RATES:
            record = run_contender(name, work, data, train, test, lr, budget, target)
            if record["steps"] is None:
                continue
            key = (record["steps"], record["seconds"])
            if name not in best or key < best[name][1]:
                best[name] = (lr, key)
    return emit({"bench": "sweep_best", "target": target, "budget_s": budget,
                 "best_lr": {name: lr for name, (lr, _) in best.items()}})


# (b) The adapter's overhead ------------------------------------------------------------------
def bare_step(module, xb, yb):
    """The plain PyTorch step on NCHW tensors: zero_grad, forward, cross_entropy, backward."""
    import torch.nn.functional as F

    module.zero_grad(set_to_none=True)
    loss = F.cross_entropy(module(xb), yb)
    loss.backward()
    return loss.item()


def timed(fn, batches):
    start = time.perf_counter()
    for xb, yb in batches:
        fn(xb, yb)
    return (time.perf_counter() - start) / len(batches)


def bench_adapter_overhead(train, steps=20, rounds=9):
    """TorchModel.loss_and_grad against bare_step, same initial module, same batches, one
    thread; rounds alternate which goes first. Also times the adapter's own extras alone."""
    import torch

    from dbmpi.model.torch_adapter import TorchModel

    torch.set_num_threads(1)
    x, y = train
    batches = [(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]) for i in range(steps)]
    torch_batches = [(nchw(xb), torch.from_numpy(yb.astype(np.int64))) for xb, yb in batches]
    bare, model = make_module(), TorchModel(make_module(), (28, 28, 1), seed=SEED).allocate()
    bare.train()
    run_bare = lambda xb, yb: bare_step(bare, xb, yb)  # noqa: E731
    timed(run_bare, torch_batches[:3]), timed(model.loss_and_grad, batches[:3])  # warm up
    bare_s, adapter_s, ratios = [], [], []
    for r in range(rounds):
        if r % 2:
            a = timed(model.loss_and_grad, batches)
            b = timed(run_bare, torch_batches)
        else:
            b = timed(run_bare, torch_batches)
            a = timed(model.loss_and_grad, batches)
        bare_s.append(b), adapter_s.append(a), ratios.append(a / b)
    parts = adapter_parts(model, batches)
    return emit({"bench": "adapter_overhead", "batch": BATCH, "steps_per_round": steps, "rounds": rounds,
                 "bare_step_ms": round(1e3 * statistics.median(bare_s), 3),
                 "adapter_step_ms": round(1e3 * statistics.median(adapter_s), 3),
                 "overhead": round(statistics.median(ratios) - 1, 4),
                 "overhead_by_round": [round(v - 1, 4) for v in ratios], "adapter_extras_ms": parts})


def adapter_parts(model, batches, repeats=20):
    """What loss_and_grad does beyond the bare step, each timed alone (ms per step): the
    NHWC batch to the module's input, zeroing the flat gradient, the labels to int64."""
    import torch

    def per_step(fn):
        start = time.perf_counter()
        for _ in range(repeats):
            for xb, yb in batches:
                fn(xb, yb)
        return round(1e3 * (time.perf_counter() - start) / (repeats * len(batches)), 4)

    return {"inputs_nhwc_to_nchw": per_step(lambda xb, yb: model._inputs(xb)),
            "grad_fill_zero": per_step(lambda xb, yb: model.grad.fill(0.0)),
            "labels_to_int64": per_step(lambda xb, yb: torch.from_numpy(np.asarray(yb, dtype=np.int64)))}


# Main ----------------------------------------------------------------------------------------
def ratio(mine, reference):
    return None if not (mine and reference) else round(mine / reference, 3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test of the script")
    parser.add_argument("--target", type=float, default=0.86, help="test accuracy to reach (default 0.86)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of training per contender (default 60, --quick 20)")
    parser.add_argument("--sweep", action="store_true", help="the learning-rate sweep behind RATES only")
    parser.add_argument("--data", help="the Fashion-MNIST HDF5 file (default: prepared in a temp dir)")
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--ddp-rank", type=int, help=argparse.SUPPRESS)  # internal: one DDP process
    parser.add_argument("--ddp-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    budget = args.budget or (20.0 if args.quick else 60.0)
    if args.ddp_rank is not None:
        return ddp_worker(args.ddp_rank, args.data, args.lr, budget, args.ddp_out)
    from dbmpi import data as datasets

    work = Path(tempfile.mkdtemp(prefix="dbmpi-bench-torch-"))
    try:
        data = Path(args.data) if args.data else work / "fashion.h5"
        if not args.data:
            datasets.prepare("fashion-mnist", data)
        train, test = load_fashion(data)
        if args.sweep:
            return bench_sweep(work, data, train, test, budget, args.target)
        adapter = bench_adapter_overhead(train, steps=5 if args.quick else 20, rounds=3 if args.quick else 9)
        runs = bench_time_to_accuracy(work, data, train, test, budget, args.target)
        mine = runs["dbmpi_downpour"]["seconds"]
        print(json.dumps({
            "target": args.target,
            "time_to_acc_s": {name: run["seconds"] for name, run in runs.items()},
            "adapter_overhead": adapter["overhead"],
            "time_to_acc_vs_ddp": ratio(mine, runs["torch_ddp"]["seconds"]),
            "time_to_acc_vs_torch_single": ratio(mine, runs["torch_single"]["seconds"]),
        }), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
