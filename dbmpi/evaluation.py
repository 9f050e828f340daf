"""Scoring a checkpoint on a data set: loss and accuracy per row, and, when the data set
groups its rows (the frames of one utterance), accuracy per group: the group's class is
the one with the highest mean log-probability over its rows. MPI-free."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dbmpi import config as configuration
from dbmpi.data import DatasetError, check_fits, open_dataset
from dbmpi.io.checkpoint import open_checkpoint
from dbmpi.model import Network


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
        network = Network(cfg["model"])
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
    output = network.layers[-1].kind
    for start in range(0, len(x), batch_size):
        log_probs[start:start + batch_size] = log_probabilities(network.forward(x[start:start + batch_size]), output)
    loss, accuracy = network.evaluate(x, y, batch_size)
    result = {"checkpoint": str(checkpoint), "algorithm": algorithm, "step": step, "data": str(data),
              "split": split, "examples": int(len(x)), "loss": loss, "accuracy": accuracy}
    if groups is not None:
        result["group_accuracy"], result["groups"] = group_accuracy(log_probs, y, groups)
    return result


__all__ = ["evaluate_checkpoint", "group_accuracy", "log_probabilities"]
