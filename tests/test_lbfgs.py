"""Sandblaster L-BFGS, serial: the algorithm on the NumPy reference vector space.

Convergence (quadratic, Rosenbrock, digits logistic regression against SciPy's L-BFGS-B),
strong Wolfe at every accepted step, recovery (non-finite regions, non-descent directions,
functions that cannot decrease), the vector-space contract (only interface calls, only
names from vector_names(m), deterministic), the history bound and checkpoint state.
"""
import copy
import json
import math

import numpy as np
import pytest
import scipy.optimize
from threadpoolctl import threadpool_limits

from dbmpi.algorithms.lbfgs import LBFGS, NumpyVectorSpace, VectorSpace, vector_names

INTERFACE = ("dot", "axpy", "scale", "copy", "multiply", "evaluate")


# -- objectives (float64 inside; the space hands them float32 points) ---------------------

def quadratic_problem(rng, n=20, condition=100.0):
    """f = 0.5 x'Ax - b'x with SPD A of the given condition number; returns (fun, minimiser)."""
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = basis @ np.diag(np.geomspace(1.0, condition, n)) @ basis.T
    b = rng.standard_normal(n)

    def fun(x):
        x = np.asarray(x, dtype=np.float64)
        return 0.5 * x @ A @ x - b @ x, A @ x - b

    return fun, np.linalg.solve(A, b)


def rosenbrock(x):
    x = np.asarray(x, dtype=np.float64)
    f = np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)
    g = np.zeros_like(x)
    g[:-1] += -400.0 * x[:-1] * (x[1:] - x[:-1] ** 2) - 2.0 * (1.0 - x[:-1])
    g[1:] += 200.0 * (x[1:] - x[:-1] ** 2)
    return f, g


def rosenbrock_start(n):
    x0 = np.full(n, -1.2)
    x0[1::2] = 1.0
    return x0


@pytest.fixture(scope="module")
def digits_objective():
    """L2-regularised multinomial logistic regression on digits (650 parameters): strictly
    convex, so the optimum loss is unique."""
    from sklearn.datasets import load_digits

    features, labels = load_digits(return_X_y=True)
    features = features / 16.0
    n, p = features.shape
    k = 10
    onehot = np.eye(k)[labels]
    lam = 1e-3

    def fun(w):
        w = np.asarray(w, dtype=np.float64)
        W, bias = w[: p * k].reshape(p, k), w[p * k:]
        z = features @ W + bias
        z -= z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1))
        prob = np.exp(z - lse[:, None])
        loss = np.mean(lse - (z * onehot).sum(axis=1)) + 0.5 * lam * np.sum(W * W)
        residual = (prob - onehot) / n
        return loss, np.concatenate([(features.T @ residual + lam * W).ravel(), residual.sum(axis=0)])

    return fun, np.zeros(p * k + k)


# -- a space that records every call and exposes nothing else -----------------------------

class RecordingSpace:
    """Forwards the six interface operations to a NumpyVectorSpace and logs them; any other
    attribute access fails, so the algorithm provably uses the interface only."""

    def __init__(self, inner):
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "log", [])

    def __getattribute__(self, name):
        if name in ("log", "_inner", "__class__"):
            return object.__getattribute__(self, name)
        if name not in INTERFACE:
            raise AttributeError(f"the algorithm used {name!r}, which is not in the interface")
        inner, log = object.__getattribute__(self, "_inner"), object.__getattribute__(self, "log")

        def call(*args):
            result = getattr(inner, name)(*args)
            log.append((name, *args))
            assert result is None or type(result) is float, f"{name} returned {type(result)}"
            return result

        return call


def names_in(log):
    return {arg for entry in log for arg in entry[1:] if isinstance(arg, str)}


# -- the reference space ------------------------------------------------------------------

def test_vector_names():
    assert vector_names(2) == ["x", "g", "d", "x_trial", "g_trial", "q", "s0", "s1", "y0", "y1"]
    assert len(vector_names(10)) == 6 + 2 * 10
    with pytest.raises(ValueError):
        vector_names(0)


