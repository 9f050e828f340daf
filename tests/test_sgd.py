"""The single-replica SGD baseline, end to end through the `dbmpi` command."""
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from dbmpi.io.rundir import read_metrics
from tests.conftest import require_fashion
from tests.test_cli import error_line
from tests.test_data import _retype

ROOT = Path(__file__).resolve().parents[1]


def dbmpi(*args, cwd, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "dbmpi", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("momentum", 0.05), ("adagrad", 0.05)])
def test_digits_trains_with_each_optimizer(tmp_path, optimizer, lr):
    run_dir = tmp_path / "run"
    result = dbmpi("train", ROOT / "configs/mlp_digits.toml", "--run-dir", run_dir,
                   "--set", f"train.optimizer={optimizer}", "--set", f"train.learning_rate={lr}",
                   "--set", "train.epochs=15", "--set", f"data.path={tmp_path / 'digits.h5'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["optimizer"] == optimizer
    assert summary["test_accuracy"] >= 0.93, summary
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert train[-1]["step"] == summary["steps"] and evals[-1]["step"] == summary["steps"]
    assert train[-1]["loss"] < train[0]["loss"] / 3
    assert "warning" not in result.stderr and not [r for r in records if r["kind"] == "warning"]
    assert all(r["samples_per_s"] > 0 and r["time"] >= 0 for r in train)
    # The resolved config is a complete config that trains again as it is.
    from dbmpi import config

    resolved = config.load(run_dir / "config.toml")
    assert resolved["train"]["optimizer"] == optimizer and resolved["train"]["batch_size"] == 32
    assert "final test accuracy" in result.stdout


def test_same_seed_same_run(tmp_path):
    """Runs are reproducible: same config and seed, same losses."""
    losses = []
    for name in ("a", "b"):
        result = dbmpi("train", ROOT / "configs/mlp_digits.toml", "--run-dir", tmp_path / name, "--quiet",
                       "--set", "train.steps=60", "--set", "train.log_every=20",
                       "--set", f"data.path={tmp_path / 'digits.h5'}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout == ""
        losses.append([r["loss"] for r in read_metrics(tmp_path / name) if r["kind"] == "train"])
    assert losses[0] == losses[1] and len(losses[0]) == 3


@pytest.mark.slow
def test_fashion_mnist_mlp_reaches_85_percent(tmp_path):
    """The issue's bar: 784-512-512-10 MLP, single process, >= 85% test accuracy."""
    require_fashion()
    run_dir = tmp_path / "run"
    result = dbmpi("train", ROOT / "configs/mlp_fashion.toml", "--run-dir", run_dir, "--threads", "2",
                   "--set", "train.epochs=5", "--set", f"data.path={tmp_path / 'fashion.h5'}",
                   cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.85, summary
    assert summary["n_params"] == 784 * 512 + 512 + 512 * 512 + 512 + 5130


def test_divergence_is_reported(tmp_path):
    result = dbmpi("train", ROOT / "configs/mlp_digits.toml", "--run-dir", tmp_path / "run",
                   "--set", "train.optimizer=sgd", "--set", "train.learning_rate=1e30",
                   "--set", f"data.path={tmp_path / 'digits.h5'}", cwd=tmp_path)
    assert result.returncode == 3  # EXIT_DIVERGED, as for Downpour and Sandblaster
    assert "dbmpi: error: training diverged" in result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["failure"] in result.stderr


def test_a_too_high_learning_rate_warns_once_and_the_run_goes_on(tmp_path):
    """Momentum at 0.3 on digits: the test loss reaches 0.48 by epoch 7, then climbs past
    1.2 (tests/test_divergence.py, CLIMBING): one warning line, one record, exit 0."""
    run_dir = tmp_path / "run"
    result = dbmpi("train", ROOT / "configs/mlp_digits.toml", "--run-dir", run_dir,
                   "--set", "train.learning_rate=0.3", "--set", "train.epochs=30",
                   "--set", f"data.path={tmp_path / 'digits.h5'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("dbmpi: warning:")]
    assert len(lines) == 1 and result.stderr.count("dbmpi: warning") == 1, result.stderr
    assert "optimizer momentum, learning rate 0.3" in lines[0] and "docs/CONFIG.md" in lines[0]
    warnings = [r for r in read_metrics(run_dir) if r["kind"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["message"] in lines[0]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_locally_connected_image_model_learns_fashion_mnist(tmp_path):
    """The paper's image recipe (local, L2 pool, LCN, twice) trains through every spatial kernel."""
    require_fashion()
    run_dir = tmp_path / "run"
    result = dbmpi("train", ROOT / "configs/image_local.toml", "--run-dir", run_dir, "--threads", "2",
                   "--set", "train.steps=400", "--set", f"data.path={tmp_path / 'fashion.h5'}",
                   cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.78, summary


def test_time_budget_stops_the_baseline(tmp_path):
    """train.time_budget_s bounds the baseline's training time (here before its epochs end)."""
    run_dir = tmp_path / "run"
    result = dbmpi("train", ROOT / "configs/mlp_digits.toml", "--run-dir", run_dir, "--quiet",
                   "--set", f"data.path={tmp_path / 'digits.h5'}", "--set", "train.epochs=10000",
                   "--set", "train.time_budget_s=1.5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 1.5 <= summary["wall_time_s"] < 10 and 10 < summary["steps"] < 10000 * 45, summary
    evals = [r for r in read_metrics(run_dir) if r["kind"] == "eval"]
    assert evals[-1]["step"] == summary["steps"] and summary["test_accuracy"] > 0.5


def test_init_from_a_downpour_checkpoint_starts_from_its_parameters(tmp_path):
    """--init CKPT: the baseline starts where a Downpour run stopped (a shared warm start);
    a corrupt checkpoint is refused with one line before any run directory exists."""
    import numpy as np

    from dbmpi import config as configuration
    from dbmpi.data import open_dataset
    from dbmpi.io.checkpoint import list_checkpoints, open_checkpoint
    from dbmpi.model import Network
    from tests.test_downpour import launch

    data = f"data.path={tmp_path / 'digits.h5'}"
    result, _ = launch(4, "train", ROOT / "configs/downpour_digits.toml", "--run-dir", tmp_path / "dp",
                       "--set", data, "--set", "train.steps=150", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = list_checkpoints(tmp_path / "dp" / "checkpoints")[-1]
    config = ROOT / "configs/mlp_digits.toml"  # the same network, single process
    cfg = configuration.load(config, [data])
    network = Network(cfg["model"])
    with open_checkpoint(ckpt) as c:
        network.params[:] = c.read_range("params", 0, network.n_params)
    with open_dataset(tmp_path / "digits.h5") as d:
        _, expected = network.evaluate(*d.load("test"))
    # One step with a vanishing learning rate evaluates the checkpoint's parameters.
    result = dbmpi("train", config, "--run-dir", tmp_path / "sgd", "--init", ckpt, "--set", data,
                   "--set", "train.steps=1", "--set", "train.learning_rate=1e-20", "--set", "train.optimizer=sgd",
                   cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = read_metrics(tmp_path / "sgd")
    assert records[0]["kind"] == "init" and records[0]["checkpoint"] == str(ckpt)
    evals = [r for r in records if r["kind"] == "eval"]
    assert abs(evals[-1]["test_accuracy"] - expected) < 1e-9 and expected > 0.5
    assert np.isfinite(evals[-1]["time_s"])

    broken = tmp_path / "broken.h5"
    broken.write_bytes(ckpt.read_bytes()[:4000])
    result = dbmpi("train", config, "--run-dir", tmp_path / "bad", "--init", broken, "--set", data, cwd=tmp_path)
    assert result.returncode == 2 and not (tmp_path / "bad").exists()
    assert result.stderr.count("dbmpi: error:") == 1 and "broken.h5" in result.stderr



def _data(mutate=lambda f: None, shape=(8, 8, 1)):
    """Writes a small data set (10 classes, digits' shape unless told), then `mutate(h5py.File)`."""
    def make(path):
        from tests.test_data import small_dataset

        small_dataset(path, n_train=40, n_test=20, n_classes=10, shape=shape)
        with h5py.File(path, "a") as f:
            mutate(f)
    return make


def _emptied(split):
    def mutate(f):
        for name, shape, dtype in (("x", (0, 8, 8, 1), np.float32), ("y", (0,), np.int32)):
            del f[f"{split}/{name}"]
            f.create_dataset(f"{split}/{name}", shape=shape, dtype=dtype)
        f.attrs[f"n_{split}"] = 0
    return mutate


def _classes(n):
    def mutate(f):
        f.attrs["n_classes"] = n
        del f.attrs["class_names"]
    return mutate


def _truncated(path):
    _data()(path)
    path.write_bytes(path.read_bytes()[:3000])


LOCAL_9x9 = 'seed = 0\n[[model.layers]]\ntype = "local"\nfilters = 2\nkernel = 9\nactivation = "relu"\n'
BAD_INPUT = {  # case -> (writes the data file, or None: the good file; a config edit; part of the message)
    "missing file": (lambda path: None, None, "data set file not found"),
    "empty file": (lambda path: path.write_bytes(b""), None, "not an HDF5 file"),
    "truncated file": (_truncated, None, "d.h5"),
    "x as float64": (_data(_retype("/train/x", np.float64)), None, "/train/x has dtype float64"),
    "label out of range": (_data(lambda f: f["/test/y"].__setitem__(0, 12)), None, "labels outside [0, 10)"),
    "other input shape": (_data(shape=(3, 3, 1)), None, "model.input_shape: [8, 8, 1] does not match"),
    "more classes than outputs": (_data(_classes(12)), None, "10 outputs but"),
    "10**10 classes, no names": (_data(_classes(10**10)), None, "10000000000 classes"),
    "empty train split": (_data(_emptied("train")), None, "/train holds no examples"),
    "empty test split": (_data(_emptied("test")), None, "/test holds no examples"),
    "kernel larger than input": (None, ("seed = 0\n", LOCAL_9x9), "9 is larger than the input 8 x 8"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_leaves_no_run_directory_and_the_corrected_rerun_works(tmp_path, case):
    """Every input is checked before the run directory exists: one line, exit 2, nothing
    written, and the same --run-dir then takes the corrected run."""
    write_data, edit, message = BAD_INPUT[case]
    good = tmp_path / "good.h5"
    _data()(good)
    bad = tmp_path / "d.h5"
    if write_data is not None:
        write_data(bad)
    text = (ROOT / "configs/mlp_digits.toml").read_text().replace('source = "digits"', "")
    config = tmp_path / "c.toml"
    config.write_text(text.replace(*edit) if edit else text)
    run_dir = tmp_path / "run"
    args = ("train", config, "--run-dir", run_dir, "--quiet", "--set", "train.steps=3")
    result = dbmpi(*args, "--set", f"data.path={bad if write_data else good}", cwd=tmp_path)
    assert message in error_line(result)
    assert not run_dir.exists()
    config.write_text(text)
    result = dbmpi(*args, "--set", f"data.path={good}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
