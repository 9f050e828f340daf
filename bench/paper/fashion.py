"""The Fashion-MNIST MLP runs that Figures 4 and 5 share: the common warm start, one launcher
per method (dbmpi's single-replica SGD, Downpour SGD, Downpour with Adagrad, Sandblaster
L-BFGS, and PyTorch CPU's SGD and L-BFGS as references), and reading accuracy-against-time
curves from the runs.

Every dbmpi method starts from the same checkpoint, as in the paper: a short single-replica
run (Downpour with R = 1, S = 1 and plain SGD at the shard) whose final parameters the
others take (`--init` for SGD and Sandblaster, `--resume` for Downpour, which starts fresh
Adagrad state from them). Every curve's time axis is the run's own clock (the metrics'
`time`: seconds since the run directory was made, so data loading is included), and each
curve starts at t = 0 with the warm start's test accuracy.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, RUNS, dbmpi, fresh_run_dir, mpiexec, records  # noqa: E402

DATA = ROOT / "data" / "fashion-mnist.h5"
CONFIGS = {"sgd": ROOT / "configs" / "mlp_fashion.toml",
           "downpour": ROOT / "configs" / "downpour_fashion.toml",
           "sandblaster": ROOT / "configs" / "sandblaster_fashion.toml"}

# The shared warm start: replica 0 alone with plain SGD at the shard (the paper's warmstart
# is a single replica too), WARM_STEPS steps of batch 128.
WARM_STEPS = 300
WARM_LR = 0.02
# Settings of the methods (all: the 784-512-512-10 MLP of the configs, batch 128 unless said).
SGD_LR, SGD_MOMENTUM = 0.02, 0.9          # the single-replica baseline (configs/mlp_fashion.toml)
# Downpour's methods: the optimizer the shards apply and its learning rate (R = 2 replicas).
DOWNPOUR = {"downpour_sgd": ("sgd", 0.1),            # plain SGD at the shards
            "downpour_adagrad": ("adagrad", 0.03),   # configs/downpour_fashion.toml
            "downpour_nesterov": ("nesterov", 0.02),  # Nesterov momentum 0.9 at the shards
            "downpour_adam": ("adam", 0.001)}        # rates: docs/CONFIG.md, "Choosing the learning rate"
LBFGS_BATCH, LBFGS_PORTION, LBFGS_HISTORY = 6000, 500, 10   # configs/sandblaster_fashion.toml
EVAL_EVERY_STEPS = 200                    # test-set evaluations (SGD, Downpour replica 0, torch SGD)
EVAL_EVERY_ITERATIONS = 2                 # test-set evaluations (Sandblaster, torch L-BFGS)

METHODS = {
    "sgd": "single-replica SGD (dbmpi)",
    "downpour_sgd": "Downpour SGD",
    "downpour_adagrad": "Downpour + Adagrad",
    "downpour_nesterov": "Downpour + Nesterov",
    "downpour_adam": "Downpour + Adam",
    "sandblaster": "Sandblaster L-BFGS",
    "torch_sgd": "PyTorch SGD",
    "torch_lbfgs": "PyTorch L-BFGS",
}


def settings() -> dict:
    """Everything RESULTS.md needs to rerun the runs, as stored with each result."""
    return {"model": "784-512-512-10 ReLU MLP (configs/mlp_fashion.toml)", "data": "Fashion-MNIST 60k/10k",
            "warmstart": {"how": "Downpour R=1 S=1, train.optimizer=sgd (plain SGD at the shard)",
                          "steps": WARM_STEPS, "batch": 128, "learning_rate": WARM_LR},
            "sgd": {"learning_rate": SGD_LR, "momentum": SGD_MOMENTUM, "batch": 128},
            **{method: {"optimizer": f"{optimizer} (shard)", "learning_rate": lr, "batch": 128,
                        "n_fetch": 1, "n_push": 1} for method, (optimizer, lr) in DOWNPOUR.items()},
            "sandblaster": {"batch": LBFGS_BATCH, "portion": LBFGS_PORTION, "history": LBFGS_HISTORY,
                            "push_every": 4, "line_search": "Wolfe (c1 1e-4, c2 0.9)"},
            "torch_sgd": {"learning_rate": SGD_LR, "momentum": SGD_MOMENTUM, "batch": 128},
            "torch_lbfgs": {"batch": LBFGS_BATCH, "history": LBFGS_HISTORY, "max_iter": 1,
                            "line_search_fn": "strong_wolfe"},
            "eval_every": {"steps": EVAL_EVERY_STEPS, "lbfgs_iterations": EVAL_EVERY_ITERATIONS}}


def ensure_data() -> None:
    if not DATA.exists():
        dbmpi("data", "prepare", "fashion-mnist", "--out", DATA)


def warmstart() -> dict:
    """The shared warm-start checkpoint (made once, then reused from bench/paper/runs/)."""
    ensure_data()
    run_dir = RUNS / f"warmstart-fashion-{WARM_STEPS}"
    info = run_dir / "warmstart.json"
    if info.exists():
        return json.loads(info.read_text())
    if run_dir.exists():  # an unfinished earlier attempt
        run_dir = fresh_run_dir(f"warmstart-fashion-{WARM_STEPS}")
        info = RUNS / f"warmstart-fashion-{WARM_STEPS}" / "warmstart.json"
    wall = dbmpi("train", CONFIGS["downpour"], "--run-dir", run_dir, "--quiet", "--set", f"data.path={DATA}",
                 "--set", "train.n_replicas=1", "--set", "train.n_shards=1", "--set", 'train.optimizer="sgd"',
                 "--set", f"train.learning_rate={WARM_LR}", "--set", f"train.steps={WARM_STEPS}",
                 "--set", "train.warmstart_steps=0", ranks=2)
    from dbmpi.io.checkpoint import list_checkpoints

    final = [r for r in records(run_dir) if r["kind"] == "eval"][-1]
    result = {"checkpoint": str(list_checkpoints(run_dir / "checkpoints")[-1]), "run_dir": str(run_dir),
              "steps": WARM_STEPS, "test_accuracy": final["test_accuracy"], "wall_s": round(wall, 2)}
    info.parent.mkdir(parents=True, exist_ok=True)
    info.write_text(json.dumps(result) + "\n")
    return result


def _cpu_prefix(cores: int | None) -> list[str]:
    """`taskset -c 0..cores-1` (the job sees only those cores), or nothing."""
    if cores is None:
        return []
    return ["taskset", "-c", ",".join(str(c) for c in range(cores))]


def _launch(args: list, ranks: int | None, cores: int | None, timeout: float, threads: int = 1) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "dbmpi", *map(str, args)]
    if ranks is not None:
        cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m", "dbmpi", *map(str, args)]
    cmd = _cpu_prefix(cores) + cmd
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def run_method(method: str, warm: dict, budget_s: float, replicas: int = 2, shards: int = 1,
               cores: int | None = None, threads: int = 2, tag: str = "") -> dict:
    """Train one dbmpi method from the warm start for `budget_s` seconds; returns its record
    with the accuracy curve [(seconds, test accuracy)] (replica 0's fetched copy for Downpour,
    the point x for Sandblaster) and the final accuracy of the parameters it ends with."""
    ckpt = warm["checkpoint"]
    run_dir = fresh_run_dir(f"{method}{tag}")
    common = ["--run-dir", run_dir, "--quiet", "--set", f"data.path={DATA}",
              "--set", f"train.time_budget_s={budget_s}"]
    if method == "sgd":
        args = ["train", CONFIGS["sgd"], *common, "--init", ckpt, "--threads", threads,
                "--set", "train.epochs=1000", "--set", f"train.learning_rate={SGD_LR}",
                "--set", f"train.momentum={SGD_MOMENTUM}", "--set", f"train.eval_every={EVAL_EVERY_STEPS}"]
        ranks, layout = None, {"ranks": 1, "blas_threads": threads}
    elif method in DOWNPOUR:
        optimizer, lr = DOWNPOUR[method]
        args = ["train", CONFIGS["downpour"], *common, "--resume", ckpt, "--set", "train.epochs=1000",
                "--set", f"train.n_replicas={replicas}", "--set", f"train.n_shards={shards}",
                "--set", f'train.optimizer="{optimizer}"', "--set", f"train.learning_rate={lr}",
                "--set", "train.warmstart_steps=0", "--set", f"train.eval_every={EVAL_EVERY_STEPS}"]
        ranks = replicas + shards
        layout = {"ranks": ranks, "replicas": replicas, "shards": shards, "blas_threads": 1}
    elif method == "sandblaster":
        args = ["train", CONFIGS["sandblaster"], *common, "--init", ckpt, "--set", "train.iterations=100000",
                "--set", f"train.n_replicas={replicas}", "--set", f"train.n_shards={shards}",
                "--set", f"train.batch_size={LBFGS_BATCH}", "--set", f"train.portion_size={LBFGS_PORTION}",
                "--set", f"train.history={LBFGS_HISTORY}", "--set", f"train.eval_every={EVAL_EVERY_ITERATIONS}"]
        ranks = replicas + shards + 1
        layout = {"ranks": ranks, "replicas": replicas, "shards": shards, "coordinator": 1, "blas_threads": 1}
    else:
        raise ValueError(method)
    wall = _launch(args, ranks, cores, timeout=budget_s * 3 + 180, threads=1 if ranks else threads)
    recs = records(run_dir)
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    keep = ("steps", "iterations", "evaluations", "samples_per_s", "mean_staleness", "backups_issued",
            "backups_won", "wall_time_s", "status")
    replica_steps = [r["steps"] for r in recs if r["kind"] == "replica" and "steps" in r] \
        if method.startswith("downpour") else []
    evals = [r for r in recs if r["kind"] == "eval"]
    final = evals[-1]  # Downpour and Sandblaster: the shards' parameters at the end
    curve = [(0.0, warm["test_accuracy"])]
    curve += [(r["time"], r["test_accuracy"]) for r in evals
              if r.get("source") in (None, "replica 0", "replicas") and r is not final]
    curve.append((final["time"], final["test_accuracy"]))
    return {"method": method, "label": METHODS[method], **layout,
            # Oversubscribed: more computing workers (replicas x BLAS threads) than cores. The
            # shard and the coordinator mostly wait, and share the workers' cores.
            "cores": cores,
            "oversubscribed": cores is not None and layout.get("replicas", 1) * layout["blas_threads"] > cores,
            "ranks_exceed_cores": cores is not None and layout["ranks"] > cores,
            "budget_s": budget_s, "wall_s": round(wall, 2), "final_accuracy": final["test_accuracy"],
            "best_accuracy": max(a for _, a in curve), "curve": [[round(t, 3), a] for t, a in curve],
            "summary": {k: summary[k] for k in keep if k in summary},
            **({"replica_steps": replica_steps} if replica_steps else {}),
            "run_dir": str(Path(run_dir).relative_to(ROOT)), "command": " ".join(map(str, args))}


def time_to(curve, target: float):
    """First time at which the curve reaches `target`, or None."""
    for t, acc in curve:
        if acc >= target:
            return t
    return None


# ---------------------------------------------------------------- PyTorch CPU references

def torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _torch_setup(warm: dict, threads: int):
    """The MLP in torch with the warm start's parameters, and the data (as float32 tensors)."""
    import numpy as np
    import torch

    from dbmpi import config as configuration
    from dbmpi.algorithms.sgd import initial_parameters
    from dbmpi.data import open_dataset
    from dbmpi.model import Network

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = configuration.load(CONFIGS["sgd"], [f"data.path={DATA}"])
    network = Network(cfg["model"])
    flat = initial_parameters(cfg, warm["checkpoint"])
    tensors = {t.name: np.array(Network.view(t, flat), dtype=np.float32) for t in network.tensors}
    linears = [torch.nn.Linear(784, 512), torch.nn.Linear(512, 512), torch.nn.Linear(512, 10)]
    names = [layer.name for layer in network.layers]
    with torch.no_grad():
        for linear, name in zip(linears, names, strict=False):
            linear.weight.copy_(torch.from_numpy(tensors[f"{name}.W"]))
            linear.bias.copy_(torch.from_numpy(tensors[f"{name}.b"]))
    model = torch.nn.Sequential(linears[0], torch.nn.ReLU(), linears[1], torch.nn.ReLU(), linears[2])
    with open_dataset(DATA) as d:
        x, y = d.load("train")
        tx, ty = d.load("test")
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a.reshape(len(a), -1), dtype=np.float32))  # noqa: E731
    return (torch, model, to(x), torch.from_numpy(y.astype(np.int64)), to(tx),
            torch.from_numpy(ty.astype(np.int64)))


