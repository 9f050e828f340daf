"""RMA benchmark: a replica's fetch and push against one shard, versus memcpy of the same bytes.

Two ranks: rank 0 is the replica, rank 1 the shard (its windows made by the real
ParameterWindows; it idles in a barrier meanwhile, so this measures the transfer itself).
Fetch is ShardClient.fetch (Rget_accumulate NO_OP); push is ShardClient.push and
finish_push (Raccumulate SUM, flush, counters); drain is the shard's own
Get_accumulate(NO_OP) + Accumulate(SUM) of the negation. The reference is numpy.copyto
of the same bytes on rank 0, measured in the same run. Each figure is the best of several
repeats (this machine is shared). Prints one JSON object per size and, last, the summary
{"rma_fetch_vs_memcpy", "rma_push_vs_memcpy"} at 64 MB.

    python bench/rma.py [--quick]        (re-launches itself under mpiexec -n 2)
"""
import os
import subprocess
import sys

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402

import numpy as np  # noqa: E402


def relaunch_under_mpiexec():
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        mpiexec = "mpiexec"
    os.environ["DBMPI_BENCH_CHILD"] = "1"
    cmd = [mpiexec, "-n", "2", sys.executable, "-m", "mpi4py", os.path.abspath(__file__), *sys.argv[1:]]
    sys.exit(subprocess.call(cmd))


def best_of(fn, repeats):
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def best_drain(store, windows, full, out, repeats, add):
    """The best time of `repeats` drains of a full inbox (after one untimed)."""
    best = float("inf")
    for i in range(repeats + 1):
        windows.inbox.Accumulate(full, store.me, op=add)
        windows.inbox.Flush(store.me)
        start = time.perf_counter()
        if not store.drain(out):
            raise RuntimeError("the inbox was empty")
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes up to 64 MB, fewer repeats")
    args = parser.parse_args()
    from mpi4py import MPI

    from dbmpi.ps.client import ShardClient
    from dbmpi.ps.store import ShardStore
    from dbmpi.ps.windows import ParameterWindows
    from dbmpi.runtime.layout import Layout

    comm = MPI.COMM_WORLD
    if comm.size != 2:
        raise SystemExit("bench/rma.py needs exactly 2 ranks")
    sizes_mb = [1, 4, 16, 64] if args.quick else [1, 4, 16, 64, 256]
    repeats = 3 if args.quick else 7
    summary = {}
    for mb in sizes_mb:
        n = mb * 2**20 // 4
        layout = Layout(n_params=n, n_shards=1, n_replicas=1)
        role = layout.role(comm.rank)
        windows = ParameterWindows(comm, layout, 0 if role.is_shard else None)
        record = None
        if role.is_shard:
            # The shard's own drain (dbmpi.ps.store) of a full inbox, timed on the shard; the
            # inbox is refilled before each drain, untimed.
            store = ShardStore(windows, n)
            drained, full = np.empty(n, np.float32), np.ones(n, np.float32)
            drain_s = best_drain(store, windows, full, drained, repeats, MPI.SUM)
            store.close()
            comm.Barrier()  # the replica measures now
            comm.Barrier()
            comm.send(drain_s, dest=0)
        else:
            comm.Barrier()
            client = ShardClient(windows, 0, [(0, n)])
            buf = np.empty(n, np.float32)
            grad = np.ones(n, np.float32)
            src = np.random.default_rng(0).random(n, dtype=np.float32)

            def push(client=client, grad=grad):
                # As a Downpour replica pushes: the NaN/Inf count comes from accruing
                # (kernels.axpy_count_nonfinite), so the push itself is one pass.
                client.push(grad, nonfinite=0)
                client.finish_push()

            def push_checked(client=client, grad=grad):
                client.push(grad)  # with its own NaN/Inf scan
                client.finish_push()

            memcpy_s = best_of(partial(np.copyto, buf, src), repeats)
            fetch_s = best_of(partial(client.fetch, buf), repeats)
            push_s = best_of(push, repeats)
            checked_s = best_of(push_checked, repeats)
            client.close()
            comm.Barrier()
            drain_s = comm.recv(source=1)
            gb = 4 * n / 1e9
            record = {"bench": "rma", "megabytes": mb, "memcpy_gb_s": gb / memcpy_s,
                      "fetch_gb_s": gb / fetch_s, "push_gb_s": gb / push_s,
                      "push_with_scan_gb_s": gb / checked_s, "drain_gb_s": gb / drain_s,
                      "fetch_vs_memcpy": memcpy_s / fetch_s, "push_vs_memcpy": memcpy_s / push_s,
                      "drain_vs_memcpy": memcpy_s / drain_s,
                      "mpi": MPI.Get_library_version().splitlines()[0]}
            print(json.dumps(record), flush=True)
            if mb == 64:
                summary = {"rma_fetch_vs_memcpy": round(record["fetch_vs_memcpy"], 3),
                           "rma_push_vs_memcpy": round(record["push_vs_memcpy"], 3)}
        windows.free()
    if comm.rank == 0:
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    if os.environ.get("DBMPI_BENCH_CHILD") != "1" and "mpi4py" not in sys.modules:
        relaunch_under_mpiexec()
    main()
