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


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    rma()
    downpour()
    print("figures in", OUT)
