"""Model-parallel benchmark: one training step of a model split across P partitions, against
the same step on one partition, measured in the same run.

A step is PartitionedNetwork.loss_and_grad (forward, loss, backward; no update) on one random
batch, the same on every partition, each reading its own input rows. Models: the locally
connected image model (configs/image_local.toml, batch 64), a larger one
(configs/image_local_large.toml: 64 x 64 inputs, three stages, 9.8M parameters, batch 32)
and the speech model (configs/speech.toml, 42M parameters, batch 128). The job has max(P) ranks, one BLAS thread
each; P = p runs on the first p ranks while the others sleep (not spin) in an Ibarrier. A
partitioned step's time is the slowest partition's. Cases are interleaved repeat by repeat
(in alternating order) so drifts in this shared machine's load hit them alike; each figure
is the median over the repeats.

speedup(P) = step(P = 1, one rank, 1 BLAS thread) / step(P) -- the paper's one partition per
machine. The second reference, step(P = 1, one rank, 2 BLAS threads), is the same cores
without MPI (when the machine has 2); speedup_p2_vs_p1_2threads compares with it. Also per
partition: the bytes sent and received per step (the network's counters, and the plan's
figure times the batch) and, from a separate instrumented pass, the seconds spent inside
MPI (communication plus waiting for the other partitions): the exchange time the step
exposes. Every P > 1 is measured twice: as PartitionedNetwork runs by default ("pP": each
exchange completes before its layer computes) and with the exchanges overlapped behind
compute ("pP_overlap", overlap=True), so the overlap's effect is measured in the same run.

Prints one JSON object per measurement and, last, the summary {"speedup_p2_local",
"speedup_p2_speech", "speedup_p2_overlap_local", "exposed_exchange_ms_p2_local", ...};
appends them to bench/results/model_parallel.jsonl.

    python bench/model_parallel.py [--quick] [--partitions 1,2] [--models local,speech]
        [--steps K] [--repeats R] [--batch N] [--no-record]   (re-launches itself under mpiexec)
"""
import os
import subprocess
import sys

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "model_parallel.jsonl"
MODELS = {"local": ("image_local", ROOT / "configs" / "image_local.toml"),
          "local_large": ("image_local_large", ROOT / "configs" / "image_local_large.toml"),
          "speech": ("speech", ROOT / "configs" / "speech.toml")}