def test_numpy_space_ops():
    calls = []

    def fun(x):
        calls.append(x)
        return float(np.sum(x.astype(np.float64) ** 2)), 2.0 * x

    n = 100_000
    space = NumpyVectorSpace(np.full(n, 0.1), fun)
    assert isinstance(space, VectorSpace)
    x = np.float64(np.float32(0.1))
    assert space.dot("x", "x") == pytest.approx(n * x * x, rel=1e-12)  # float64 accumulation
    space.copy("x", "a")
    space.axpy(2.0, "x", "a")
    np.testing.assert_allclose(space.vector("a"), 3 * np.float32(0.1), rtol=1e-6)
    space.scale(0.5, "a")
    space.multiply("a", "x", "b")
    np.testing.assert_allclose(space.vector("b"), 1.5 * 0.01, rtol=1e-5)
    assert space.vector("a").dtype == np.float32 and space.vector("b").dtype == np.float32
    f = space.evaluate("x", "g")
    assert type(f) is float and f == pytest.approx(n * x * x) and space.evaluations == 1
    assert space.vector("g").dtype == np.float32 and not calls[0].flags.writeable
    with pytest.raises(ValueError):
        calls[0][0] = 1.0


def test_invalid_settings():
    space = NumpyVectorSpace(np.zeros(2), rosenbrock)
    for bad in (dict(m=0), dict(c1=0.9, c2=0.1), dict(c2=1.0), dict(max_evals=0), dict(initial_step=-1.0)):
        with pytest.raises(ValueError):
            LBFGS(space, **bad)
    with pytest.raises(RuntimeError):
        LBFGS(space).step()


# -- convergence --------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quadratic_converges_to_the_minimiser(seed):
    """n = 20, condition number 10: about 16 iterations (SciPy's L-BFGS-B: about 21)."""
    fun, minimiser = quadratic_problem(np.random.default_rng(seed), condition=10.0)
    reference = NumpyVectorSpace(np.zeros(minimiser.size), fun)
    space = RecordingSpace(reference)
    records = LBFGS(space, m=10).run(200, tol=1e-6)
    assert records[-1]["status"] == "converged"
    assert len(records) <= 25, len(records)
    np.testing.assert_allclose(reference.vector("x"), minimiser, rtol=0, atol=1e-4 * np.abs(minimiser).max())
    assert all(r["status"] == "ok" for r in records[:-1])
    # First trial steps: 1/||g|| on steepest descent, then 1 on the quasi-Newton direction.
    trials = [entry[1] for entry in space.log if entry[0] == "axpy" and entry[2:] == ("d", "x_trial")]
    first_trials = [trials[0], trials[records[0]["evaluations"]]]
    assert first_trials == [pytest.approx(1.0 / np.linalg.norm(fun(np.zeros(minimiser.size))[1])), 1.0]


@pytest.mark.parametrize("n", [2, 10])
def test_rosenbrock_converges(n):
    space = NumpyVectorSpace(rosenbrock_start(n), rosenbrock)
    records = LBFGS(space, m=10).run(500, tol=1e-7)
    assert records[-1]["status"] == "converged"
    np.testing.assert_allclose(space.vector("x"), 1.0, atol=1e-3)
    assert records[-1]["loss"] < 1e-7


def test_digits_logistic_regression_matches_scipy(digits_objective):
    """Float32 vectors, float64 dots: the final loss is within 1e-5 (relative) of SciPy's
    float64 L-BFGS-B run to tight tolerances."""
    fun, w0 = digits_objective
    with threadpool_limits(1, user_api="blas"):  # tiny BLAS calls: threads only contend
        reference = scipy.optimize.minimize(fun, w0, jac=True, method="L-BFGS-B",
                                            options=dict(maxiter=3000, gtol=1e-9, ftol=1e-13))
        space = NumpyVectorSpace(w0, fun)
        records = LBFGS(space, m=10).run(1000, tol=1e-6)
    assert records[-1]["status"] == "converged", records[-1]
    loss = records[-1]["loss"]
    assert abs(loss - reference.fun) <= 1e-5 * reference.fun, (loss, reference.fun)
    assert loss == pytest.approx(fun(space.vector("x"))[0], rel=1e-12)  # the loss is x's
    assert records[-1]["total_evaluations"] == space.evaluations <= 1.3 * len(records) + 5


# -- strong Wolfe at every accepted step ----------------------------------------------------

