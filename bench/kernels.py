"""Kernel benchmarks: dbmpi's Cython kernels against numpy matmul (and PyTorch CPU) in one run.

One BLAS thread throughout (set before numpy loads). Each figure is the median of several
timed repeats after warm-up; ratios compare numbers taken in the same run, because this
machine is shared and absolute times drift. Prints one JSON object per measurement and, as
the last line, the summary: {"dense_vs_sgemm", "local_vs_sgemm", "mlp_step_over_sgemms" (the
fused step's time over its sgemms' alone), "mlp_step_speedup_vs_torch"}.

    python bench/kernels.py [--quick]
"""
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402

import numpy as np  # noqa: E402
from scipy.linalg import blas as scipy_blas  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

from dbmpi import kernels  # noqa: E402
from dbmpi.model import Network  # noqa: E402


def timeit(fn, repeats, inner=1):
    """Median seconds per call over `repeats` timings of `inner` calls, after warm-up."""
    for _ in range(max(2, inner)):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def emit(record):
    print(json.dumps(record), flush=True)
    return record


def col_major_gemm(c, a, b, trans_a, trans_b):
    """Row-major c = op(a) @ op(b) through scipy.linalg.blas.sgemm, without copies."""
    scipy_blas.sgemm(1.0, b.T, a.T, trans_a=int(trans_b), trans_b=int(trans_a), c=c.T, overwrite_c=1)


def bench_dense(repeats):
    """Forward + backward of the speech model's hidden layer vs the same three sgemms in numpy."""
    n, d_in, d_out = 128, 2560, 2560
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    w = (0.02 * rng.standard_normal((d_out, d_in))).astype(np.float32)
    b = np.zeros(d_out, np.float32)
    y, gy = np.empty((n, d_out), np.float32), rng.standard_normal((n, d_out)).astype(np.float32)
    gz, gw, gb, gx = np.empty_like(y), np.empty_like(w), np.empty_like(b), np.empty_like(x)

    def ours():
        kernels.dense_forward(x, w, b, y, "sigmoid")
        kernels.dense_backward(x, w, y, gy, gz, gw, gb, gx, "sigmoid")

    def numpy_sgemm():
        np.matmul(x, w.T, out=y)
        np.matmul(gy, w, out=gx)
        np.matmul(gy.T, x, out=gw)

    def scipy_sgemm():
        # The BLAS library dbmpi's kernels link (scipy's OpenBLAS), which may be another
        # build than numpy's: isolates the kernels' own overhead from the library's speed.
        col_major_gemm(y, x, w, False, True)
        col_major_gemm(gx, gy, w, False, False)
        col_major_gemm(gw, gy, x, True, False)

    flops = 3 * 2 * n * d_in * d_out
    t_ours, t_np, t_sp = timeit(ours, repeats), timeit(numpy_sgemm, repeats), timeit(scipy_sgemm, repeats)
    return emit({"bench": "dense_fwd_bwd", "shape": [n, d_in, d_out], "activation": "sigmoid",
                 "dbmpi_gflops": flops / t_ours / 1e9, "numpy_sgemm_gflops": flops / t_np / 1e9,
                 "scipy_sgemm_gflops": flops / t_sp / 1e9, "dbmpi_ms": t_ours * 1e3,
                 "numpy_ms": t_np * 1e3, "scipy_ms": t_sp * 1e3, "ratio": t_np / t_ours,
                 "ratio_vs_same_blas": t_sp / t_ours})


def bench_local(repeats):
    """Locally connected layer (the image model's second stage) vs numpy batched matmul on the
    same per-position GEMM shapes (which skips the patch gathers the layer must do)."""
    n, rows, cols, maps, k, filters = 128, 12, 12, 8, 5, 16
    out_r, out_c, patch = rows - k + 1, cols - k + 1, k * k * maps
    positions = out_r * out_c
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, rows, cols, maps)).astype(np.float32)
    w = (0.05 * rng.standard_normal((out_r, out_c, filters, patch))).astype(np.float32)
    b = np.zeros((out_r, out_c, filters), np.float32)
    y = np.empty((n, out_r, out_c, filters), np.float32)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    gz, gw, gb, gx = np.empty_like(y), np.empty_like(w), np.empty_like(b), np.empty_like(x)

    def ours():
        kernels.local_forward(x, w, b, y, k, 1, "identity")
        kernels.local_backward(x, w, y, gy, gz, gw, gb, gx, k, 1, "identity")

    p = rng.standard_normal((positions, n, patch)).astype(np.float32)
    wp = w.reshape(positions, filters, patch)
    yp = np.empty((positions, n, filters), np.float32)
    gyp = rng.standard_normal(yp.shape).astype(np.float32)
    gp, gwp = np.empty_like(p), np.empty_like(wp)

    def numpy_sgemm():
        np.matmul(p, wp.transpose(0, 2, 1), out=yp)
        np.matmul(gyp, wp, out=gp)
        np.matmul(gyp.transpose(0, 2, 1), p, out=gwp)

    flops = 3 * 2 * n * positions * patch * filters
    t_ours, t_np = timeit(ours, repeats), timeit(numpy_sgemm, repeats)
    return emit({"bench": "local_fwd_bwd", "input": [n, rows, cols, maps], "kernel": k,
                 "filters": filters, "positions": positions, "gemm_per_position": [n, patch, filters],
                 "dbmpi_gflops": flops / t_ours / 1e9, "numpy_batched_matmul_gflops": flops / t_np / 1e9,
                 "dbmpi_ms": t_ours * 1e3, "numpy_ms": t_np * 1e3, "ratio": t_np / t_ours})


