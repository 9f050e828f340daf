"""The divergence warning's rule (dbmpi.algorithms.divergence), on made-up sequences and on
real test-loss curves recorded from dbmpi runs on the digits and Fashion-MNIST data sets
(each evaluation's test_loss, rounded to 3 digits; one per epoch unless said). MPI-free."""
import math

import pytest

from dbmpi.algorithms.divergence import DivergenceWatch, emit

# SGD, lr 1: jumps to 4-6x its best and comes back; ends at 0.142
NOISY_HIGH_RATE = [
    3.235, 1.255, 0.65, 0.389, 0.98, 2.39, 1.2, 1.318, 0.243, 0.997, 0.509, 0.318, 0.701, 0.314, 0.424, 0.171,
    0.991, 0.286, 0.282, 0.301, 0.159, 0.133, 0.259, 0.325, 0.129, 0.164, 0.126, 0.151, 0.138, 0.142]

# momentum, lr 0.05, 150 epochs: the best 0.131 at epoch 11, then a slow climb to 0.178 (1.36x)
OVERFITTING = [
    0.382, 0.261, 0.203, 0.178, 0.17, 0.174, 0.168, 0.179, 0.15, 0.147, 0.131, 0.136, 0.137, 0.138, 0.142,
    0.139, 0.137, 0.144, 0.146, 0.14, 0.145, 0.151, 0.148, 0.142, 0.15, 0.145, 0.147, 0.151, 0.148, 0.146, 0.15,
    0.153, 0.149, 0.156, 0.156, 0.157, 0.154, 0.154, 0.159, 0.16, 0.157, 0.161, 0.158, 0.155, 0.158, 0.159,
    0.16, 0.157, 0.159, 0.16, 0.162, 0.161, 0.161, 0.161, 0.16, 0.161, 0.164, 0.161, 0.164, 0.166, 0.163, 0.164,
    0.163, 0.165, 0.164, 0.164, 0.164, 0.165, 0.165, 0.165, 0.167, 0.167, 0.168, 0.166, 0.167, 0.166, 0.168,
    0.167, 0.165, 0.167, 0.169, 0.167, 0.169, 0.167, 0.169, 0.168, 0.169, 0.168, 0.169, 0.171, 0.17, 0.169,
    0.171, 0.169, 0.17, 0.17, 0.171, 0.169, 0.171, 0.172, 0.172, 0.171, 0.172, 0.171, 0.171, 0.17, 0.173, 0.172,
    0.172, 0.173, 0.172, 0.172, 0.174, 0.174, 0.174, 0.174, 0.174, 0.174, 0.175, 0.176, 0.175, 0.174, 0.175,
    0.175, 0.175, 0.176, 0.175, 0.175, 0.176, 0.176, 0.176, 0.176, 0.176, 0.177, 0.177, 0.177, 0.176, 0.176,
    0.176, 0.177, 0.176, 0.177, 0.178, 0.177, 0.178, 0.177, 0.177, 0.178, 0.178, 0.177]

# Fashion-MNIST MLP (configs/mlp_fashion.toml), evaluated every 100 steps
FASHION = [
    0.536, 0.491, 0.468, 0.431, 0.451, 0.418, 0.396, 0.405, 0.426, 0.403, 0.401, 0.382, 0.374, 0.39, 0.372,
    0.377, 0.394, 0.356, 0.359, 0.347, 0.382, 0.348, 0.352, 0.349, 0.352, 0.34, 0.35, 0.357, 0.345, 0.35, 0.345,
    0.331, 0.323, 0.336, 0.333, 0.343, 0.338, 0.332]

# Downpour (2 replicas, 2 shards), SGD lr 0.3: a spike at the second evaluation, then trains
DOWNPOUR_NOISY = [
    1.67, 4.795, 1.537, 1.751, 0.857, 0.731, 0.681, 0.241, 0.232, 0.177, 0.203, 0.161, 0.158, 0.155, 0.152,
    0.171, 0.178, 0.145, 0.14, 0.145, 0.144, 0.137]

# Downpour, Adagrad lr 0.3: slow start, a spike at 0.411, trains
DOWNPOUR_ADAGRAD = [
    2.378, 2.36, 1.985, 1.691, 1.464, 1.05, 0.652, 0.492, 0.356, 0.435, 0.396, 0.265, 0.233, 0.234, 0.195,
    0.194, 0.411, 0.171, 0.175, 0.174, 0.172, 0.156]

# Adagrad, lr 1: at chance (ln 10) from the first evaluation: never improved, not a divergence of the curve
STUCK_AT_CHANCE = [
    2.307, 2.31, 2.306, 2.309, 2.306, 2.305, 2.305, 2.307, 2.306, 2.308, 2.303, 2.305, 2.305, 2.305, 2.305,
    2.304, 2.304, 2.305, 2.303, 2.305, 2.304, 2.305, 2.304, 2.304, 2.304, 2.304, 2.303, 2.303, 2.303, 2.303]