DEFAULT_BATCH = 128


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short measurements (a smoke run)")
    parser.add_argument("--partitions", default="1,2", help="comma list of P (default 1,2); ranks = max")
    parser.add_argument("--models", default="local,speech", help="comma list of: " + ", ".join(MODELS))
    parser.add_argument("--steps", type=int, help="timed steps per measurement (default: about 1.5 s "
                                                  "of P = 1 steps, 0.3 s with --quick)")
    parser.add_argument("--repeats", type=int, help="measurements per case (default 11, 3 with --quick)")
    parser.add_argument("--batch", type=int, help="batch size for every model (default: the config's "
                                                  f"[train] batch_size, else {DEFAULT_BATCH})")
    parser.add_argument("--no-record", action="store_true", help=f"do not append to {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args()
    try:
        args.partitions = sorted({int(p) for p in args.partitions.split(",")})
    except ValueError:
        parser.error(f"--partitions: expected a comma list of integers, got {args.partitions!r}")
    if args.partitions[0] < 1:
        parser.error("--partitions: every P must be >= 1")
    args.models = [m.strip() for m in args.models.split(",")]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    for name in ("steps", "repeats", "batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name}: must be >= 1")
    return args


def relaunch_under_mpiexec(n_ranks):
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        mpiexec = "mpiexec"
    os.environ["DBMPI_BENCH_CHILD"] = "1"
    cmd = [mpiexec, "-n", str(n_ranks), sys.executable, "-m", "mpi4py", os.path.abspath(__file__), *sys.argv[1:]]
    sys.exit(subprocess.call(cmd))


def progress(message):
    print(f"model_parallel: {message}", file=sys.stderr, flush=True)


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Bench:
    """The job's communicators and the measurements every world rank takes part in."""

    def __init__(self, partitions):
        from mpi4py import MPI
        from threadpoolctl import ThreadpoolController

        import dbmpi.model  # noqa: F401  (loads the BLAS the kernels link, for the controller to see)

        self.MPI = MPI
        self.world = MPI.COMM_WORLD
        self.rank = self.world.rank
        self.blas = ThreadpoolController()
        # First p ranks for each P; COMM_NULL on the ranks outside.
        self.comms = {p: self.world.Split(0 if self.rank < p else MPI.UNDEFINED, self.rank) for p in partitions}

    def free(self):
        for comm in self.comms.values():
            if comm != self.MPI.COMM_NULL:
                comm.Free()

    def idle_barrier(self):
        """Barrier over the world in which waiting ranks sleep: MPICH's blocking Barrier
        busy-polls, which would take a core from the ranks being measured."""
        request = self.world.Ibarrier()
        while not request.Test():
            time.sleep(0.005)

    def time_case(self, part, x, labels, steps, warmup, threads):
        """Seconds per step of `part` (None off its partitions): the slowest partition's
        time over `steps` steps after `warmup` untimed ones. Collective over the world."""
        seconds = None
        if part is not None:
            with self.blas.limit(limits=threads, user_api="blas"):
                for _ in range(warmup):
                    part.loss_and_grad(x, labels)
                part.comm.Barrier()
                start = time.perf_counter()
                for _ in range(steps):
                    part.loss_and_grad(x, labels)
                elapsed = time.perf_counter() - start
            seconds = part.comm.allreduce(elapsed, op=self.MPI.MAX) / steps
        self.idle_barrier()
        return seconds


class _Proxy:
    """Delegates attribute reads to `target`; the callables are wrapped by `wrap` (if given),
    and `overrides` replace attributes."""

    def __init__(self, target, wrap=None, **overrides):
        self._target, self._wrap = target, wrap
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        attr = getattr(self._target, name)
        return self._wrap(attr) if self._wrap is not None and callable(attr) else attr


class MPIClock:
    """Seconds a partition spends in MPI calls (transfers plus waiting for its peers): every
    call on its communicator and every MPI.Request call the partitioned module makes."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed

    @contextlib.contextmanager
    def attached(self, part):
        from mpi4py import MPI

        from dbmpi.model import partitioned

        comm = part.comm
        part.comm = _Proxy(comm, self.wrap)
        partitioned.MPI = _Proxy(MPI, Request=_Proxy(MPI.Request, self.wrap))
        try:
            yield self
        finally:
            part.comm = comm
            partitioned.MPI = MPI


def instrumented_pass(part, x, labels, steps):
    """Per-step (seconds, seconds in MPI, bytes sent, bytes received) of this partition."""
    part.loss_and_grad(x, labels)
    sent, received = part.bytes_sent, part.bytes_received
    part.comm.Barrier()
    with MPIClock().attached(part) as clock:
        start = time.perf_counter()
        for _ in range(steps):
            part.loss_and_grad(x, labels)
        elapsed = time.perf_counter() - start
    return (elapsed / steps, clock.seconds / steps,
            per_step(part.bytes_sent - sent, steps), per_step(part.bytes_received - received, steps))


def per_step(total, steps):
    """total / steps, as an int when it divides (every step moves the same bytes)."""
    return total // steps if total % steps == 0 else total / steps


def _model_inputs(key, args):
    """The model's network, batch size and one random batch (inputs and labels)."""
    from dbmpi import config
    from dbmpi.model import Network

    name, path = MODELS[key]
    cfg = config.load(path, require_train=False)
    network = Network(cfg["model"])
    batch = args.batch or cfg.get("train", {}).get("batch_size") or DEFAULT_BATCH
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *network.input_shape), dtype=np.float32)
    labels = rng.integers(0, network.n_classes, batch, dtype=np.int32)
    return name, network, batch, x, labels


def _usable_partitions(network, partitions):
    """The partition counts the network can be split into, and why the others cannot."""
    from dbmpi.parallel.partition import PartitionError, PartitionPlan

    usable, skipped = [], {}
    for p in partitions:
        try:
            PartitionPlan.for_network(network, p)
            usable.append(p)
        except PartitionError as exc:
            skipped[str(p)] = str(exc)
    return usable, skipped


def _partitions_here(bench, network, usable, x):
    """(P, overlap) -> (partition, its input rows of the batch), on the ranks of P's
    communicator; P > 1 with and without overlapped exchanges."""
    from dbmpi.model.partitioned import PartitionedNetwork

    parts = {}
    for p in usable:
        if bench.comms[p] != bench.MPI.COMM_NULL:
            for overlap in ((False, True) if p > 1 else (False,)):
                part = PartitionedNetwork(network, bench.comms[p], overlap=overlap)
                r0, r1 = part.input_rows
                parts[p, overlap] = (part, np.ascontiguousarray(x[:, r0:r1]))
    return parts


