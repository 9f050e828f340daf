"""Draw the benchmark figures of docs/BENCHMARKS.md from bench/results/*.jsonl.

    python bench/plot.py        (needs matplotlib: pip install dbmpi[plot])
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
OUT = ROOT / "docs" / "img"


def load(name):
    path = RESULTS / f"{name}.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # MPI launcher banners
    return rows


def rma():
    rows = [r for r in load("rma") if r.get("bench") == "rma"]
    if not rows:
        return
    mb = [r["megabytes"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key, label in (("memcpy_gb_s", "memcpy (reference)"), ("fetch_gb_s", "fetch: Rget_accumulate(NO_OP)"),
                       ("push_gb_s", "push: Raccumulate(SUM)"), ("drain_gb_s", "shard drain")):
        ax.plot(mb, [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes per transfer (MB)")
    ax.set_ylabel("GB/s")
    ax.set_title("RMA against one shard (MPICH, shared memory)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT / "rma_bandwidth.png", dpi=120)


def downpour():
    rows = [r for r in load("downpour") if r.get("bench") == "downpour_samples_per_s"]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(5, 3.4))
    reps = [r["replicas"] for r in rows]
    ax.bar([str(r) for r in reps], [r["samples_per_s"] for r in rows], label="Downpour (S = 1)")
    ax.axhline(rows[0]["single_process_sgd_samples_per_s"], color="k", ls="--", label="single-process SGD")
    ax.set_xlabel("replicas")
    ax.set_ylabel("samples/s (all replicas)")
    ax.set_title(f"Fashion-MNIST MLP on {rows[0]['cores']} cores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "downpour_samples_per_s.png", dpi=120)


def network():
    """Round trips to a busy shard (bench/network.py), per path and shard variant."""
    rows = [r for r in load("network") if r.get("bench") == "busy_shard"]
    if not rows:
        return
    variants = [("shm", "fused"), ("netmod", "fused"), ("netmod", "whole"), ("netmod", "whole+thread")]
    sizes = sorted({r["size_mb"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("counter_round_trip_ms", "fetch_ms", "push_ms"),
                              ("counter round trip", "fetch of the whole slice", "push of the whole slice"),
                              strict=True):
        width = 0.8 / len(variants)
        for i, (path, shard) in enumerate(variants):
            values = [next((r[key] for r in rows if (r["path"], r["shard"], r["size_mb"]) == (path, shard, mb)),
                           0.0) for mb in sizes]
            ax.bar([j + i * width for j in range(len(sizes))], values, width, label=f"{path}, {shard}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], [f"{mb} MB" for mb in sizes])
        ax.set_yscale("log")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{title}, shard busy updating", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "network_busy_shard.png", dpi=120)


def log_axis_at(ax, values, labels):
    """A logarithmic x axis labelled at the measured values only."""
    ax.set_xscale("log")
    ax.set_xticks(values, labels)
    ax.minorticks_off()


def scale():
    """Cluster scale (bench/scale.py): checkpoint GB/s against S, RSS against the plan and
    against N, the coordinator's rate against portions, failover times against W."""
    rows = load("scale")
    def part_end(r):  # the line closing a part's run: its time and the load
        return set(r) <= {"part", "wall_s", "load_average"}

    parts = {name: [r for r in rows if r.get("part") == name and not part_end(r)]
             for name in ("checkpoint", "memory", "coordinator", "control")}
    if not any(parts.values()):
        return
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    ckpt = sorted(parts["checkpoint"], key=lambda r: r["shards"])
    if ckpt:
        shards = [r["shards"] for r in ckpt]
        axes[0].plot(shards, [r["write_gbps"] for r in ckpt], "o-", label="write, a slice file per shard")
        axes[0].plot(shards, [r["verify_gbps"] for r in ckpt], "s-", label="resume verify, each shard its range")
        single = next((r for r in ckpt if "single_file_write_gbps" in r), None)
        if single:
            axes[0].axhline(single["single_file_write_gbps"], color="C0", ls=":", label="write, one file (before)")
            axes[0].axhline(single["single_file_verify_gbps"], color="C1", ls=":", label="verify at the root (before)")
        axes[0].set_xticks(shards)
        axes[0].set_xlabel("shards S")
        axes[0].set_ylabel("GB/s")
        axes[0].set_title(f"checkpoint of {ckpt[0]['n_params'] / 2**20:.0f}M params + Adagrad", fontsize=9)
        axes[0].legend(fontsize=6)
    memory = parts["memory"]
    if memory:
        def kind(r):
            if r["role"].startswith("shard"):
                return "shard"
            return "partition (P = 2)" if r.get("partitions", 1) > 1 else "worker (P = 1)"

        for role, marker in (("worker (P = 1)", "o"), ("shard", "s"), ("partition (P = 2)", "^")):
            mine = [r for r in memory if kind(r) == role]
            if mine:
                axes[1].plot([r["n_params"] / 2**20 for r in mine], [r["rss_vs_plan"] for r in mine], marker,
                             label=role)
        axes[1].axhspan(0.9, 1.1, color="0.9")
        sizes = sorted({r["n_params"] / 2**20 for r in memory})
        log_axis_at(axes[1], sizes, [f"{m:.0f}" for m in sizes])
        axes[1].set_xlabel("parameters (M)")
        axes[1].set_ylabel("peak RSS / dbmpi plan")
        axes[1].set_title("every rank's peak RSS against its plan", fontsize=9)
        axes[1].legend(fontsize=7)
    coordinator = sorted(parts["coordinator"], key=lambda r: r["portions"])
    if coordinator:
        x = [r["portions"] for r in coordinator]
        for key, label in (("capacity_portions_per_s", "capacity (1 / CPU per portion)"),
                           ("saturated_portions_per_s", "over MPI, requests waiting"),
                           ("mpi_portions_per_s", "over MPI, replicas' waits"),
                           ("scheduler_portions_per_s", "scheduler alone")):
            if key in coordinator[0]:
                axes[2].plot(x, [r[key] for r in coordinator], "o-", label=label)
        axes[2].axhline(10000, color="0.5", ls=":", label="target 10,000/s")
        axes[2].set_yscale("log")
        log_axis_at(axes[2], x, [f"{n:,}" for n in x])
        axes[2].set_xlabel("portions per batch")
        axes[2].set_ylabel("portions/s")
        axes[2].set_title("Sandblaster's coordinator", fontsize=9)
        axes[2].legend(fontsize=6)
    control = sorted(parts["control"], key=lambda r: r["workers"])
    if control:
        w = [r["workers"] for r in control]
        axes[3].plot(w, [r["detection_s"] for r in control], "o-", label="failure detected")
        axes[3].plot(w, [r["end_of_run_s"] for r in control], "s-", label="end of run")
        axes[3].axhline(control[0]["replica_timeout_s"], color="0.5", ls=":", label="replica_timeout_s")
        axes[3].set_xticks(w)
        axes[3].set_xlabel("workers W (oversubscribed on 2 cores)")
        axes[3].set_ylabel("s")
        axes[3].set_title("a killed replica among W", fontsize=9)
        axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "scale.png", dpi=120)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    rma()
    downpour()
    network()
    scale()
    print("figures in", OUT)
