"""A speech-like task (issue 7, item 4): the paper's speech architecture scaled down,
trained with Downpour SGD and shard-side Adagrad on FSDD spoken-digit MFCC frames with
context windows (configs/speech_fsdd.toml); frame accuracy and per-utterance accuracy.

    python bench/paper/speech.py [--quick] [--replicas R] [--shards S] [--epochs E]

Writes bench/paper/results/speech.json and docs/img/paper/speech.png (speech_quick.* with
--quick): test frame accuracy of replica 0's copy against wall time, with the final frame
and utterance accuracies.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIGURES, ROOT, dbmpi, fresh_run_dir, machine, output_name, pyplot, records, write_result  # noqa: E402

from dbmpi.evaluation import evaluate_checkpoint  # noqa: E402
from dbmpi.io.checkpoint import list_checkpoints  # noqa: E402

CONFIG = ROOT / "configs" / "speech_fsdd.toml"
DATA = ROOT / "data" / "fsdd.h5"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 epochs instead of 10 (in 2 epochs the "
                        "sigmoid network is still on its initial plateau, at chance)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--epochs", type=float)
    args = parser.parse_args()
    epochs = args.epochs or (5 if args.quick else 10)
    if not DATA.exists():
        dbmpi("data", "prepare", "fsdd", "--out", DATA)
    run_dir = fresh_run_dir("speech")
    wall = dbmpi("train", CONFIG, "--run-dir", run_dir, "--set", f"data.path={DATA}",
                 "--set", f"train.n_replicas={args.replicas}", "--set", f"train.n_shards={args.shards}",
                 "--set", f"train.epochs={epochs}", "--set", "train.eval_every=200",
                 ranks=args.replicas + args.shards)
    final = evaluate_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1], DATA)
    evals = [r for r in records(run_dir) if r["kind"] == "eval" and r.get("source") == "replica 0"]
    result = {"experiment": "speech", "config": str(CONFIG.relative_to(ROOT)), "data": "fsdd",
              "replicas": args.replicas, "shards": args.shards, "epochs": epochs, "wall_time_s": round(wall, 2),
              "frame_accuracy": final["accuracy"], "utterance_accuracy": final["group_accuracy"],
              "test_frames": final["examples"], "test_utterances": final["groups"],
              "curve": [{"time_s": r["time"], "step": r["step"], "frame_accuracy": r["test_accuracy"]} for r in evals],
              "run_dir": str(run_dir.relative_to(ROOT)), "machine": machine()}
    write_result(output_name("speech", args.quick), result)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([c["time_s"] for c in result["curve"]], [c["frame_accuracy"] for c in result["curve"]], ".-",
            label=f"frames (replica 0's copy), Downpour+Adagrad R={args.replicas} S={args.shards}")
    ax.axhline(final["accuracy"], color="C0", ls=":", label=f"final frame accuracy {final['accuracy']:.3f}")
    ax.axhline(final["group_accuracy"], color="C3", ls="--",
               label=f"final utterance accuracy {final['group_accuracy']:.3f}")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("test accuracy")
    ax.set_title("FSDD spoken digits, 11 x 13 MFCC frames")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(FIGURES / f"{output_name('speech', args.quick)}.png", dpi=110)


if __name__ == "__main__":
    main()
