"""Does a passive-target RMA operation complete while its target only polls its own window?

Standalone (mpi4py and numpy only), 2 ranks. Rank 0 exposes one int64 counter made by
`MPI.Win.Allocate`; both ranks hold a `Lock(0, LOCK_SHARED)` epoch for the whole run, as
dbmpi's parameter server does. Rank 1 times round trips `Fetch_and_op(SUM) + Flush(0)` while
rank 0 idles in one of these loops (sleeping SLEEP_S between polls, like a shard's back-off):

  sleep     time.sleep only, no MPI call           (is the component truly one-sided?)
  self_rma  Fetch_and_op(NO_OP) on itself + Flush  (a shard polling its own counters)
  flush     Win.Flush(0) on itself only
  iprobe    self_rma + MPI.COMM_WORLD.Iprobe()     (drives the MPI progress engine)

Rank 0 leaves a loop when the counter reaches N (or after DEADLINE_S; the barrier that
follows then progresses whatever is pending). A loop that does not progress rank 1's
operations therefore shows as "target hit its deadline" with a max of about DEADLINE_S (the
first round trip waited for the barrier; the rest then completed at once, hence the small
median). Rank 1 gives up after CAP_S and pushes the counter past N. One line per mode.

  mpirun --oversubscribe -n 2 python scripts/rma-progress-probe.py            # Open MPI
  mpiexec -n 2 python scripts/rma-progress-probe.py                           # MPICH
Environment: PROBE_N (default 200 round trips), PROBE_SLEEP_S (1e-3), PROBE_DEADLINE_S (5),
PROBE_CAP_S (3), PROBE_MODES (sleep,self_rma,flush,iprobe).
"""
from __future__ import annotations

import os
import time

import numpy as np
from mpi4py import MPI

N = int(os.environ.get("PROBE_N", "200"))
SLEEP_S = float(os.environ.get("PROBE_SLEEP_S", "1e-3"))
CAP_S = float(os.environ.get("PROBE_CAP_S", "3"))
DEADLINE_S = float(os.environ.get("PROBE_DEADLINE_S", "5"))
MODES = os.environ.get("PROBE_MODES", "sleep,self_rma,flush,iprobe").split(",")
WARMUP = 5  # round trips before the first mode, with rank 0 in a barrier (which progresses them)

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
assert comm.Get_size() == 2, "run with 2 ranks"

win = MPI.Win.Allocate(8 if rank == 0 else 0, 8, comm=comm)
if rank == 0:
    local = np.frombuffer(win.tomemory(), np.int64)
    local[:] = 0
comm.Barrier()
win.Lock(0, MPI.LOCK_SHARED)

one = np.ones(1, np.int64)
res = np.zeros(1, np.int64)

if rank == 0:
    lib = MPI.Get_library_version().strip().splitlines()[0]
    print(f"library: {lib}", flush=True)
    print(f"thread level provided: {MPI.Query_thread()} (MULTIPLE={MPI.THREAD_MULTIPLE})", flush=True)
    print(f"N={N} round trips per mode, target sleeps {SLEEP_S * 1e3:g} ms between polls", flush=True)


if rank == 1:
    for _ in range(WARMUP):
        win.Fetch_and_op(one, res, 0, 0, MPI.SUM)
        win.Flush(0)
comm.Barrier()


def self_read() -> int:
    win.Fetch_and_op(one, res, 0, 0, MPI.NO_OP)
    win.Flush(0)
    return int(res[0])


for mode in MODES:
    comm.Barrier()
    if rank == 0:
        local[:] = 0  # no epoch of rank 1 is active across the barrier's reset
    comm.Barrier()
    if rank == 0:
        t_end = time.perf_counter() + DEADLINE_S
        polls = 0
        while time.perf_counter() < t_end:
            if mode == "sleep":
                value = int(local[0])
            elif mode == "self_rma":
                value = self_read()
            elif mode == "flush":
                win.Flush(0)
                value = int(local[0])
            elif mode == "iprobe":
                value = self_read()
                comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)
            else:
                raise SystemExit(f"unknown mode {mode}")
            polls += 1
            if value >= N:
                break
            time.sleep(SLEEP_S)
        timed_out = time.perf_counter() >= t_end
        comm.Barrier()
        stats = comm.recv(source=1)
        note = " (target hit its deadline)" if timed_out else ""
        print(f"{mode:9s} {stats}{note}", flush=True)
    else:
        times = []
        t_cap = time.perf_counter() + CAP_S
        for _ in range(N):
            t0 = time.perf_counter()
            win.Fetch_and_op(one, res, 0, 0, MPI.SUM)
            win.Flush(0)
            times.append(time.perf_counter() - t0)
            if time.perf_counter() > t_cap:
                break
        done = len(times)
        if done < N:  # tell rank 0 to stop: push the counter past N
            win.Fetch_and_op(np.array([N], np.int64), res, 0, 0, MPI.SUM)
            win.Flush(0)
        comm.Barrier()
        ms = np.array(times) * 1e3
        comm.send(f"round trip ms: median {np.median(ms):8.3f}  p90 {np.percentile(ms, 90):8.3f}  "
                  f"max {ms.max():8.1f}  ({done}/{N} done in {sum(times):.1f} s)", dest=0)

win.Unlock(0)
win.Free()