def _run_case(bench, parts, labels, case, steps, warmup):
    _, p, threads, overlap = case
    part, rows = parts.get((p, overlap), (None, None))
    return bench.time_case(part, rows, labels, steps, warmup, threads)


def _sample_cases(bench, run, cases, args, name, batch, skipped):
    """Warm every case, size the measurement, then time the cases repeat by repeat (in
    alternating order). Returns (steps, repeats, {label: seconds per step of each repeat})."""
    # Warm every case; size the measurement on the P = 1 step (or the first case's).
    first = run(cases[0], 1, 2)
    for case in cases[1:]:
        run(case, 1, 2)
    target = 0.3 if args.quick else 1.5
    steps = args.steps or bench.world.bcast(max(1, round(target / first)) if bench.rank == 0 else None)
    repeats = args.repeats or (3 if args.quick else 11)
    if bench.rank == 0:
        progress(f"{name}: batch {batch}, {steps} step(s) x {repeats} repeats per case "
                 f"{[c[0] for c in cases]}" + (f"; skipped P {list(skipped)}" if skipped else ""))

    samples = {case[0]: [] for case in cases}
    for rep in range(repeats):
        for case in (cases if rep % 2 == 0 else cases[::-1]):
            seconds = run(case, steps, 1)
            if bench.rank == 0:
                samples[case[0]].append(seconds)
        if bench.rank == 0:
            progress(f"{name} repeat {rep + 1}/{repeats}: " +
                     ", ".join(f"{label} {1e3 * s[-1]:.1f} ms" for label, s in samples.items()))
    return steps, repeats, samples


def _instrumented_detail(bench, parts, cases, labels, steps, batch):
    """Bytes and time in MPI per partition, from an instrumented pass after the timed ones
    ((P, overlap) -> figures, on rank 0)."""
    detail = {}
    for _, p, threads, overlap in cases:
        if threads != 1:
            continue
        result = None
        if (p, overlap) in parts:
            part, rows = parts[p, overlap]
            result = part.comm.gather(instrumented_pass(part, rows, labels, steps), root=0)
        bench.idle_barrier()
        if bench.rank == 0:
            plan = parts[p, overlap][0].plan
            plan_bytes = [plan.bytes_per_example(q) for q in range(p)]
            detail[p, overlap] = {
                "n_params_per_partition": [plan.n_params_of(q) for q in range(p)],
                "bytes_sent": [r[2] for r in result],
                "bytes_received": [r[3] for r in result],
                "plan_bytes_sent": [batch * (b["forward_send"] + b["backward_send"]) for b in plan_bytes],
                "plan_bytes_received": [batch * (b["forward_recv"] + b["backward_recv"]) for b in plan_bytes],
                "instrumented_step_ms": [round(1e3 * r[0], 3) for r in result],
                "mpi_ms": [round(1e3 * r[1], 3) for r in result],
            }
    return detail


def _summarize(cases, samples, detail, common, skipped, emit):
    """Emit one record per case; return the model's summary (rank 0)."""
    median_ms = {label: 1e3 * statistics.median(s) for label, s in samples.items()}
    p1_ms, threads2_ms = median_ms.get("p1"), median_ms.get("p1_2threads")
    summary = {"batch": common["batch"], "n_params": common["n_params"], "steps": common["steps"],
               "repeats": common["repeats"],
               "step_ms": {}, "speedup": {}, "speedup_vs_p1_2threads": {}, "bytes_per_step": {},
               "mpi_ms": {}, "step_ms_overlap": {}, "speedup_overlap": {},
               "mpi_ms_overlap": {}, "skipped": skipped}
    for label, p, threads, overlap in cases:
        ms = median_ms[label]
        record = {"bench": "model_parallel", **common, "partitions": p, "blas_threads": threads,
                  "overlap": overlap,
                  "step_ms": ms, "step_ms_samples": [round(1e3 * s, 3) for s in samples[label]],
                  "speedup": None if p1_ms is None else p1_ms / ms,
                  "speedup_vs_p1_2threads": None if threads2_ms is None else threads2_ms / ms}
        if threads == 1:
            d = detail[p, overlap]
            record.update(d, bytes_agree=d["bytes_sent"] == d["plan_bytes_sent"]
                          and d["bytes_received"] == d["plan_bytes_received"])
            if overlap:
                summary["step_ms_overlap"][str(p)] = round(ms, 3)
                summary["speedup_overlap"][str(p)] = None if p1_ms is None else round(p1_ms / ms, 3)
                summary["mpi_ms_overlap"][str(p)] = d["mpi_ms"]
                emit(record)
                continue
            summary["step_ms"][str(p)] = round(ms, 3)
            summary["speedup"][str(p)] = None if p1_ms is None else round(p1_ms / ms, 3)
            summary["speedup_vs_p1_2threads"][str(p)] = (None if threads2_ms is None
                                                         else round(threads2_ms / ms, 3))
            summary["bytes_per_step"][str(p)] = {k: d[k] for k in ("bytes_sent", "bytes_received",
                                                                   "plan_bytes_sent", "plan_bytes_received")}
            summary["mpi_ms"][str(p)] = d["mpi_ms"]
        else:
            summary["step_ms_p1_2threads"] = round(ms, 3)
        emit(record)
    return summary