# momentum, lr 0.3: the best 0.481 at epoch 7, then climbs to 1.2-1.8
CLIMBING = [
    1.223, 0.983, 0.982, 1.236, 0.827, 0.644, 0.481, 0.647, 0.53, 0.491, 0.546, 0.71, 0.681, 0.752, 1.187,
    0.724, 0.755, 1.24, 1.279, 1.03, 1.464, 1.313, 1.369, 1.756, 1.503, 1.392, 1.378, 1.264, 1.297, 1.243]

# Downpour, momentum lr 0.15: 1.81, a blow-up to 7.3, then stuck at chance
DOWNPOUR_BLOWN_UP = [
    1.879, 1.814, 7.276, 3.32, 2.312, 2.311, 2.308, 2.306, 2.306, 2.312, 2.309, 2.309, 2.306, 2.306, 2.306,
    2.308, 2.312, 2.308, 2.305, 2.31, 2.308, 2.313]

# Downpour, SGD lr 0.6: 1.25, a blow-up to 6.9, then stuck at chance
DOWNPOUR_SGD_BLOWN_UP = [
    2.395, 1.248, 6.944, 1.998, 2.305, 2.502, 2.151, 2.316, 2.304, 2.305, 2.305, 2.305, 2.302, 2.342, 2.304,
    2.257, 2.307, 2.304, 2.306, 2.304, 2.304, 2.305]


def first_warning(curve, **options):
    """(index, record) of the evaluation that warns, or (None, None); checks it warns once."""
    watch = DivergenceWatch("momentum", 0.3, **options)
    warnings = [(i, r) for i, loss in enumerate(curve) if (r := watch.observe(10 * (i + 1), loss))]
    assert len(warnings) <= 1
    return warnings[0] if warnings else (None, None)


@pytest.mark.parametrize("curve", [NOISY_HIGH_RATE, OVERFITTING, FASHION, DOWNPOUR_NOISY, DOWNPOUR_ADAGRAD,
                                   STUCK_AT_CHANCE])
def test_no_warning_on_real_curves_that_do_not_diverge(curve):
    assert first_warning(curve) == (None, None)


@pytest.mark.parametrize("curve,at", [(CLIMBING, 19), (DOWNPOUR_BLOWN_UP, 4), (DOWNPOUR_SGD_BLOWN_UP, 4)])
def test_one_warning_on_real_curves_that_diverge(curve, at):
    index, record = first_warning(curve)
    assert index == at
    assert record["kind"] == "warning" and record["step"] == 10 * (at + 1) and record["test_loss"] == curve[at]
    assert record["best_test_loss"] == min(curve[:at + 1])


def test_each_bound_matters_on_the_real_curves():
    """Without the halfway bound overfitting warns; with one evaluation instead of three the
    noisy high-rate curve does; a factor of 2 misses the Downpour blow-ups."""
    watch = DivergenceWatch("sgd", 0.1)
    watch.first, watch.best = 0.382, 0.131
    assert watch.bound() == pytest.approx(0.131 + (0.382 - 0.131) / 2)  # above OVERFITTING's 0.178
    assert first_warning(NOISY_HIGH_RATE, patience=1)[0] is not None
    assert first_warning(DOWNPOUR_BLOWN_UP, factor=2.0) == (None, None)


def test_a_non_finite_test_loss_warns_at_once_and_only_once():
    watch = DivergenceWatch("adagrad", 0.05)
    assert watch.observe(1, 0.5) is None
    record = watch.observe(2, math.nan)
    assert record["step"] == 2 and "nan" in record["message"]
    assert watch.observe(3, math.inf) is None and watch.observe(4, 100.0) is None


def test_a_drop_below_the_bound_resets_the_count():
    watch = DivergenceWatch("sgd", 0.1)
    for loss in (2.0, 1.0, 1.9, 1.9, 1.0, 1.9, 1.9):  # bound max(1.25, 1.5) = 1.5: never three in a row
        assert watch.observe(0, loss) is None
    assert watch.observe(0, 1.9) is not None


def test_the_line_names_the_optimizer_and_rate_and_points_at_the_guidance(capsys):
    logged = []
    _, record = first_warning(CLIMBING)
    emit(record, logged.append)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dbmpi: warning: training may be diverging at step 200")
    assert "optimizer momentum, learning rate 0.3" in err and 'docs/CONFIG.md, "The divergence warning"' in err
    assert logged == [record] and record["optimizer"] == "momentum" and record["learning_rate"] == 0.3


def test_sandblaster_counts_iterations_and_has_no_learning_rate():
    watch = DivergenceWatch("lbfgs", None, unit="iteration")
    record = next(r for i, loss in enumerate(CLIMBING) if (r := watch.observe(i, loss)))
    assert record["iteration"] == 19 and "optimizer lbfgs)" in record["message"]
    assert "learning rate" not in record["message"]