MLP = """
[model]
input_shape = [784]
[[model.layers]]
type = "dense"
units = 512
activation = "relu"
[[model.layers]]
type = "dense"
units = 512
activation = "relu"
[[model.layers]]
type = "softmax"
units = 10
"""


def mlp_data(n=128, n_batches=16):
    """The MLP benchmark's 16 random batches (784 inputs, 10 classes)."""
    rng = np.random.default_rng(2)
    return (rng.random((n_batches, n, 784)).astype(np.float32),
            rng.integers(0, 10, (n_batches, n)).astype(np.int32))


class Cycle:
    """Hands out the batches' indices in turn, so a timed step never repeats one batch."""

    def __init__(self, n):
        self.n, self.i = n, -1

    def __call__(self):
        self.i = (self.i + 1) % self.n
        return self.i


def rounds(fns, repeats, inner=20):
    """Seconds per call of each of `fns` (name -> callable), timed in interleaved rounds (each
    round times every one for `inner` calls), so that load from other processes on this
    shared machine falls on all of them alike: name -> list of per-round seconds."""
    for fn in fns.values():
        for _ in range(max(2, inner)):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    return samples


def median_ratio(num, den):
    """Median over rounds of num[i] / den[i] (two lists from one `rounds`)."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def bench_mlp_step(repeats):
    """One SGD step (forward, loss, backward, update) of 784-512-512-10 at batch 128.

    Both sides cycle through the same 16 random batches with a small learning rate, so
    neither memorises a batch into denormal-sized gradients (which slow any CPU down).
    The speedups are medians of per-round ratios (see `rounds`).
    """
    lr = 1e-3
    xs, ys = mlp_data()
    net, turn = Network.from_string(MLP), Cycle(len(xs))

    def fused():
        i = turn()
        net.sgd_step(xs[i], ys[i], lr)

    def unfused():
        i = turn()
        net.loss_and_grad(xs[i], ys[i])
        kernels.sgd_step(net.params, net.grad, lr)

    fns = {"fused": fused, "unfused": unfused}
    torch_step = torch_mlp(xs, ys, lr)
    if torch_step is not None:
        fns["torch"] = torch_step
    t = rounds(fns, repeats)
    record = {"bench": "mlp_step", "batch": xs.shape[1], "layers": [784, 512, 512, 10],
              "dbmpi_fused_ms": statistics.median(t["fused"]) * 1e3,
              "dbmpi_unfused_ms": statistics.median(t["unfused"]) * 1e3,
              "torch_ms": None, "torch_version": None, "speedup_vs_torch": None}
    if torch_step is None:
        return emit(record)
    import torch
    record.update(torch_ms=statistics.median(t["torch"]) * 1e3, torch_version=torch.__version__,
                  torch_threads=torch.get_num_threads(), speedup_vs_torch=median_ratio(t["torch"], t["fused"]),
                  unfused_speedup_vs_torch=median_ratio(t["torch"], t["unfused"]))
    return emit(record)


def torch_mlp(xs, ys, lr, phases=4):
    """PyTorch's step on the same batches, cut after `phases` of (forward, loss, backward,
    update), so that timing each prefix gives each phase's time; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                                torch.nn.ReLU(), torch.nn.Linear(512, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    txs, tys, turn = torch.from_numpy(xs), torch.from_numpy(ys.astype(np.int64)), Cycle(len(xs))

    def step():
        i = turn()
        opt.zero_grad(set_to_none=True)
        out = model(txs[i])  # with autograd's bookkeeping, as in the whole step
        if phases > 1:
            out = loss_fn(out, tys[i])
        if phases > 2:
            out.backward()
        if phases > 3:
            opt.step()

    return step


