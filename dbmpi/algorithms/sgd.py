"""Conventional single-replica SGD: the paper's baseline, one process, no parameter server.

Plain SGD (its update fused into the backward GEMMs), momentum or Adagrad over the whole
canonical parameter vector. Reads the whole training split into memory, shuffles it each
epoch with a seeded generator, logs metrics as JSON lines and evaluates on the test split.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from dbmpi import data as datasets
from dbmpi.algorithms.divergence import DivergenceWatch, emit
from dbmpi.algorithms.minibatches import Budget, Minibatches
from dbmpi.algorithms.optimizers import make_optimizer
from dbmpi.config import ConfigError, eval_interval
from dbmpi.data import check_fits
from dbmpi.io.rundir import RunDirectory, peak_rss_bytes
from dbmpi.model import Model
from dbmpi.model.loader import build_model


class DivergedError(RuntimeError):
    """Training diverged: a non-finite loss (any algorithm), too many non-finite pushes
    (Downpour), a non-finite objective (Sandblaster) or test loss. The command line says
    `dbmpi: error: training diverged: ...` on every rank and exits EXIT_DIVERGED."""


EXIT_DIVERGED = 3


def open_training_data(data_cfg: dict, network: Model) -> datasets.Dataset:
    """Open the config's dataset (preparing a built-in source on demand) and check it fits."""
    path = data_cfg["path"]
    if data_cfg.get("source") and not Path(path).exists():
        options = {"source_dir": data_cfg["source_dir"]} if data_cfg.get("source_dir") else {}
        if data_cfg["source"] == "synthetic":  # shaped for this model, default size and seed
            options = {"input_shape": list(network.input_shape), "n_classes": network.n_classes}
        datasets.prepare(data_cfg["source"], path, **options)
    dataset = datasets.open_dataset(path)
    try:
        check_fits(dataset, network, path)
        _check_not_empty(dataset, path)
        dataset.check_values()  # NaN rows or bad labels: refused now, not found by a worker later
    except (ConfigError, datasets.DatasetError):
        dataset.close()
        raise
    return dataset


def _check_not_empty(dataset, path) -> None:
    """Training steps through /train and ends evaluating on /test: neither may be empty
    (found now, not as a ZeroDivisionError at the start or an error after training)."""
    for split, rows in (("train", dataset.n_train), ("test", dataset.n_test)):
        if rows == 0:
            raise datasets.DatasetError(f"{path}: /{split} holds no examples; training needs "
                                        "examples in both /train and /test")


def initial_parameters(cfg: dict, path) -> np.ndarray:
    """The parameters of checkpoint `path`, checked (checksums, tensors) against the config's model."""
    from dbmpi.io.checkpoint import open_checkpoint

    network = build_model(cfg["model"], threads=cfg["train"]["threads"])
    with open_checkpoint(path) as ckpt:
        ckpt.check_network(network)
        return ckpt.read_range("params", 0, network.n_params)


def prepare(cfg: dict, init=None) -> tuple:
    """Everything a run needs, checked before its run directory exists (no half-made run on
    bad input): the network (with the parameters of checkpoint `init` if given) and the
    train and test splits in memory. Returns the `prepared` argument of train()."""
    network = build_model(cfg["model"], threads=cfg["train"]["threads"])
    if init is not None:
        network.params[:] = initial_parameters(cfg, init)
    with open_training_data(cfg["data"], network) as dataset:
        return network, dataset.load("train"), dataset.load("test")


def train(cfg: dict, run: RunDirectory, say: Callable[[str], None] = print, prepared: tuple | None = None) -> dict:
    """Train with [train] algorithm = "sgd" on what prepare(cfg) returned (called here if not
    given); returns the summary also written to summary.json."""
    network, (train_x, train_y), (test_x, test_y) = prepared or prepare(cfg)
    with threadpool_limits(limits=cfg["train"]["threads"], user_api="blas"):
        return _loop(cfg["train"], network, train_x, train_y, test_x, test_y, run, say)


