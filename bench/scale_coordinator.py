"""Sandblaster's coordinator: portions handed out per second against the portions in a batch.

Figures per batch size, measured in the same run. Each MPI figure is the fastest of
`--repeats` (3) measurements, each with all of its own fields (the CPU times are those of the
fastest): the wall-clock figures share the machine's cores with whatever else runs, which
only slows them (`load_average` is in every record).

- `scheduler_portions_per_s`: dbmpi.algorithms.portions.PortionScheduler alone, in process,
  `--replicas` virtual replicas that compute nothing, served round robin (each request
  reports the portion done before, flushes included).
- `mpi_portions_per_s` (wall clock): the real coordinator loop (dbmpi.algorithms.sandblaster.
  ShardSpace, `evaluate` of one batch) over real MPI messages, under `mpiexec -n 4`: one
  coordinator and 3 requesting ranks that follow the replies without computing and wait
  for each reply as a replica does (RankChannel.ask: a 50 us spin, then back-off sleeps).
  No shards: the vector commands go to an empty `control`. Fixed-size int64 requests and
  replies on preposted receives (dbmpi.runtime.portion_channel). This is the round trip's
  latency (3 requests in flight at most, every rank's polling and sleeps on shared cores),
  not the coordinator's limit. `mpi_coordinator_cpu_us_per_portion`: the coordinator's CPU
  time per portion in that batch, its polling spins included.
- `saturated_portions_per_s` (wall clock): the same batch with requests waiting as often as
  the requesters can send them: the coordinator pinned alone to one CPU, the 3 requesters to
  the others, each waiting for its reply in a tight `Test` loop that yields the CPU to the
  other requesters (`sched_yield`, no sleep), so a request is back at the coordinator as
  soon as its requester gets a core. `saturated_coordinator_cpu_us_per_portion`: the
  coordinator's CPU time per portion then (scheduler, messages and bookkeeping, few spins),
  and `capacity_portions_per_s`, its inverse: the rate of a coordinator that has a core to
  itself and always finds a request waiting. `*_requests_found_waiting`: the share of
  requests the coordinator found at its first look after the one before (no spin, no
  sleep for them). The wall-clock figure falls short of the capacity when other jobs take
  the coordinator's core or slow the requesters on theirs (then few requests are waiting).
- the reference, `pickled_round_trips_per_s`: the message path before issue 14, a pickled
  dict request (`send`) found with a polled `improbe` and answered by a pickled dict reply
  (the coordinator's old `_receive` and `reply`), between the same ranks (polite waits); a
  portion took at least one such round trip (1 + 1/push_every with its flush), plus the
  old scheduler's scan; and `fixed_round_trips_per_s`, the fixed-size messages alone in
  the same harness.

    python bench/scale_coordinator.py [--portions 1000 4000 16000] [--replicas 2000] [--repeats 3]

Prints one JSON object per batch size and, last, {"coordinator_portions_per_s": ...,
"coordinator_saturated_portions_per_s": ..., "coordinator_capacity_portions_per_s": ...}
(the MPI figures at the largest size). `measure(portion_counts)` returns the per-size
records. About 35 s on a 2-core machine.
"""
import os
import subprocess
import sys

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections import deque  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dbmpi.algorithms.portions import PortionScheduler, cut  # noqa: E402

REQUESTERS = 3  # ranks asking the coordinator, under mpiexec
PUSH_EVERY = 4


def scheduler_rate(n_portions: int, n_replicas: int) -> dict:
    """Portions per second of the scheduler alone: replicas that compute nothing."""
    scheduler = PortionScheduler(cut(0, n_portions, 1), n_replicas, PUSH_EVERY)
    queue = deque((r, None, None) for r in range(n_replicas))
    held = dict.fromkeys(range(n_replicas), 0)
    requests = 0
    start, cpu = time.perf_counter(), time.process_time()
    while not scheduler.complete:
        replica, done, flushed = queue.popleft()
        reply = scheduler.handle(replica, done, flushed)
        requests += 1
        if reply is None:
            continue  # parked: the batch is running dry; it is not asked again
        held[replica] = 0 if reply.discard else held[replica]
        held[replica] += bool(reply.commit)
        if reply.flush:
            queue.append((replica, None, {"portions": held[replica], "loss": 0.0}))
            held[replica] = 0
        else:
            queue.append((replica, None if reply.portion is None else reply.portion[0], None))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"scheduler_portions_per_s": round(n_portions / seconds), "scheduler_requests": requests,
            "scheduler_cpu_us_per_portion": round(1e6 * cpu / n_portions, 1)}


