"""Figure 3 at our scale: training speed-up of one model instance against the partitions
(machines) P it is split across, for the speech model (fully connected, 41.8M parameters),
the locally connected image model and a larger locally connected model; with the bytes
each partition sends and receives per step and its compute time per step.

    python bench/paper/fig3_partitions.py [--quick] [--partitions 1,2[,4,8,16]] [--models ...]

The measurement is bench/model_parallel.py's (run as a subprocess under mpiexec with
max(P) ranks, one BLAS thread each; synthetic batches shaped like each model's input; the
speech model's 440 inputs are the paper's 11 frames x 40 log-energies, 8192 softmax
classes): one training step (forward, loss, backward) on P ranks against the same step on
one rank. Compute time per step of a partition is its instrumented step time minus the
time it spends inside MPI calls (transfers plus waiting for its peers). P = 1 and 2 on a
2-core machine; larger P where the machine has the cores (the locally connected image
model cannot be split into more than 4: its last pooling layer has 4 rows).
Writes bench/paper/results/fig3.json and docs/img/paper/fig3.png (fig3_quick.* with --quick).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIGURES, ROOT, machine, output_name, pyplot, write_result  # noqa: E402

LABELS = {"local": "image_local (328k params, batch 64)",
          "local_large": "image_local_large (9.8M params, batch 32)",
          "speech": "speech (41.8M params, batch 128)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bench/model_parallel.py --quick (3 repeats)")
    parser.add_argument("--partitions", default="1,2", help="comma list of P (ranks = max P)")
    parser.add_argument("--models", default="speech,local,local_large")
    parser.add_argument("--repeats", type=int, help="repeats per case (default 7, quick 3)")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    cmd = [sys.executable, str(ROOT / "bench" / "model_parallel.py"), "--partitions", args.partitions,
           "--models", args.models, "--repeats", str(repeats), "--no-record"] + (["--quick"] if args.quick else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    summary = lines[-1]
    per_case = [r for r in lines if r.get("bench") == "model_parallel"]

    models = {}
    for key, m in summary["models"].items():
        if not m or "step_ms" not in m:
            models[key] = m
            continue
        rows = {}
        for p, step_ms in m["step_ms"].items():
            record = next(r for r in per_case if r["model"] == _name(key) and r["partitions"] == int(p)
                          and r["blas_threads"] == 1)
            compute = [round(s - c, 3) for s, c in zip(record["instrumented_step_ms"], record["mpi_ms"], strict=True)]
            sent, received = record["bytes_sent"], record["bytes_received"]
            rows[p] = {"step_ms": step_ms, "speedup": m["speedup"][p],
                       "speedup_vs_p1_2threads": m["speedup_vs_p1_2threads"][p],
                       "instrumented_step_ms_per_partition": record["instrumented_step_ms"],
                       "compute_ms_per_partition": compute, "mpi_ms_per_partition": record["mpi_ms"],
                       "bytes_sent_per_partition": sent, "bytes_received_per_partition": received,
                       "bytes_per_step_total": int(sum(sent) + sum(received)),
                       "bytes_agree_with_plan": record["bytes_agree"]}
        models[key] = {"label": LABELS.get(key, key), "n_params": m["n_params"], "batch": m["batch"],
                       "steps_per_measurement": m["steps"], "repeats": m["repeats"],
                       "step_ms_p1_2threads": m.get("step_ms_p1_2threads"), "by_partitions": rows,
                       "skipped_partitions": m.get("skipped", {})}
    result = {"experiment": "fig3", "quick": args.quick, "command": " ".join(cmd[1:]),
              "partitions": summary["partitions"], "ranks": summary["ranks"], "cores": summary["cores_rank0"],
              "mpi": summary["mpi"], "models": models,
              "speedup_p2": {k: m["by_partitions"].get("2", {}).get("speedup") for k, m in models.items()
                             if m and "by_partitions" in m},
              "loadavg_start": summary["loadavg_start"], "loadavg_end": summary["loadavg_end"],
              "machine": machine()}
    write_result(output_name("fig3", args.quick), result)

    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    ps = sorted({int(p) for m in models.values() if m and "by_partitions" in m for p in m["by_partitions"]})
    ax.plot(ps, ps, color="gray", ls=":", label="ideal")
    width = 0.8 / max(1, len(models))
    for i, m in enumerate(models.values()):
        if not m or "by_partitions" not in m:
            continue
        rows = m["by_partitions"]
        x = sorted(int(p) for p in rows)
        ax.plot(x, [rows[str(p)]["speedup"] for p in x], "o-", label=m["label"])
        for j, p in enumerate(x):
            r = rows[str(p)]
            compute = max(r["compute_ms_per_partition"])
            mpi = max(r["mpi_ms_per_partition"])
            p1 = max(rows["1"]["instrumented_step_ms_per_partition"])  # the same (instrumented) pass
            pos = j + (i - (len(models) - 1) / 2) * width
            bx.bar(pos, compute / p1, width, color=f"C{i}", label=m["label"] if j == 0 else None)
            bx.bar(pos, mpi / p1, width, bottom=compute / p1, color=f"C{i}", alpha=0.35, hatch="//")
            mb = r["bytes_per_step_total"] / 1e6
            bx.text(pos, (compute + mpi) / p1 + 0.02, f"{mb:.1f} MB", ha="center", fontsize=6)
    ax.set_xlabel("partitions P (one rank, one core each)")
    ax.set_ylabel("step speed-up over P = 1")
    ax.set_xticks(ps)
    ax.set_title("Figure 3: speed-up of one model instance")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    bx.set_xticks(range(len(ps)))
    bx.set_xticklabels([f"P = {p}" for p in ps])
    bx.set_ylabel("time per step / P = 1 step (largest per partition)")
    bx.set_ylim(0, 1.2)
    bx.set_title("compute (solid) and in-MPI (hatched) time per step; MB sent+received", fontsize=9)
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(FIGURES / f"{output_name('fig3', args.quick)}.png", dpi=110)


def _name(key: str) -> str:
    return {"local": "image_local", "local_large": "image_local_large", "speech": "speech"}[key]


if __name__ == "__main__":
    main()
