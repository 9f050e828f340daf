"""Cluster scale II: what grows with N and W, measured part by part, each against its reference.

Four parts, run one after the other (never two timings at once), each a module of its own
that can also run alone:

- checkpoint (bench/scale_checkpoint.py): write and resume-verify GB/s of a checkpoint of an
  Adagrad model's two vectors against S, every shard writing and hashing its slice file in
  parallel; the reference in the same run is the single-file format written and re-hashed by
  one process, as before issue 14;
- memory (bench/scale_memory.py): every rank's measured peak RSS in a real Downpour run
  against `dbmpi plan`'s figure for it, and against the full vector (4N bytes), for a few N;
- coordinator (bench/scale_coordinator.py): Sandblaster's coordinator, portions handed out
  per second against the portions in a batch, in process and over real MPI messages, against
  the pickled round trip it replaced;
- control (bench/scale_control.py): an oversubscribed Downpour run of W tiny replicas
  (compute replaced by a sleep), one killed: failure-detection and end-of-run seconds
  against W.

Every record is printed as a JSON line with its "part"; the last line is
{"checkpoint_gbps_by_shards", "rss_vs_plan_max", "coordinator_portions_per_s", ...}.

    python bench/scale.py [--quick] [--parts checkpoint memory coordinator control]
        [--out bench/results/scale.jsonl]
    python bench/scale.py --summary bench/results/scale.jsonl   # the last line again, from
        # the newest records of each part in a file (parts run at different times)

`--quick` uses small sizes (a check that every part runs, in a few minutes; not figures to
quote).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

PARTS = ("checkpoint", "memory", "coordinator", "control")
FULL = {"checkpoint": {"n_params": 256 * 2**20, "shard_counts": (1, 2, 4)},
        "memory": {"sizes": (4 * 2**20, 16 * 2**20, 64 * 2**20)},
        "coordinator": {"portion_counts": (2000, 8000, 32000)},
        "control": {"worker_counts": (8, 16, 32, 64)}}
QUICK = {"checkpoint": {"n_params": 4 * 2**20, "shard_counts": (1, 2)},
         "memory": {"sizes": (2**20,)},
         "coordinator": {"portion_counts": (1000,)},
         "control": {"worker_counts": (8,)}}


def emit(record: dict, out) -> dict:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        out.write(line + "\n")
        out.flush()
    return record


def run_part(name: str, sizes: dict) -> tuple[list[dict], dict]:
    """The part's records and, for the checkpoint, its single-file reference figures."""
    if name == "checkpoint":
        import scale_checkpoint

        records = scale_checkpoint.measure(sizes["n_params"], sizes["shard_counts"])
        # The single-file reference is measured inside the S = 1 run, on the same vectors.
        single = next((r for r in records if "single_file_write_gbps" in r), {})
        return records, {k: v for k, v in single.items() if k.startswith("single_file")}
    if name == "memory":
        import scale_memory

        return scale_memory.measure(sizes["sizes"]), {}
    if name == "coordinator":
        import scale_coordinator

        return scale_coordinator.measure(sizes["portion_counts"]), {}
    import scale_control

    return scale_control.measure(sizes["worker_counts"]), {}


def summary(results: dict) -> dict:
    """The last line: each part's headline figures (None for a part not run)."""
    ckpt, _ = results.get("checkpoint", ([], {}))
    reference = results.get("checkpoint", ([], {}))[1]
    memory, _ = results.get("memory", ([], {}))
    coordinator, _ = results.get("coordinator", ([], {}))
    control, _ = results.get("control", ([], {}))
    largest = max(coordinator, key=lambda r: r["portions"]) if coordinator else {}
    return {
        "checkpoint_gbps_by_shards": {r["shards"]: r["write_gbps"] for r in ckpt} or None,
        "verify_gbps_by_shards": {r["shards"]: r["verify_gbps"] for r in ckpt} or None,
        "single_file_write_gbps": reference.get("single_file_write_gbps"),
        "single_file_verify_gbps": reference.get("single_file_verify_gbps"),
        "rss_vs_plan_max": max((round(abs(r["rss_vs_plan"] - 1), 4) for r in memory), default=None),
        # Wall clock over MPI at the largest batch: the better of requesters that wait as
        # replicas do and requesters that never sleep; capacity: 1 / the coordinator's CPU
        # time per portion with requests waiting (bench/scale_coordinator.py).
        "coordinator_portions_per_s": max((largest.get(k) or 0 for k in ("mpi_portions_per_s",
                                                                           "saturated_portions_per_s")),
                                          default=None) or None,
        "coordinator_capacity_portions_per_s": largest.get("capacity_portions_per_s"),
        "scheduler_portions_per_s": largest.get("scheduler_portions_per_s"),
        "pickled_round_trips_per_s": largest.get("pickled_round_trips_per_s"),
        "detection_s_by_workers": {r["workers"]: r["detection_s"] for r in control} or None,
        "end_of_run_s_by_workers": {r["workers"]: r["end_of_run_s"] for r in control} or None,
    }


def from_file(path: Path) -> dict:
    """Each part's records from its newest run in a file written with --out."""
    results, current = {}, {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        part = record.pop("part", None)
        if part in PARTS and set(record) <= {"wall_s", "load_average"}:  # the line closing a part's run
            results[part] = current.pop(part, ([], {}))
        elif part in PARTS:
            records, reference = current.setdefault(part, ([], {}))
            records.append(record)
            if part == "checkpoint":
                reference.update({k: v for k, v in record.items() if k.startswith("single_file")})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a check that every part runs")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--out", type=Path, help="also append every line to this file")
    parser.add_argument("--summary", type=Path, help="print the last line from this file's records; run nothing")
    args = parser.parse_args()
    if args.summary is not None:
        print(json.dumps(summary(from_file(args.summary))))
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    out = None
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        out = args.out.open("a")
    sizes = QUICK if args.quick else FULL
    emit({"part": "run", "quick": args.quick, "cores": os.cpu_count(), "load_average": os.getloadavg()[0],
          "unix": round(time.time())}, out)
    results = {}
    for name in args.parts:
        started = time.monotonic()
        records, reference = run_part(name, sizes[name])
        results[name] = (records, reference)
        for record in records:
            emit({"part": name, **record}, out)
        emit({"part": name, "wall_s": round(time.monotonic() - started, 1),
              "load_average": os.getloadavg()[0]}, out)
    emit(summary(results), out)


if __name__ == "__main__":
    main()