def _accuracy(torch, model, tx, ty) -> float:
    with torch.no_grad():
        correct = sum(int((model(tx[i:i + 1000]).argmax(1) == ty[i:i + 1000]).sum()) for i in range(0, len(tx), 1000))
    return correct / len(tx)


def torch_sgd(warm: dict, budget_s: float, threads: int = 2) -> dict:
    """PyTorch CPU SGD (momentum) from the warm start, `threads` threads, batch 128."""
    started = time.perf_counter()  # like dbmpi's clock: loading the data counts
    torch, model, x, y, tx, ty = _torch_setup(warm, threads)
    opt = torch.optim.SGD(model.parameters(), lr=SGD_LR, momentum=SGD_MOMENTUM)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    curve, step, done = [(0.0, warm["test_accuracy"])], 0, False
    while not done:
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - 127, 128):
            idx = order[i:i + 128]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
            done = _record(curve, started, budget_s, step % EVAL_EVERY_STEPS == 0,
                           lambda: _accuracy(torch, model, tx, ty))
            if done:
                break
    return _torch_result("torch_sgd", torch, threads, budget_s, curve, steps=step)


def torch_lbfgs(warm: dict, budget_s: float, threads: int = 2) -> dict:
    """torch.optim.LBFGS from the warm start, the minibatch way Sandblaster runs: each
    iteration (max_iter=1, strong Wolfe line search, history kept across batches) takes the
    next LBFGS_BATCH examples.

    Left alone, torch forms each curvature pair across two batches (y = the new batch's
    gradient at x_k minus the previous batch's at x_(k-1)), which is mostly sampling noise:
    in a first try it stalled at the first accuracy it reached. So that it computes what
    Sandblaster computes (y = g_B(x_(k+1)) - g_B(x_k), both on batch B), the previous
    batch's gradient difference is handed to torch through state['prev_flat_grad']; the
    gradient at the accepted point is the line search's last evaluation when that was
    there (else one extra evaluation, counted in `extra_evaluations`)."""
    started = time.perf_counter()
    torch, model, x, y, tx, ty = _torch_setup(warm, threads)
    params = list(model.parameters())
    opt = torch.optim.LBFGS(params, lr=1, max_iter=1, history_size=LBFGS_HISTORY, line_search_fn="strong_wolfe")
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    last = {}  # the last evaluation: point and gradient
    cached = {}

    def evaluate(xb, yb):
        opt.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        last["x"] = flat([p.detach() for p in params]).clone()
        last["g"] = flat([p.grad for p in params]).clone()
        return loss

    curve, iteration, done, extra, evaluations = [(0.0, warm["test_accuracy"])], 0, False, 0, 0
    pair = None  # previous batch's g(x_(k+1)) - g(x_k)
    while not done:
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - LBFGS_BATCH + 1, LBFGS_BATCH):
            xb, yb = x[order[i:i + LBFGS_BATCH]], y[order[i:i + LBFGS_BATCH]]
            cached["loss"] = evaluate(xb, yb)  # g_B(x_k), reused as the step's first evaluation
            evaluations += 1
            state = opt.state[params[0]]
            if pair is not None:
                state["prev_flat_grad"] = last["g"] - pair

            def closure(xb=xb, yb=yb):
                nonlocal evaluations
                if "loss" in cached:
                    return cached.pop("loss")  # the gradients are still in .grad
                evaluations += 1
                return evaluate(xb, yb)
            opt.step(closure)
            g_start = state["prev_flat_grad"].clone()  # g_B(x_k): torch kept it
            here = flat([p.detach() for p in params])
            if not torch.equal(last["x"], here):
                evaluate(xb, yb)
                extra += 1
            pair = last["g"] - g_start
            iteration += 1
            done = _record(curve, started, budget_s, iteration % EVAL_EVERY_ITERATIONS == 0,
                           lambda: _accuracy(torch, model, tx, ty))
            if done:
                break
    return _torch_result("torch_lbfgs", torch, threads, budget_s, curve, iterations=iteration,
                         gradient_evaluations=evaluations + extra, extra_evaluations=extra)


def _record(curve: list, started: float, budget_s: float, due: bool, accuracy) -> bool:
    """After one step of a PyTorch run: True once the budget is spent; appends (time,
    accuracy) to `curve` when an evaluation is `due`, and at the end."""
    done = time.perf_counter() - started >= budget_s
    if due or done:
        curve.append((time.perf_counter() - started, accuracy()))
    return done


def _torch_result(method: str, torch, threads: int, budget_s: float, curve: list, **work) -> dict:
    return {"method": method, "label": METHODS[method], "ranks": 1, "threads": threads,
            "torch": torch.__version__, "budget_s": budget_s, **work,
            "final_accuracy": curve[-1][1], "best_accuracy": max(a for _, a in curve),
            "curve": [[round(t, 3), a] for t, a in curve]}