@pytest.mark.parametrize("problem", ["rosenbrock", "digits"])
def test_accepted_steps_satisfy_strong_wolfe(problem, digits_objective):
    """Checked independently: f and g recomputed in float64 at the float32 points before and
    after each step, with s = x_new - x_old the step actually taken."""
    fun, x0 = (rosenbrock, rosenbrock_start(10)) if problem == "rosenbrock" else digits_objective
    c1, c2 = 1e-4, 0.9
    space = NumpyVectorSpace(x0, fun)
    opt = LBFGS(space, m=5, c1=c1, c2=c2)
    opt.start()
    checked = 0
    for _ in range(60):
        x_old = space.vector("x").astype(np.float64)
        record = opt.step()
        if record["step_length"] == 0.0:
            break
        x_new = space.vector("x").astype(np.float64)
        (f_old, g_old), (f_new, g_new) = fun(x_old), fun(x_new)
        s = x_new - x_old
        slope_old, slope_new = g_old @ s, g_new @ s
        assert slope_old < 0.0 and f_new < f_old
        assert record["loss"] == f_new and record["previous_loss"] == f_old
        armijo = f_new <= f_old + c1 * slope_old + 1e-12 * abs(f_old)
        curvature = abs(slope_new) <= c2 * abs(slope_old) * (1 + 1e-3) + 1e-12
        if record["status"] == "ok":
            assert record["wolfe"] and armijo and curvature, (record, slope_old, slope_new)
            assert abs(record["slope"]) <= c2 * abs(record["slope0"])
            checked += 1
        else:
            assert record["status"] == "recovered" and not record["wolfe"] and armijo
    assert checked >= 30


# -- recovery -----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_region_is_too_far_not_a_crash(bad):
    """Outside a ball the objective is NaN/inf; a huge first step lands there and must
    shrink back instead of raising or taking a zero step."""
    fun, minimiser = quadratic_problem(np.random.default_rng(3), n=10)
    centre = minimiser

    def guarded(x):
        if np.linalg.norm(x - centre) > 5.0 * np.linalg.norm(centre):
            return bad, np.full(x.size, bad)
        return fun(x)

    space = NumpyVectorSpace(np.zeros(10), guarded)
    records = LBFGS(space, initial_step=1e6).run(200, tol=1e-6)
    assert records[-1]["status"] == "converged"
    assert all(r["step_length"] > 0.0 and r["loss"] < r["previous_loss"] for r in records[:-1])
    assert records[0]["evaluations"] > 1  # it did hit the bad region first
    np.testing.assert_allclose(space.vector("x"), minimiser, atol=1e-3 * np.abs(minimiser).max())


def test_non_descent_direction_resets_history():
    """A corrupted history (negative initial Hessian scale) gives an ascent direction: the
    step resets to steepest descent and still decreases the loss."""
    fun, minimiser = quadratic_problem(np.random.default_rng(4))
    space = NumpyVectorSpace(np.zeros(minimiser.size), fun)
    opt = LBFGS(space, m=5)
    opt.run(3, tol=0.0)
    assert opt.state()["slots"]
    state = opt.state()
    state["gamma"] = -1e3
    opt.load_state(state)
    record = opt.step()
    assert record["reset"] and record["status"] == "ok"
    assert record["loss"] < record["previous_loss"] and record["history"] == 1
    records = opt.run(200, tol=1e-6)
    assert records[-1]["status"] == "converged"
    np.testing.assert_allclose(space.vector("x"), minimiser, atol=1e-3 * np.abs(minimiser).max())


def test_function_that_cannot_decrease_stalls():
    """The gradient points uphill (wrong sign): no trial decreases f. The step retries along
    steepest descent, then reports "stalled" with x unchanged and a bounded evaluation count."""
    def uphill(x):
        x = np.asarray(x, dtype=np.float64)
        return float(x @ x), -2.0 * x

    x0 = np.linspace(-1.0, 1.0, 7) + 0.5
    space = NumpyVectorSpace(x0, uphill)
    opt = LBFGS(space, m=4, max_evals=10)
    records = opt.run(50)
    assert [r["status"] for r in records] == ["stalled"]
    record = records[0]
    assert record["step_length"] == 0.0 and record["reset"] and record["loss"] == record["previous_loss"]
    assert 1 < record["evaluations"] <= 2 * 10
    np.testing.assert_array_equal(space.vector("x"), x0.astype(np.float32))


def test_start_at_the_minimum_converges_without_stepping():
    def bowl(x):
        x = np.asarray(x, dtype=np.float64) - 0.25
        return float(x @ x), 2.0 * x

    space = NumpyVectorSpace(np.full(5, 0.25), bowl)
    records = LBFGS(space).run(100)
    assert [r["status"] for r in records] == ["converged"]
    assert records[0]["evaluations"] == 0 and space.evaluations == 1


