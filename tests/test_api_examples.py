"""docs/API.md's complete examples run for real: the numpy model of examples/numpy_softmax.py
(its gradient against finite differences, MPI-free), then trained by Downpour on the digits
from the CLI (configs/downpour_digits_numpy.toml) and from a script
(examples/train_from_script.py), each 4 ranks under mpiexec and a timeout."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.test_downpour import ROOT, launch, mpiexec

CONFIG = ROOT / "configs/downpour_digits_numpy.toml"
# Both runs reach 0.94-0.95 test accuracy on the digits (359 test examples); softmax
# regression alone (hidden = 0) about 0.92, a model that does not learn 0.1.
MIN_ACCURACY = 0.9


def numpy_example():
    spec = importlib.util.spec_from_file_location("numpy_softmax_example", ROOT / "examples/numpy_softmax.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("hidden", [0, 6])
def test_numpy_model_gradient_matches_finite_differences(rng, hidden):
    model = numpy_example().make_model(input_shape=(3, 3, 2), classes=4, hidden=hidden, seed=5).allocate()
    x = rng.standard_normal((7, 3, 3, 2)).astype(np.float32)
    labels = rng.integers(0, 4, 7)
    model.grad[:] = np.nan  # overwritten, never added to
    loss = model.loss_and_grad(x, labels)
    assert np.isclose(loss, model.loss(x, labels), rtol=1e-5)
    analytic, start = model.grad.copy(), model.params.copy()
    numeric = np.full_like(analytic, np.nan, dtype=np.float64)
    eps = 1e-2  # float32 model: a large step, its error is O(eps^2) for a smooth loss
    active = [out > 0 for out in model._activations(x)[1:-1]]  # the hidden ReLUs' pattern

    def loss_at(value):
        """The loss with parameter i at `value`, or None if a hidden ReLU switched (a kink
        inside the step: the difference quotient is not the derivative there)."""
        model.params[i] = value
        same = all(np.array_equal(out > 0, a) for out, a in zip(model._activations(x)[1:-1], active, strict=True))
        return model.loss(x, labels) if same else None

    for i in range(model.n_params):
        plus, minus = loss_at(start[i] + eps), loss_at(start[i] - eps)
        model.params[i] = start[i]
        if plus is not None and minus is not None:
            numeric[i] = (plus - minus) / (2 * eps)
    checked = ~np.isnan(numeric)
    assert checked.mean() > 0.5, checked.mean()  # most parameters: a step crosses few kinks
    assert np.abs(analytic - numeric)[checked].max() < 2e-3 * max(1.0, np.abs(numeric[checked]).max())


def test_numpy_model_initial_values_depend_on_the_seed_alone():
    make = numpy_example().make_model
    a, b = make(hidden=8, seed=1).allocate(), make(hidden=8, seed=1).allocate()
    assert np.array_equal(a.params, b.params) and a.params.any()
    assert np.array_equal(a.initial_values(100, 600), a.params[100:600])
    unallocated = make(hidden=8, seed=1)  # as a parameter-server shard asks: no allocate() first
    assert np.array_equal(unallocated.initial_values(0, unallocated.n_params), a.params)
    assert not np.array_equal(make(hidden=8, seed=2).allocate().params, a.params)


def check_summary(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_accuracy"] >= MIN_ACCURACY, summary
    assert summary["layout"]["world_size"] == 4 and summary["layout"]["n_shards"] == 2
    assert all(u > 0 for u in summary["updates_by_shard"]) and summary["pushes_rejected"] == 0
    return summary


def test_cli_trains_the_numpy_model_with_downpour(tmp_path):
    run_dir = tmp_path / "run"
    result, _ = launch(4, "train", CONFIG, "--run-dir", run_dir, "--set", f"data.path={tmp_path / 'digits.h5'}",
                       cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    check_summary(run_dir)
    assert "numpy_softmax.py:make_model" in (run_dir / "config.toml").read_text()


def test_script_trains_the_numpy_model_with_downpour(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [mpiexec(), "-n", "4", sys.executable, "-m", "mpi4py", str(ROOT / "examples/train_from_script.py"),
           "--run-dir", str(run_dir), "--data", str(tmp_path / "digits.h5")]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = check_summary(run_dir)
    assert f"final test accuracy {summary['test_accuracy']:.4f}" in result.stdout
