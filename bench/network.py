"""The network path: Downpour where RMA crosses MPICH's network module, against shared memory
in the same run.

MPICH is told to use its network module between the ranks of this machine
(`MPIR_CVAR_NOLOCAL=1`): that is how passive-target RMA behaves between nodes without
hardware RDMA (the target's CPU must serve each operation). Each measurement runs once per
path ("shm", "netmod") and, where it says so, per shard variant:

- "fused": the shard updates chunk by chunk with MPI progress between chunks (dbmpi.ps.store);
- "whole": the same update over the whole slice at once (chunk = None: four sweeps, no
  progress while it computes; what shards did before);
- "whole+thread": "whole" with MPICH's progress thread (MPIR_CVAR_ASYNC_PROGRESS=1), the
  alternative the issue asked to measure.

(a) busy shard: one shard of 1, 16 and 64 MB, one replica pushing full gradients without
    pause (the shard is always updating), another measuring a counter round trip
    (Fetch_and_op), a full fetch and a full push (push + count): medians in ms, and MB/s;
(b) the shard's update time per MB (drain, Adagrad, publish), fused against whole (one rank);
(c) Downpour throughput, the real command line: samples/s of the Fashion-MNIST MLP (R = 2,
    S = 2) and steps/s of the speech model (42M parameters, synthetic data), netmod against shm;
(d) RMA operations per replica step, counted (tests/rma_count.py), per shard, now and at
    `--before REV` (default aad9d65, the parameter server before this benchmark existed).

Last line: {"noshm_vs_shm_samples_per_s", "busy_shard_fetch_ms_64mb", "rma_ops_per_step", ...}.

    python bench/network.py [--quick] [--skip-speech]
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
sys.path.insert(0, str(ROOT / "bench"))
PATHS = {"shm": {}, "netmod": {"MPIR_CVAR_NOLOCAL": "1"}}
THREAD = {"MPIR_CVAR_ASYNC_PROGRESS": "1"}
MB = 2**20


def emit(record):
    print(json.dumps(record), flush=True)
    return record


def median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else None


def child(args_list, env_extra, ranks, timeout=900):
    """Run this script's child mode under mpiexec; its last stdout line, parsed."""
    from downpour import mpiexec

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", **env_extra}
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", __file__, "--child", *args_list]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# (a) A busy shard -------------------------------------------------------------------------------
def busy_child(size_mb: int, chunk: str, probes: int) -> dict:
    """3 ranks: worker 0 probes, worker 1 keeps the shard busy, rank 2 is the shard."""
    import numpy as np
    from mpi4py import MPI

    from dbmpi.algorithms.optimizers import Adagrad
    from dbmpi.ps.client import ShardClient
    from dbmpi.ps.control import Slot
    from dbmpi.ps.shard import Shard
    from dbmpi.ps.store import CHUNK
    from dbmpi.ps.windows import ParameterWindows
    from dbmpi.runtime.layout import Layout

    comm = MPI.COMM_WORLD
    n = size_mb * MB // 4
    layout = Layout(n, 1, 2)
    role = layout.role(comm.rank)
    windows = ParameterWindows(comm, layout, role.shard if role.is_shard else None)
    result = {}
    if role.is_shard:
        shard = Shard(windows, 0, np.zeros(n, np.float32), Adagrad(n, 1e-3), chunk=CHUNK if chunk == "fused" else None)
        comm.Barrier()
        stats = shard.serve()
        shard.close()
        result = {"updates": stats.updates, "busy_s": stats.busy_s}
    else:
        client = ShardClient(windows, role.replica, [(0, n)])
        grads = [np.full(n, 1e-3, np.float32) for _ in range(2)]
        local = np.empty(n, np.float32)
        shard_rank = layout.shard_rank(0)
        comm.Barrier()
        if role.replica == 1:  # the load: push without pause until the probe is done
            i = 0
            while windows.block.read(shard_rank, Slot.WORKERS_DONE) == 0:
                client.push(grads[i % 2])
                client.finish_push()
                i += 1
        else:
            time.sleep(0.2)  # the load is under way
            counter, fetch, push = [], [], []
            for i in range(probes):
                t0 = time.perf_counter()
                windows.block.read(shard_rank, Slot.VERSION)
                counter.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                client.fetch(local)
                fetch.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                client.push(grads[i % 2])
                client.finish_push()
                push.append(time.perf_counter() - t0)
            result = {"counter_ms": 1e3 * median(counter), "fetch_ms": 1e3 * median(fetch),
                      "push_ms": 1e3 * median(push)}
        client.finish()
        client.close()
    windows.free()
    everyone = comm.gather(result, root=0)
    if comm.rank == 0:
        merged = {k: v for r in everyone for k, v in r.items()}
        print(json.dumps(merged), flush=True)
    return result