def bench_model(bench, key, args, cores, emit):
    """All cases of one model; returns its summary (on rank 0)."""
    name, network, batch, x, labels = _model_inputs(key, args)
    usable, skipped = _usable_partitions(network, args.partitions)
    parts = _partitions_here(bench, network, usable, x)

    # Cases: (label, P, BLAS threads, overlap); P > 1 also with overlap; the 2-thread
    # P = 1 reference when there are 2 cores.
    cases = [(f"p{p}", p, 1, False) for p in usable]
    cases += [(f"p{p}_overlap", p, 1, True) for p in usable if p > 1]
    if 1 in usable and cores >= 2:
        cases.append(("p1_2threads", 1, 2, False))
    if not cases:
        return {"batch": batch, "n_params": network.n_params, "skipped": skipped} if bench.rank == 0 else None

    run = functools.partial(_run_case, bench, parts, labels)
    steps, repeats, samples = _sample_cases(bench, run, cases, args, name, batch, skipped)
    detail = _instrumented_detail(bench, parts, cases, labels, steps, batch)
    if bench.rank != 0:
        return None
    common = {"model": name, "ranks": bench.world.size, "cores": cores, "batch": batch,
              "steps": steps, "repeats": repeats, "n_params": network.n_params}
    return _summarize(cases, samples, detail, common, skipped, emit)


def environment(bench):
    from mpi4py import MPI

    blas = [{k: i.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
            for i in bench.blas.info() if i.get("user_api") == "blas"]
    return {"bench": "environment", "python": platform.python_version(), "numpy": np.__version__,
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "cores_rank0": usable_cores(),
            "ranks": bench.world.size, "mpi": MPI.Get_library_version().splitlines()[0].strip(),
            "loadavg": [round(v, 2) for v in os.getloadavg()], "blas": blas}


def main(args):
    bench = Bench(args.partitions)
    cores = usable_cores()
    lines = []

    def emit(record):
        lines.append(json.dumps(record))
        print(lines[-1], flush=True)

    env = environment(bench) if bench.rank == 0 else None
    if env:
        emit(env)
    models = {key: bench_model(bench, key, args, cores, emit) for key in args.models}
    bench.free()
    if bench.rank != 0:
        return
    result = {}
    for key in MODELS:
        m = models.get(key) or {}
        result[f"speedup_p2_{key}"] = m.get("speedup", {}).get("2")
        result[f"speedup_p2_vs_p1_2threads_{key}"] = m.get("speedup_vs_p1_2threads", {}).get("2")
        result[f"speedup_p2_overlap_{key}"] = m.get("speedup_overlap", {}).get("2")
        # Exposed exchange time per step (ms in MPI, the slowest partition's), overlapped and not.
        exposed = {}
        for name, field in (("no_overlap", "mpi_ms"), ("overlap", "mpi_ms_overlap")):
            mpi_ms = m.get(field, {}).get("2")
            exposed[name] = max(mpi_ms) if mpi_ms else None
        result[f"exposed_exchange_ms_p2_{key}"] = exposed
    result.update(models=models, partitions=args.partitions, cpu_count=os.cpu_count(), cores_rank0=cores,
                  ranks=bench.world.size, mpi=env["mpi"], loadavg_start=env["loadavg"],
                  loadavg_end=[round(v, 2) for v in os.getloadavg()])
    emit(result)
    if not args.no_record:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    arguments = parse_args()
    if os.environ.get("DBMPI_BENCH_CHILD") != "1" and "mpi4py" not in sys.modules:
        relaunch_under_mpiexec(max(arguments.partitions))
    main(arguments)