def dbmpi_phases():
    """Name -> callable of each part of dbmpi's fused step, on the state a step leaves: per
    layer its forward and its backward with the update fused (lr), the loss, the bare sgemms
    of the same shapes (scipy's sgemm: the library the kernels link), and the whole step."""
    lr, xs, ys = 1e-3, *mlp_data()
    net, turn = Network.from_string(MLP), Cycle(len(xs))
    net.sgd_step(xs[0], ys[0], lr)
    inputs = [xs[0]]
    for layer in net.layers:
        inputs.append(layer.forward(inputs[-1]))
    fns = {"loss": partial(net.output.loss, ys[0], want_grad=True)}
    gy = net.output.glogits
    for index in range(len(net.layers) - 1, -1, -1):
        # Every layer below has parameters, so all but the first compute an input gradient.
        layer, need_gx = net.layers[index], index > 0
        fns[f"{layer.name}.forward"] = partial(layer.forward, inputs[index])
        fns[f"{layer.name}.backward"] = partial(layer.backward, gy, need_gx, lr)
        gy = fns[f"{layer.name}.backward"]()
        fns[f"{layer.name}.sgemms"] = layer_sgemms(layer, inputs[index], need_gx)

    def step():
        i = turn()
        net.sgd_step(xs[i], ys[i], lr)

    fns["step"] = step
    return fns


def layer_sgemms(layer, x, need_gx):
    """A dense layer's sgemms alone (forward; input gradient when needed; weight gradient),
    on copies of its arrays, as one callable."""
    x = x.reshape(len(x), -1)
    w = layer.params["W"].copy()
    y, gz = np.empty((len(x), layer.units), np.float32), np.ones((len(x), layer.units), np.float32)
    gx, gw = np.empty_like(x), np.empty_like(w)

    def sgemms():
        col_major_gemm(y, x, w, False, True)
        col_major_gemm(gw, gz, x, True, False)
        if need_gx:
            col_major_gemm(gx, gz, w, False, False)

    return sgemms


def bench_mlp_phases(repeats):
    """Where each step's time goes, in ms: dbmpi's parts (dbmpi_phases; "other" is the step
    less its parts: Python, argument checks, the batch's trip through the caches) and
    PyTorch's phases (per round, the differences of timed prefixes: forward, + loss, +
    backward, + update). Everything is timed in the same interleaved rounds."""
    fns = dbmpi_phases()
    xs, ys = mlp_data()
    prefixes = [torch_mlp(xs, ys, 1e-3, k) for k in (1, 2, 3, 4)]
    if prefixes[0] is not None:
        fns.update({f"torch{k}": step for k, step in enumerate(prefixes, 1)})
    t = rounds(fns, repeats)
    ms = {name: statistics.median(v) * 1e3 for name, v in t.items() if not name.startswith("torch")}
    ms["sgemms"] = sum(v for name, v in ms.items() if name.endswith(".sgemms"))
    ms["other"] = ms["step"] - sum(v for name, v in ms.items() if name.endswith((".forward", ".backward", "loss")))
    record = {"bench": "mlp_step_phases", "dbmpi_ms": ms, "torch_ms": None}
    if prefixes[0] is not None:
        cuts = [[0.0] * repeats] + [t[f"torch{k}"] for k in (1, 2, 3, 4)]
        record["torch_ms"] = {name: statistics.median(b - a for a, b in zip(cuts[k], cuts[k + 1], strict=True)) * 1e3
                              for k, name in enumerate(("forward", "loss", "backward", "update"))}
        record["torch_ms"]["step"] = statistics.median(t["torch4"]) * 1e3
        record["step_speedup_vs_torch"] = median_ratio(t["torch4"], t["step"])
    return emit(record)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    args = parser.parse_args()
    repeats = 3 if args.quick else 15
    with threadpool_limits(limits=1):
        blas = [{k: i.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
                for i in threadpool_info() if i.get("user_api") == "blas"]
        emit({"bench": "environment", "python": platform.python_version(), "numpy": np.__version__,
              "machine": platform.machine(), "processor": platform.processor() or None, "blas": blas})
        dense = bench_dense(repeats)
        local = bench_local(repeats)
        mlp = bench_mlp_step(repeats)
        phases = bench_mlp_phases(repeats)
    print(json.dumps({"dense_vs_sgemm": round(dense["ratio"], 3),
                      "dense_vs_same_blas_sgemm": round(dense["ratio_vs_same_blas"], 3),
                      "local_vs_sgemm": round(local["ratio"], 3),
                      "mlp_step_over_sgemms": round(phases["dbmpi_ms"]["step"] / phases["dbmpi_ms"]["sgemms"], 3),
                      "mlp_step_speedup_vs_torch": None if mlp["speedup_vs_torch"] is None
                      else round(mlp["speedup_vs_torch"], 3)}))


if __name__ == "__main__":
    main()