def measure(portion_counts, n_replicas: int = 2000, repeats: int = 3) -> list[dict]:
    """One record per batch size: the scheduler alone, in process, and (from one mpiexec
    run) the coordinator over MPI with its pickled reference."""
    counts = [int(n) for n in portion_counts]
    env = dict(os.environ, DBMPI_BENCH_CHILD="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    mpiexec = Path(sys.executable).with_name("mpiexec")
    cmd = [str(mpiexec) if mpiexec.exists() else "mpiexec", "-n", str(REQUESTERS + 1), sys.executable, "-m",
           "mpi4py", os.path.abspath(__file__), "--repeats", str(repeats), "--portions", *map(str, counts)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"mpiexec failed ({done.returncode}): {done.stderr[-2000:]}")
    over_mpi = {r["portions"]: r for r in map(json.loads, done.stdout.splitlines())}
    return [{"portions": n, "replicas_in_process": n_replicas, **scheduler_rate(n, n_replicas), **over_mpi[n],
             "capacity_portions_per_s": round(1e6 / over_mpi[n]["saturated_coordinator_cpu_us_per_portion"]),
             "load_average": round(os.getloadavg()[0], 1)} for n in counts]


# Under mpiexec ------------------------------------------------------------------------------
def child(counts: list[int], repeats: int) -> None:
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if world.size != REQUESTERS + 1:
        raise SystemExit(f"run with {REQUESTERS + 1} ranks")
    coordinator = world.rank == REQUESTERS

    def best(key: str, run, *args) -> dict:  # the fastest of `repeats` (the coordinator's records)
        records = []
        for _ in range(repeats):
            world.Barrier()
            records.append(run(*args))
        return max(records, key=lambda record: record.get(key, 0))

    def polite(n: int) -> dict:
        return coordinate(world, n, "mpi") if coordinator else follow(world)

    def saturated(n: int) -> dict:
        with pinned(coordinator):
            return coordinate(world, n, "saturated") if coordinator else follow(world, blocking=True)

    for n in counts:
        trips = max(2000, n // 4)
        fed = {**best("mpi_portions_per_s", polite, n), **best("saturated_portions_per_s", saturated, n)}
        pickled = best("pickled_round_trips_per_s", pickled_reference, world, trips, coordinator)
        raw = best("fixed_round_trips_per_s", fixed_round_trips, world, trips, coordinator)
        if coordinator:
            print(json.dumps({"portions": n, "repeats": repeats, **fed, **pickled, **raw}), flush=True)


@contextmanager
def pinned(coordinator: bool):
    """The coordinator alone on the last CPU this process may use, the requesters on the
    others (where there are at least two): spinning requesters then cannot take the
    coordinator's core. Affinity restored on exit."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        yield
        return
    os.sched_setaffinity(0, {cpus[-1]} if coordinator else set(cpus[:-1]))
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)


def coordinate(world, n: int, name: str) -> dict:
    """One batch of `n` portions (of one example each) through ShardSpace.evaluate; the
    figures' names start with `name`."""
    from mpi4py import MPI

    from dbmpi.algorithms.sandblaster import ShardSpace
    from dbmpi.runtime.layout import Layout

    layout = Layout(n_params=1, n_shards=1, n_replicas=REQUESTERS, coordinator=True)
    topo = SimpleNamespace(world=world, control=MPI.COMM_SELF)  # no shard: commands go nowhere
    tcfg = {"history": 1, "portion_size": 1, "push_every": PUSH_EVERY, "backup_tasks": True,
            "weight_decay": 0.0, "replica_timeout_s": 300.0}
    space = ShardSpace(topo, layout, [(0, n)], tcfg)
    waiting = found_waiting(space.ranks)
    start, cpu = time.perf_counter(), time.process_time()
    space.evaluate("x", "g")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    space.stop_replicas()
    space.ranks.close()
    stats = space.stats_log[-1]
    return {f"{name}_portions_per_s": round(n / seconds), f"{name}_seconds": round(seconds, 3),
            f"{name}_coordinator_cpu_us_per_portion": round(1e6 * cpu / n, 1),
            f"{name}_portions_by_replica": stats["portions_by_replica"],
            f"{name}_backups_issued": stats["backups_issued"],
            f"{name}_requests_found_waiting": round(waiting["first"] / max(1, waiting["requests"]), 3)}


def found_waiting(channel) -> dict:
    """Counts, on `channel` (a CoordinatorChannel), the requests taken and those found by
    the coordinator's first look after the one before (it was already waiting: no spin, no
    sleep for it)."""
    counts = {"requests": 0, "first": 0, "hit": False}
    take = channel.request

    def request():
        found = take()
        if found is not None:
            counts["requests"] += 1
            counts["first"] += counts["hit"]
        counts["hit"] = found is not None
        return found

    channel.request = request
    return counts


def follow(world, blocking: bool = False) -> dict:
    """A replica lead that computes nothing: report, ask, do what the reply says, until stop.
    It waits for each reply as a replica does (RankChannel.ask: polled, with back-off
    sleeps), or, `blocking`, without sleeping (Test, yielding the CPU between tries)."""
    import numpy as np

    from dbmpi.algorithms.portions import REPLY_FIELDS, REQUEST_FIELDS, Order, encode_request
    from dbmpi.runtime.comm import Tag
    from dbmpi.runtime.portion_channel import RankChannel

    channel = RankChannel(world, REQUESTERS)
    request, reply = np.zeros(REQUEST_FIELDS, np.int64), np.zeros(REPLY_FIELDS, np.int64)

    def ask() -> np.ndarray:
        if not blocking:
            return channel.ask(request, reply)
        answer = world.Irecv(reply, source=REQUESTERS, tag=Tag.REPLY)
        world.Send(request, dest=REQUESTERS, tag=Tag.REQUEST)
        while not answer.Test():
            os.sched_yield()  # the requesters share their cores: the one with its reply runs next
        return reply

    done, evaluation, flushed, held = None, 0, None, 0
    while True:
        encode_request(request, world.rank, evaluation, done, flushed, False)
        order = Order(*ask().tolist())
        if order.stop:
            return {}
        held = (0 if order.discard else held) + order.commit
        done, flushed = None, None
        if order.flush:
            flushed, held = {"portions": held, "loss": 0.0, "nonfinite": 0}, 0
        elif order.index >= 0:
            done, evaluation = order.index, order.evaluation


def pickled_reference(world, n_round_trips: int, coordinator: bool) -> dict:
    """Round trips per second of the pre-issue-14 path: pickled dicts, `improbe` at the coordinator."""
    from mpi4py import MPI

    from dbmpi.runtime.comm import SPIN_S, Tag, poll, wait

    message = {"replica": 0, "evaluation": 1, "done": 5, "flushed": None, "signal": False}
    answer = {"batch": 0, "commit": True, "discard": False, "flush": False, "portion": (6, 6, 7),
              "backup": False, "evaluation": 1, "n": 1000, "stop": False}
    per_rank = n_round_trips // REQUESTERS
    world.Barrier()
    start, cpu = time.perf_counter(), time.process_time()
    if coordinator:
        status, found = MPI.Status(), []

        def arrived() -> bool:  # as the old coordinator's polled receive
            message = world.improbe(source=MPI.ANY_SOURCE, tag=Tag.REQUEST, status=status)
            if message is not None:
                found.append((status.Get_source(), message.recv()))
            return message is not None

        for _ in range(per_rank * REQUESTERS):
            poll(arrived, spin=SPIN_S)
            world.send(answer, dest=found.pop()[0], tag=Tag.REPLY)
    else:
        for _ in range(per_rank):
            world.send(message, dest=REQUESTERS, tag=Tag.REQUEST)
            wait(world.irecv(source=REQUESTERS, tag=Tag.REPLY))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"pickled_round_trips_per_s": round(per_rank * REQUESTERS / seconds),
            "pickled_coordinator_cpu_us_per_round_trip": round(1e6 * cpu / (per_rank * REQUESTERS), 1)}


def fixed_round_trips(world, n_round_trips: int, coordinator: bool) -> dict:
    """Round trips per second of the fixed-size messages alone (the channels, no scheduler):
    the same harness as `pickled_reference`."""
    import numpy as np

    from dbmpi.algorithms.portions import REPLY_FIELDS, REQUEST_FIELDS, Order, Reply, encode_request
    from dbmpi.runtime.comm import SPIN_S, poll
    from dbmpi.runtime.portion_channel import CoordinatorChannel, RankChannel

    per_rank = n_round_trips // REQUESTERS
    answer = Order.of(Reply(commit=True, portion=(6, 6, 7)), 1, 1000)
    channel = CoordinatorChannel(world, REQUEST_FIELDS, REPLY_FIELDS) if coordinator else RankChannel(world, REQUESTERS)
    world.Barrier()
    start, cpu = time.perf_counter(), time.process_time()
    if coordinator:
        found = []

        def arrived() -> bool:
            request = channel.request()
            if request is not None:
                found.append(request[0])
            return request is not None

        for _ in range(per_rank * REQUESTERS):
            poll(arrived, spin=SPIN_S)
            channel.reply(found.pop(), answer)
        channel.close()
    else:
        request = encode_request(np.zeros(REQUEST_FIELDS, np.int64), 0, 1, 5, None, False)
        reply = np.zeros(REPLY_FIELDS, np.int64)
        for _ in range(per_rank):
            channel.ask(request, reply)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"fixed_round_trips_per_s": round(per_rank * REQUESTERS / seconds),
            "fixed_coordinator_cpu_us_per_round_trip": round(1e6 * cpu / (per_rank * REQUESTERS), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--portions", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--replicas", type=int, default=2000, help="virtual replicas of the in-process figure")
    parser.add_argument("--repeats", type=int, default=3, help="MPI measurements per figure; the fastest is kept")
    args = parser.parse_args()
    if os.environ.get("DBMPI_BENCH_CHILD"):
        child(args.portions, args.repeats)
        return
    records = measure(args.portions, args.replicas, args.repeats)
    for record in records:
        print(json.dumps(record), flush=True)
    last = records[-1]
    print(json.dumps({"coordinator_portions_per_s": last["mpi_portions_per_s"],
                      "coordinator_saturated_portions_per_s": last["saturated_portions_per_s"],
                      "coordinator_capacity_portions_per_s": last["capacity_portions_per_s"],
                      "scheduler_portions_per_s": last["scheduler_portions_per_s"],
                      "pickled_round_trips_per_s": last["pickled_round_trips_per_s"],
                      "fixed_round_trips_per_s": last["fixed_round_trips_per_s"]}), flush=True)


if __name__ == "__main__":
    main()