def test_budget_exhausted_accepts_best_sufficient_decrease_point():
    """With a 2-evaluation budget the search ends on a trial past a cliff; the earlier
    trial (Armijo, not curvature) is accepted, flagged, with its gradient kept in q."""
    def cliff(x):
        x = np.asarray(x, dtype=np.float64)
        if x[0] < 0.5:
            return 1e3, np.array([x[0]])
        return 0.5 * x[0] ** 2, np.array([x[0]])

    space = NumpyVectorSpace(np.array([1.0]), cliff)
    opt = LBFGS(space, c2=0.5, max_evals=2, initial_step=0.1)
    opt.start()
    record = opt.step()
    assert record["status"] == "recovered" and not record["wolfe"]
    assert record["step_length"] == pytest.approx(0.1) and record["evaluations"] == 2
    assert space.vector("x")[0] == pytest.approx(0.9) and space.vector("g")[0] == pytest.approx(0.9)
    assert record["loss"] == pytest.approx(0.405)


# -- the vector-space contract ------------------------------------------------------------

def test_only_interface_calls_names_and_determinism():
    m = 4

    def run_logged():
        space = RecordingSpace(NumpyVectorSpace(rosenbrock_start(6), rosenbrock))
        records = LBFGS(space, m=m).run(60, tol=1e-7)
        return space.log, records

    log, records = run_logged()
    assert {entry[0] for entry in log} <= set(INTERFACE)
    assert names_in(log) <= set(vector_names(m))
    assert {"x", "g", "d", "x_trial", "g_trial"} <= names_in(log)
    assert all(isinstance(arg, (str, float)) for entry in log for arg in entry[1:])
    again, records_again = run_logged()
    assert again == log and records_again == records  # same inputs, same ops


def test_recovery_paths_stay_in_the_interface():
    """The reset, retry and q paths use only the interface and vector_names(m) too."""
    def uphill(x):
        return float(np.sum(np.asarray(x, dtype=np.float64) ** 2)), -2.0 * x

    m = 3
    space = RecordingSpace(NumpyVectorSpace(np.ones(4), uphill))
    LBFGS(space, m=m, max_evals=5).run(3)
    assert names_in(space.log) <= set(vector_names(m))

    def cliff(x):
        return (1e3 if x[0] < 0.5 else 0.5 * float(x[0]) ** 2), np.array([x[0]])

    space = RecordingSpace(NumpyVectorSpace(np.array([1.0]), cliff))
    LBFGS(space, m=m, c2=0.5, max_evals=2, initial_step=0.1).run(5)
    assert "q" in names_in(space.log) and names_in(space.log) <= set(vector_names(m))


def test_history_never_exceeds_m():
    m = 3
    space = RecordingSpace(NumpyVectorSpace(rosenbrock_start(10), rosenbrock))
    opt = LBFGS(space, m=m)
    records = opt.run(40, tol=0.0, ftol=-1.0)
    assert len(records) == 40
    assert max(r["history"] for r in records) == m
    assert len(opt.state()["slots"]) <= m and len(opt.state()["rho"]) <= m
    assert names_in(space.log) <= set(vector_names(m))


# -- checkpoint state ---------------------------------------------------------------------

def test_state_round_trip_continues_identically():
    space = NumpyVectorSpace(rosenbrock_start(10), rosenbrock)
    opt = LBFGS(space, m=5)
    opt.run(8, tol=0.0)
    state = json.loads(json.dumps(opt.state()))  # scalars only: JSON round-trips
    assert set(state) == {"m", "started", "iteration", "f", "grad_norm", "slots", "rho", "gamma",
                          "evaluations", "vectors"}
    assert state["vectors"][:2] == ["x", "g"] and len(state["vectors"]) == 2 + 2 * len(state["slots"])

    # A fresh space holding only the vectors the state names, and a fresh optimizer.
    restored_space = NumpyVectorSpace(space.vector("x"), rosenbrock)
    restored_space.vectors = {name: space.vector(name) for name in state["vectors"]}
    restored = LBFGS(restored_space, m=5)
    restored.load_state(state)

    expected = [opt.step() for _ in range(6)]
    actual = [restored.step() for _ in range(6)]
    assert actual == expected
    np.testing.assert_array_equal(restored_space.vector("x"), space.vector("x"))

    bad = copy.deepcopy(state)
    bad["m"] = 7
    with pytest.raises(ValueError):
        restored.load_state(bad)
