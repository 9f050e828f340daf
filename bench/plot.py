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


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    rma()
    downpour()
    network()
    print("figures in", OUT)
