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


# A split evaluation: scores as sums, and who scores which test rows ----------------------------
def test_scores_of_pieces_add_up_to_the_whole_sets():
    from dbmpi.evaluation import mean_score, score
    from tests.models import MLP_20

    network = Network.from_string(MLP_20)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((103, network.input_shape[0])).astype(np.float32)
    y = rng.integers(0, network.n_classes, 103).astype(np.int32)
    whole = network.evaluate(x, y, 1000)
    beats = []
    pieces = [score(network, x[a:b], y[a:b], 16, between=lambda: beats.append(1)) for a, b in ((0, 50), (50, 103))]
    assert [p[2] for p in pieces] == [50, 53] and len(beats) == 4 + 4  # a heartbeat after every batch
    loss, accuracy = mean_score(pieces)
    assert loss == pytest.approx(whole[0], rel=1e-6) and accuracy == whole[1]  # float32 batch losses
    assert mean_score([]) == (None, None)


def test_test_shares_cover_every_row_once_and_pass_a_silent_evaluators_rows_on():
    from dbmpi.evaluation import TestShares

    shares = TestShares(10, 3, [0, 1, 2], timeout_s=5.0, now=0.0)
    assert shares.shares == {0: (0, 3), 1: (3, 6), 2: (6, 10)}  # whole pieces of 3 rows
    shares.scored(0, 0, 1.5, 2, 3, now=1.0)
    shares.scored(2, 6, 3.0, 1, 3, now=1.0)
    assert shares.idle == [0] and not shares.over()
    assert shares.check(now=4.0) == []  # nobody silent for 5 s yet
    assert shares.check(now=5.5) == [(0, (3, 6))]  # replica 1 never reported: its rows go to 0
    shares.scored(2, 6, 9.9, 0, 3, now=5.6)  # a second report of a piece does not count
    shares.scored(0, 3, 0.5, 3, 3, now=6.0)
    shares.scored(1, 3, 0.7, 0, 3, now=6.1)  # the lost one speaks after all: counted once
    assert not shares.over() and 2 in shares.shares
    shares.scored(2, 9, 0.5, 1, 1, now=6.2)
    assert shares.over() and shares.result() == ((1.5 + 3.0 + 0.5 + 0.5) / 10, 7 / 10, 10)


def test_test_shares_end_when_no_evaluator_is_left():
    from dbmpi.evaluation import TestShares

    assert TestShares(10, 4, [], 5.0, 0.0).over()
    assert TestShares(10, 4, [], 5.0, 0.0).result() == (None, None, 0)
    shares = TestShares(8, 4, [0, 1], 1.0, 0.0)
    shares.scored(0, 0, 2.0, 4, 4, now=0.5)
    assert shares.check(now=2.0) == [(0, (4, 8))]  # 1 silent: 0 takes its rows
    assert shares.check(now=3.5) == []  # then 0 silent too: nobody left
    assert shares.over() and shares.result() == (0.5, 1.0, 4)  # what was scored, and how many rows
    more = TestShares(3, 1, [0, 1, 2, 3, 4], 1.0, 0.0)
    assert sorted(more.shares.values()) == [(0, 1), (1, 2), (2, 3)] and len(more.idle) == 2
