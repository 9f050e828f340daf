"""Scoring checkpoints: per-row and per-group (utterance) accuracy."""
import json
import subprocess
import sys

import numpy as np
import pytest

from dbmpi.data import write_dataset
from dbmpi.evaluation import evaluate_checkpoint, group_accuracy, log_probabilities
from dbmpi.io.checkpoint import CheckpointWriter
from dbmpi.model import Network
from tests.models import DENSE_3x4


def test_a_group_votes_with_its_mean_log_probability():
    # Group 0: two rows weakly for class 1, one row strongly for class 0 -> class 0 wins.
    lp = np.log(np.array([[0.40, 0.60, 1e-9], [0.40, 0.60, 1e-9], [0.99, 0.01 - 1e-9, 1e-9],
                          [0.1, 0.1, 0.8]]))
    labels = np.array([0, 0, 0, 1])
    accuracy, n = group_accuracy(lp, labels, np.array([5, 5, 5, 9]))
    assert n == 2 and accuracy == 0.5
    with pytest.raises(ValueError, match="different labels"):
        group_accuracy(lp, np.array([0, 1, 0, 1]), np.array([5, 5, 5, 9]))


def test_log_probabilities_normalise():
    z = np.array([[1000.0, 0.0, -3.0], [0.5, 0.5, 0.5]], np.float32)
    lp = log_probabilities(z, "softmax")
    np.testing.assert_allclose(np.exp(lp).sum(axis=1), 1.0)
    np.testing.assert_allclose(log_probabilities(z, "logistic"), np.log(1 / (1 + np.exp(-z.astype(float)))), atol=1e-12)


def test_evaluate_a_checkpoint_per_row_and_per_group(tmp_path):
    rng = np.random.default_rng(0)
    network = Network.from_string(DENSE_3x4)
    network.params[:] = rng.standard_normal(network.n_params).astype(np.float32)
    groups = np.repeat(np.arange(40), 5).astype(np.int32)
    y = np.repeat(rng.integers(0, 3, 40), 5).astype(np.int32)
    x = rng.standard_normal((200, 3, 4, 1)).astype(np.float32)
    data = write_dataset(tmp_path / "d.h5", x, y, x, y, attrs={"source": "test", "n_classes": 3},
                         groups={"train": groups, "test": groups})
    ckpt = tmp_path / "c.h5"
    with CheckpointWriter(ckpt, network.tensors, algorithm="downpour", step=7,
                          config_text=DENSE_3x4 + f'[data]\npath = "{data}"\n', layout={}) as w:
        w.write_vector("params", [(0, network.params)])
        w.commit()
    result = evaluate_checkpoint(ckpt)
    loss, accuracy = network.evaluate(x, y)
    assert result["accuracy"] == accuracy and abs(result["loss"] - loss) < 1e-9
    lp = log_probabilities(network.forward(x), "softmax")
    votes = lp.reshape(40, 5, 3).mean(axis=1).argmax(axis=1)
    assert result["groups"] == 40 and result["group_accuracy"] == np.mean(votes == y[::5])
    out = subprocess.run([sys.executable, "-m", "dbmpi", "evaluate", str(ckpt), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["group_accuracy"] == result["group_accuracy"]
    wrong = write_dataset(tmp_path / "w.h5", x[:, :2], y, x[:, :2], y, attrs={"source": "t", "n_classes": 3})
    out = subprocess.run([sys.executable, "-m", "dbmpi", "evaluate", str(ckpt), "--data", str(wrong)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("dbmpi: error:") == 1 and "input_shape" in out.stderr
