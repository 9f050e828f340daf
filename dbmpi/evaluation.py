"""Scoring a checkpoint on a data set: loss and accuracy per row, and, when the data set
groups its rows (the frames of one utterance), accuracy per group: the group's class is
the one with the highest mean log-probability over its rows. Also the pieces of an
evaluation split across ranks: `score` (a model on some rows, as sums, in batches with a
heartbeat between) and `TestShares` (who scores which rows of the test set). MPI-free."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from dbmpi import config as configuration
from dbmpi.data import DatasetError, check_fits, open_dataset
from dbmpi.io.checkpoint import open_checkpoint
from dbmpi.model.loader import build_model


def log_probabilities(logits: np.ndarray, output: str) -> np.ndarray:
    """Per-class log-probabilities (float64) of a batch of logits: log-softmax for a softmax
    output, log-sigmoid (one-vs-all) for a logistic one."""
    z = logits.astype(np.float64)
    if output == "softmax":
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -np.logaddexp(0.0, -z)


def group_accuracy(log_probs: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> tuple[float, int]:
    """(accuracy, number of groups): each group votes with its rows' mean log-probabilities;
    every row of a group must carry the group's label."""
    ids, index = np.unique(groups, return_inverse=True)
    sums = np.zeros((ids.size, log_probs.shape[1]))
    np.add.at(sums, index, log_probs)
    truth = np.full(ids.size, -1)
    truth[index] = labels
    if not np.array_equal(truth[index], labels):
        raise ValueError("the rows of a group have different labels")
    return float(np.mean(sums.argmax(axis=1) == truth)), int(ids.size)


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path | None = None, split: str = "test",
                        batch_size: int = 1000) -> dict:
    """Loss and accuracy of a checkpoint's parameters on `split` of `data` (default: the data
    set its config names); adds per-group accuracy when the data set has groups."""
    with open_checkpoint(checkpoint) as ckpt:
        raw = configuration.parse_toml(ckpt.config_text, str(checkpoint))
        raw.pop("train", None)  # only the model and the data matter here
        cfg = configuration.validate(raw, require_train=False)
        network = build_model(cfg["model"])
        ckpt.check_network(network)
        network.params[:] = ckpt.read_range("params", 0, network.n_params)
        step, algorithm = ckpt.step, ckpt.algorithm
    if data is None and not Path(cfg.get("data", {}).get("path") or "").is_file():
        raise DatasetError(f"{checkpoint}: the data set its config names "
                           f"({cfg.get('data', {}).get('path', 'none')}) is not there; give one with --data FILE")
    data = Path(data or cfg["data"]["path"])
    with open_dataset(data) as dataset:
        check_fits(dataset, network, data)
        x, y = dataset.load(split)
        groups = dataset.groups(split)
    log_probs = np.empty((len(x), network.n_classes))
    output = network.output_kind
    for start in range(0, len(x), batch_size):
        log_probs[start:start + batch_size] = log_probabilities(network.forward(x[start:start + batch_size]), output)
    loss, accuracy = network.evaluate(x, y, batch_size)
    result = {"checkpoint": str(checkpoint), "algorithm": algorithm, "step": step, "data": str(data),
              "split": split, "examples": int(len(x)), "loss": loss, "accuracy": accuracy}
    if groups is not None:
        result["group_accuracy"], result["groups"] = group_accuracy(log_probs, y, groups)
    return result


def score(model, x: np.ndarray, y: np.ndarray, batch_size: int,
          between: Callable[[], None] = lambda: None) -> tuple[float, int, int]:
    """(loss sum, correct, rows) of `model` on (x, y): sums, so the scores of several ranks'
    rows add up to the whole set's. A batch at a time, `between()` after each (a heartbeat:
    no evaluation outlasts the failure detector's timeout, whatever the test set's size)."""
    total, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        n = len(x[start:start + batch_size])
        loss, accuracy = model.evaluate(x[start:start + batch_size], y[start:start + batch_size], batch_size)
        total += float(loss) * n
        correct += round(accuracy * n)
        between()
    return total, correct, len(x)


def mean_score(scores: Iterable[tuple[float, int, int]]) -> tuple[float | None, float | None]:
    """(mean loss, accuracy) from (loss sum, correct, rows) triples; (None, None) without rows."""
    total = correct = rows = 0
    for loss, right, n in scores:
        total, correct, rows = total + loss, correct + right, rows + n
    return (total / rows, correct / rows) if rows else (None, None)


class TestShares:
    """Who scores which rows of the test set in a split final evaluation (the lead's side).

    Rows [0, n) are cut into pieces of `piece` rows; each evaluator first gets a contiguous
    share of whole pieces and reports each piece's (loss sum, correct) as it goes. An
    evaluator silent for more than `timeout_s` is lost: its unscored pieces go, as one
    share, to the next evaluator that finished its own. A piece counts once, whoever scores
    it (a late report of a lost evaluator included)."""

    __test__ = False  # not a pytest class

    def __init__(self, n: int, piece: int, evaluators: list[int], timeout_s: float, now: float):
        self.n, self.piece, self.timeout_s = n, max(1, piece), timeout_s
        starts = list(range(0, n, self.piece))
        m = len(evaluators)
        cuts = [starts[len(starts) * i // m] if starts else n for i in range(m)] + [n]
        self.shares = {e: (cuts[i], cuts[i + 1]) for i, e in enumerate(evaluators) if cuts[i] < cuts[i + 1]}
        self.scores: dict[int, tuple[float, int, int]] = {}  # piece start -> (loss sum, correct, rows)
        self.heard = dict.fromkeys(self.shares, now)
        self.idle = [e for e in evaluators if e not in self.shares]  # nothing to do: ask for more
        self.pending: list[tuple[int, int]] = []  # shares of lost evaluators, not handed out again yet
        self.lost: set[int] = set()

    def scored(self, evaluator: int, start: int, loss: float, correct: int, rows: int, now: float) -> None:
        """A piece's report (the first one for that piece counts)."""
        self.scores.setdefault(start, (loss, correct, rows))
        if evaluator in self.lost:
            return
        self.heard[evaluator] = now
        share = self.shares.get(evaluator)
        if share is not None and all(s in self.scores for s in range(share[0], share[1], self.piece)):
            del self.shares[evaluator]
            self.idle.append(evaluator)

    def check(self, now: float) -> list[tuple[int, tuple[int, int]]]:
        """Declare silent evaluators lost; returns the (evaluator, share) hand-outs to send now."""
        for e, share in list(self.shares.items()):
            if now - self.heard[e] > self.timeout_s:
                self.lost.add(e)
                del self.shares[e]
                start = share[0]
                while start in self.scores:  # what it reported counts
                    start += self.piece
                if start < share[1]:
                    self.pending.append((start, share[1]))
        handed = []
        while self.pending and self.idle:
            e = self.idle.pop(0)
            share = self.pending.pop(0)
            self.shares[e], self.heard[e] = share, now
            handed.append((e, share))
        return handed

    def over(self) -> bool:
        """Every piece scored, or nobody left to score the rest."""
        return self.rows() == self.n or not self.shares and not (self.pending and self.idle)

    def rows(self) -> int:
        return sum(s[2] for s in self.scores.values())

    def result(self) -> tuple[float | None, float | None, int]:
        """(mean loss, accuracy, rows scored)."""
        return (*mean_score(self.scores.values()), self.rows())


__all__ = ["TestShares", "evaluate_checkpoint", "group_accuracy", "log_probabilities", "mean_score", "score"]