def _loop(tcfg, network, train_x, train_y, test_x, test_y, run, say):
    n = len(train_x)
    batch = min(tcfg["batch_size"], n)
    # The budget: steps or epochs, and/or train.time_budget_s (seconds of training).
    budget = Budget.of(tcfg, n, batch)
    steps_per_epoch = budget.steps_per_epoch
    total = budget.steps if budget.limited else None
    eval_every = eval_interval(tcfg, steps_per_epoch)
    # The update fused into the backward GEMMs: built-in networks (a model without sgd_step
    # takes the optimizer's separate step).
    fused = tcfg["optimizer"] == "sgd" and tcfg["fused_update"] and hasattr(network, "sgd_step")
    optimizer = None if fused else make_optimizer(tcfg, network.n_params)
    lr = tcfg["learning_rate"]
    watch = DivergenceWatch(tcfg["optimizer"], lr)

    say(network.summary())
    planned = (f"{total} steps ({total / steps_per_epoch:.2f} epochs)" if total is not None else "no step limit")
    if budget.seconds:
        planned += f", at most {budget.seconds:g} s"
    say(f"training: {n} examples, batch {batch}, {planned}, optimizer {tcfg['optimizer']}, lr {lr}")
    of = f"/{total}" if total is not None else ""
    started = window_start = time.perf_counter()
    budget.start(started)
    window_loss, window_steps = 0.0, 0
    test_loss = test_acc = float("nan")
    step = 0
    with Minibatches(train_x, train_y, batch, tcfg["seed"]) as batches:
        while step < budget.steps:
            step += 1
            xb, yb = batches.next()
            if fused:
                loss = network.sgd_step(xb, yb, lr)
            else:
                loss = network.loss_and_grad(xb, yb)
                optimizer.step(network.params, network.grad)
            if not math.isfinite(loss):
                failure = f"step {step}: loss is {loss}; lower train.learning_rate"
                run.write_json("summary.json", {"algorithm": "sgd", "optimizer": tcfg["optimizer"], "steps": step,
                                                "status": "diverged", "failure": failure})
                raise DivergedError(failure)
            window_loss += loss
            window_steps += 1
            last = step == budget.steps or budget.out_of_time()
            if step % tcfg["log_every"] == 0 or last:
                now = time.perf_counter()
                rate = window_steps * batch / max(now - window_start, 1e-9)
                record = {"kind": "train", "step": step, "epoch": round(step / steps_per_epoch, 4),
                          "loss": window_loss / window_steps, "samples_per_s": round(rate, 1)}
                run.log(record)
                say(f"step {step:>7}{of}  epoch {record['epoch']:7.2f}  loss {record['loss']:.4f}  "
                    f"{rate:9.0f} samples/s")
                window_start, window_loss, window_steps = now, 0.0, 0
            if step % eval_every == 0 or last:
                test_loss, test_acc = network.evaluate(test_x, test_y, tcfg["eval_batch_size"])
                run.log({"kind": "eval", "step": step, "epoch": round(step / steps_per_epoch, 4),
                         "time_s": round(time.perf_counter() - started, 4),
                         "test_loss": test_loss, "test_accuracy": test_acc})
                say(f"step {step:>7}{of}  test loss {test_loss:.4f}  test accuracy {test_acc:.4f}")
                if warning := watch.observe(step, test_loss):
                    emit(warning, run.log)
            if last:
                break
    elapsed = time.perf_counter() - started
    summary = {"algorithm": "sgd", "optimizer": tcfg["optimizer"], "steps": step,
               "epochs": round(step / steps_per_epoch, 4), "batch_size": batch,
               "wall_time_s": round(elapsed, 3), "samples_per_s": round(step * batch / elapsed, 1),
               "test_loss": test_loss, "test_accuracy": test_acc, "n_params": network.n_params,
               "status": "finished", "failure": None, "peak_rss_bytes": peak_rss_bytes()}
    run.write_json("summary.json", summary)
    return summary