def bench_busy(sizes, probes) -> dict:
    out = {}
    for path, env in PATHS.items():
        variants = [("fused", {}), ("whole", {})] + ([("whole+thread", THREAD)] if path == "netmod" else [])
        for variant, extra in variants:
            chunk = "whole" if variant.startswith("whole") else "fused"
            for size in sizes:
                r = child(["busy", str(size), chunk, str(probes)], {**env, **extra}, 3)
                rec = emit({"bench": "busy_shard", "path": path, "shard": variant, "size_mb": size,
                            "counter_round_trip_ms": round(r["counter_ms"], 3), "fetch_ms": round(r["fetch_ms"], 2),
                            "push_ms": round(r["push_ms"], 2),
                            "fetch_mb_per_s": round(size / (r["fetch_ms"] / 1e3), 1),
                            "push_mb_per_s": round(size / (r["push_ms"] / 1e3), 1),
                            "shard_updates": r["updates"]})
                out[(path, variant, size)] = rec
    return out


# (b) The update itself -------------------------------------------------------------------------
def update_child(size_mb: int, repeats: int) -> dict:
    """Two ranks: rank 1, a shard, times its update of a full inbox, fused against whole,
    best of `repeats` (rank 0 waits)."""
    import numpy as np
    from mpi4py import MPI

    from dbmpi.algorithms.optimizers import Adagrad
    from dbmpi.ps.shard import Shard
    from dbmpi.ps.store import CHUNK
    from dbmpi.ps.windows import ParameterWindows
    from dbmpi.runtime.layout import Layout

    n = size_mb * MB // 4
    comm = MPI.COMM_WORLD
    windows = ParameterWindows(comm, Layout(n, 1, 1), 0 if comm.rank == 1 else None)
    if comm.rank == 0:
        comm.Barrier()
        windows.free()
        return {}
    me = comm.rank
    full = np.full(n, 1e-3, np.float32)
    copy_dst = np.empty_like(full)
    best = {}
    for name, chunk in (("whole", None), ("fused", CHUNK)):
        shard = Shard(windows, 0, np.zeros(n, np.float32), Adagrad(n, 1e-3), chunk=chunk)
        times = []
        for _ in range(repeats + 1):
            windows.inbox.Accumulate(full, me, op=MPI.SUM)
            windows.inbox.Flush(me)
            t0 = time.perf_counter()
            shard.step(announced=0)  # drain what is there (no push was counted)
            times.append(time.perf_counter() - t0)
        best[name] = min(times[1:])
    t_copy = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(copy_dst, full)
        t_copy.append(time.perf_counter() - t0)
    windows.unlock_shards()
    comm.Barrier()
    windows.free()
    result = {"whole_ms_per_mb": 1e3 * best["whole"] / size_mb, "fused_ms_per_mb": 1e3 * best["fused"] / size_mb,
              "memcpy_ms_per_mb": 1e3 * min(t_copy) / size_mb}
    print(json.dumps(result), flush=True)
    return result


def bench_update(size_mb, repeats) -> dict:
    r = child(["update", str(size_mb), str(repeats)], {}, 2)
    return emit({"bench": "shard_update", "size_mb": size_mb, **{k: round(v, 3) for k, v in r.items()},
                 "fused_vs_whole": round(r["whole_ms_per_mb"] / r["fused_ms_per_mb"], 2)})


