"""Train a model of your own with Downpour from a Python script instead of `dbmpi train`:
the config is a dict (validated like a TOML file), the run is dbmpi.algorithms.downpour.run
on every rank, as the CLI calls it. 2 replicas and 2 parameter-server shards, 4 ranks:

    mpiexec -n 4 python -m mpi4py examples/train_from_script.py --run-dir runs/script

The model is examples/numpy_softmax.py's (a dbmpi.model.FlatModel subclass in numpy). Every
rank builds it from the `python` spec, so name it by a file path or an importable module,
never by an object made here. Shard 0 (rank 0) gets the summary and prints it; the run
directory holds the usual summary.json, metrics and checkpoints (docs/API.md).
"""
import argparse
import sys
from pathlib import Path

from dbmpi import config as configuration

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def make_config(data_path: Path, epochs: int, hidden: int) -> dict:
    """The run's config as a dict: the tables and keys of a TOML config (docs/CONFIG.md).
    validate() fills in the defaults and raises ConfigError naming a bad key. Paths are
    used as given (a TOML file's are relative to the file), so make them absolute."""
    raw = {
        "model": {
            "name": "numpy-mlp-script",
            "input_shape": [8, 8, 1],
            "python": f"{HERE / 'numpy_softmax.py'}:make_model",
            "args": {"hidden": hidden, "seed": 0},
        },
        "data": {"path": str(data_path.resolve()), "source": "digits"},  # prepared if missing
        "train": {
            "algorithm": "downpour", "n_replicas": 2, "n_shards": 2, "n_fetch": 1, "n_push": 1,
            "warmstart_steps": 50, "optimizer": "adagrad", "learning_rate": 0.05,
            "batch_size": 32, "epochs": epochs, "log_every": 100,
        },
    }
    return configuration.validate(raw)


def train(cfg: dict, run_dir: Path) -> dict | None:
    """Downpour on every rank of MPI_COMM_WORLD; the summary on shard 0, None elsewhere."""
    from mpi4py import MPI

    from dbmpi.algorithms import downpour
    from dbmpi.runtime.comm import require_thread_support

    require_thread_support()  # the same verdict on every rank, before any collective
    cfg["train"]["run_dir"] = str(run_dir)  # every rank must be given the same directory
    return downpour.run(cfg, run_dir, MPI.COMM_WORLD, say=lambda msg: print(msg, flush=True))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="the run directory (a new one)")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "digits.h5",
                        help="the digits HDF5 file (made on first use)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=32, help="hidden units (0: softmax regression)")
    args = parser.parse_args(argv)

    from dbmpi.algorithms.run import AGREED_ERRORS

    try:
        summary = train(make_config(args.data, args.epochs, args.hidden), args.run_dir)
    except AGREED_ERRORS as exc:  # raised alike on every rank: one line each, exit 2 as the CLI
        print(f"train_from_script: {exc}", file=sys.stderr)
        return 2
    if summary is not None:
        print(f"final test accuracy {summary['test_accuracy']:.4f} ({summary['wall_time_s']:.1f} s); "
              f"summary in {args.run_dir / 'summary.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