# (c) Downpour, the real command line --------------------------------------------------------------
def bench_downpour(work, steps, skip_speech) -> dict:
    from downpour import dbmpi_train, speech_config

    from dbmpi import data as datasets

    fashion = work / "fashion.h5"
    datasets.prepare("fashion-mnist", fashion)
    out = {}
    for path, env in PATHS.items():
        summary, _ = dbmpi_train(ROOT / "configs/downpour_fashion.toml", work / f"fashion-{path}",
                                 [f"data.path={fashion}", f"train.steps={steps}", "train.warmstart_steps=0",
                                  "train.eval_every=1000000"], ranks=4, env=env)
        out[("fashion", path)] = summary["samples_per_s"]
        emit({"bench": "downpour_network", "model": "fashion-mlp", "path": path, "replicas": 2, "shards": 2,
              "samples_per_s": summary["samples_per_s"], "mean_staleness": summary["mean_staleness"]})
        config = None if skip_speech else speech_config(work, max(2, steps // 100))
        if config is None:
            continue
        summary, records = dbmpi_train(config, work / f"speech-{path}", [], ranks=4, env=env)
        replicas = [r for r in records if r["kind"] == "replica"]
        rate = sum(r["steps"] / r["wall_s"] for r in replicas) / len(replicas)
        out[("speech", path)] = rate
        emit({"bench": "downpour_network", "model": "speech", "path": path, "replicas": 2, "shards": 2,
              "steps_per_s_per_replica": round(rate, 3), "n_params": summary["n_params"]})
    return out


# (d) RMA operations per step ---------------------------------------------------------------------
def count_child() -> dict:
    """The calls per shard of a steady-state step (R = 2, S = 2), in whatever dbmpi is imported."""
    import importlib.util
    import inspect

    from dbmpi.ps.control import ControlBlock
    from dbmpi.runtime.layout import Layout

    # By file: the dbmpi imported may be another revision's (PYTHONPATH), without it.
    spec = importlib.util.spec_from_file_location("rma_count", ROOT / "tests" / "rma_count.py")
    rma_count = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rma_count)
    BLOCKING, count_step_calls = rma_count.BLOCKING, rma_count.count_step_calls

    layout = Layout(100_000, 2, 2)
    n_args = len(inspect.signature(ControlBlock).parameters)  # (win) now, (win, n_replicas) before
    block = ControlBlock if n_args == 1 else (lambda win: ControlBlock(win, layout.n_replicas))
    steps = 10
    per_target = count_step_calls(layout, 0, [(0, layout.n_params)], steps, look_for_stop=True, block=block)
    calls = sum(sum(c.values()) for c in per_target.values())
    waits = sum(n for c in per_target.values() for (_, call), n in c.items() if call in BLOCKING)
    # Round trips a step waits for: flushes issued back to back to several shards overlap, so
    # count those to the busiest shard (shard 0, which also answers the stop look).
    shard0 = per_target.get(layout.shard_rank(0), {})
    trips = sum(n for (_, call), n in shard0.items() if call in BLOCKING)
    import dbmpi

    result = {"dbmpi": str(Path(dbmpi.__file__).parent), "calls_per_step": calls / steps,
              "blocking_calls_per_step": waits / steps, "round_trips_per_step_shard0": trips / steps}
    print(json.dumps(result), flush=True)
    return result


def bench_counts(before: str | None, work: Path) -> dict:
    now = child(["count"], {}, 1)
    out = {"now": now}
    if before:
        tree = work / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", "--detach", str(tree), before],
                       check=True, capture_output=True)
        try:
            for so in (ROOT / "dbmpi" / "_kernels").glob("*.so"):  # the kernels did not change
                shutil.copy(so, tree / "dbmpi" / "_kernels" / so.name)
            env = {"PYTHONPATH": str(tree)}
            out["before"] = child(["count"], env, 1)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    emit({"bench": "rma_ops_per_step", "replicas": 2, "shards": 2, "n_fetch": 1, "n_push": 1, **out,
          "before_rev": before})
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test of the script)")
    parser.add_argument("--skip-speech", action="store_true")
    parser.add_argument("--before", default="aad9d65", help="revision to count RMA calls at ('' to skip)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        {"busy": lambda: busy_child(int(rest[0]), rest[1], int(rest[2])),
         "update": lambda: update_child(int(rest[0]), int(rest[1])),
         "count": count_child}[kind]()
        return
    work = Path(tempfile.mkdtemp(prefix="dbmpi-bench-net-"))
    try:
        counts = bench_counts(args.before or None, work)
        sizes = [1, 16] if args.quick else [1, 16, 64]
        update = bench_update(16 if args.quick else 64, 2 if args.quick else 5)
        busy = bench_busy(sizes, 5 if args.quick else 15)
        runs = bench_downpour(work, 100 if args.quick else 600, args.skip_speech)
        big = max(sizes)
        summary = {
            "noshm_vs_shm_samples_per_s": round(runs[("fashion", "netmod")] / runs[("fashion", "shm")], 3),
            "noshm_vs_shm_speech_steps_per_s": (round(runs[("speech", "netmod")] / runs[("speech", "shm")], 3)
                                                if ("speech", "shm") in runs else None),
            f"busy_shard_fetch_ms_{big}mb": busy[("netmod", "fused", big)]["fetch_ms"],
            f"busy_shard_fetch_ms_{big}mb_whole": busy[("netmod", "whole", big)]["fetch_ms"],
            f"busy_shard_fetch_ms_{big}mb_thread": busy[("netmod", "whole+thread", big)]["fetch_ms"],
            f"busy_shard_fetch_ms_{big}mb_shm": busy[("shm", "fused", big)]["fetch_ms"],
            "update_ms_per_mb": {"fused": update["fused_ms_per_mb"], "whole": update["whole_ms_per_mb"]},
            "rma_ops_per_step": counts["now"]["calls_per_step"],
            "rma_ops_per_step_before": counts.get("before", {}).get("calls_per_step"),
        }
        if big == 64:
            summary["busy_shard_fetch_ms_64mb"] = summary[f"busy_shard_fetch_ms_{big}mb"]
        print(json.dumps(summary), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
