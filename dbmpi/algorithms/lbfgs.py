"""Sandblaster L-BFGS (Dean et al. 2012, section 3) without MPI: the algorithm on vector commands.

The coordinator never holds a parameter vector. Every vector (iterate, gradient, search
direction, trial point, curvature history) lives in a `VectorSpace`: on the cluster, each
parameter-server shard keeps its slice of every named vector and runs the commands on it;
only scalars (dot products, losses) come back. `LBFGS` therefore sees nothing but scalars,
and the same object drives the serial reference (`NumpyVectorSpace`) and the sharded space.

Vectors the algorithm uses (`vector_names(m)`, 6 + 2m parameter-sized buffers per shard):

    x        the current iterate (exists before `start`)
    g        the gradient at x
    d        the search direction; the two-loop recursion builds it in place, no scratch
    x_trial  the line search's trial point x + alpha d
    g_trial  the gradient at x_trial
    q        scratch: the gradient of the best sufficient-decrease trial, kept only when a
             later trial is about to overwrite g_trial, so a recovery step can accept it
    s0..s{m-1}, y0..y{m-1}
             curvature pairs s = x_new - x_old, y = g_new - g_old in a ring of m slots

A checkpoint needs the scalars of `LBFGS.state()` plus the vectors it lists under
"vectors" (x, g and the filled s/y slots); the others are scratch.

The line search is Nocedal & Wright's strong-Wolfe search (Algorithm 3.5 with zoom 3.6):
cubic interpolation from two function values and slopes, quadratic when one slope is
missing, kept 10% inside the bracket. A non-finite loss or slope at a trial point means
"too far": the step shrinks towards the last good point, nothing raises.

Recovery, so that a step never loops forever and never calls a zero step progress:
  * a quasi-Newton direction that is not downhill (g.d >= 0 or NaN, e.g. a corrupted
    history) resets the history and the step goes along steepest descent instead;
  * a search that runs out of evaluations accepts its best trial with sufficient decrease
    (status "recovered", not strong Wolfe); sufficient decrease also demands f < f(x);
  * a search without any such trial resets the history and retries once along steepest
    descent from a smaller first step; if that fails too the step is "stalled" and x, g
    and f stay as they were.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

X, G, D, X_TRIAL, G_TRIAL, Q = "x", "g", "d", "x_trial", "g_trial", "q"
WORK_VECTORS = (X, G, D, X_TRIAL, G_TRIAL, Q)

# Step statuses.
OK = "ok"                # the accepted point satisfies the strong Wolfe conditions
RECOVERED = "recovered"  # budget ran out: the best sufficient-decrease point was accepted
CONVERGED = "converged"  # gradient or loss change below tolerance; possibly no step taken
STALLED = "stalled"      # no decrease found even along steepest descent: x unchanged


class NotFinite(ValueError):
    """The objective or its gradient is not finite at the point `start` evaluates."""


@runtime_checkable
class VectorSpace(Protocol):
    """Named float32 vectors that live elsewhere; only scalars come back."""

    def dot(self, a: str, b: str) -> float:
        """sum(a * b), accumulated in float64."""

    def axpy(self, alpha: float, x: str, y: str) -> None:
        """y += alpha * x."""

    def scale(self, alpha: float, x: str) -> None:
        """x *= alpha."""

    def copy(self, src: str, dst: str) -> None:
        """dst = src (creates dst if new)."""

    def multiply(self, a: str, b: str, out: str) -> None:
        """out = a * b elementwise."""

    def evaluate(self, point: str, grad: str) -> float:
        """f(point); the gradient at `point` is written into vector `grad`."""


def s_name(slot: int) -> str:
    """The vector holding the step s of history slot `slot`."""
    return f"s{slot}"


def y_name(slot: int) -> str:
    """The vector holding the gradient change y of history slot `slot`."""
    return f"y{slot}"


def vector_names(m: int) -> list[str]:
    """Every vector name `LBFGS(space, m=m)` may use, so a shard can preallocate them."""
    if m < 1:
        raise ValueError(f"history size m must be >= 1, got {m}")
    return [*WORK_VECTORS, *(s_name(i) for i in range(m)), *(y_name(i) for i in range(m))]


class NumpyVectorSpace:
    """The serial reference space: a dict of flat float32 arrays in this process.

    `fun(x)` receives the 1-D float32 point (read-only) and returns (loss, gradient); the
    gradient is stored as float32, as a replica would send it. `evaluations` counts calls.
    """

    def __init__(self, x0: np.ndarray, fun: Callable[[np.ndarray], tuple[float, np.ndarray]]):
        self.fun = fun
        self.vectors: dict[str, np.ndarray] = {X: np.array(x0, dtype=np.float32).reshape(-1)}
        self.evaluations = 0

    def vector(self, name: str) -> np.ndarray:
        """A copy of vector `name` (for callers and tests; the algorithm never reads one)."""
        return self.vectors[name].copy()

    def dot(self, a, b):
        return float(np.dot(self.vectors[a].astype(np.float64), self.vectors[b].astype(np.float64)))

    def axpy(self, alpha, x, y):
        # alpha is rounded to float32 as a shard's saxpy would do it.
        self.vectors[y] += np.float32(alpha) * self.vectors[x]

    def scale(self, alpha, x):
        self.vectors[x] *= np.float32(alpha)

    def copy(self, src, dst):
        source = self.vectors[src]
        target = self.vectors.get(dst)
        if target is None or target.shape != source.shape:
            self.vectors[dst] = source.copy()
        else:
            np.copyto(target, source)

    def multiply(self, a, b, out):
        product = self.vectors[a] * self.vectors[b]
        target = self.vectors.get(out)
        if target is None or target.shape != product.shape:
            self.vectors[out] = product
        else:
            np.copyto(target, product)

    def evaluate(self, point, grad):
        view = self.vectors[point].view()
        view.flags.writeable = False
        loss, gradient = self.fun(view)
        self.evaluations += 1
        gradient = np.asarray(gradient, dtype=np.float32).reshape(-1)
        if gradient.shape != view.shape:
            raise ValueError(f"gradient has {gradient.size} elements, the point has {view.size}")
        target = self.vectors.get(grad)
        if target is None or target.shape != gradient.shape:
            self.vectors[grad] = gradient.copy()
        else:
            np.copyto(target, gradient)
        return float(loss)


@dataclass(frozen=True)
class _Trial:
    """One point on the search line: step length, loss and slope g(x + alpha d) . d."""

    alpha: float
    f: float
    slope: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.f) and math.isfinite(self.slope)


@dataclass(frozen=True)
class _Search:
    """A line search's outcome: the accepted trial (None: no decrease found) and where its
    gradient is ("g_trial" or "q")."""

    trial: _Trial | None
    wolfe: bool
    grad: str
    evaluations: int
    smallest_alpha: float


def _cubic_minimizer(a: _Trial, b: _Trial) -> float | None:
    """The minimiser of the cubic through (alpha, f, slope) at a and b (N&W eq. 3.59), or
    None when the cubic has none."""
    d1 = a.slope + b.slope - 3.0 * (a.f - b.f) / (a.alpha - b.alpha)
    discriminant = d1 * d1 - a.slope * b.slope
    if not discriminant >= 0.0:  # also catches NaN
        return None
    d2 = math.copysign(math.sqrt(discriminant), b.alpha - a.alpha)
    denominator = b.slope - a.slope + 2.0 * d2
    if denominator == 0.0:
        return None
    return b.alpha - (b.alpha - a.alpha) * (b.slope + d2 - d1) / denominator


def _quadratic_minimizer(a: _Trial, b: _Trial) -> float | None:
    """The minimiser of the quadratic through a's value and slope and b's value, or None."""
    width = b.alpha - a.alpha
    curvature = b.f - a.f - a.slope * width
    if not curvature > 0.0:
        return None
    return a.alpha - a.slope * width * width / (2.0 * curvature)


class LBFGS:
    """L-BFGS on a `VectorSpace`, issuing only vector commands and reading only scalars.

    Parameters (config keys in brackets):
      m            [train.history] curvature pairs kept (the oldest is overwritten)
      c1           [train.c1] sufficient-decrease constant of the Wolfe conditions
      c2           [train.c2] curvature constant of the strong Wolfe conditions, c1 < c2 < 1
      max_evals    [train.max_line_search] evaluations one line search may spend; a step may
                   run a second search (steepest descent) after a failed first one
      initial_step first trial step along steepest descent (first iteration and after a
                   history reset); None: 1 / ||g||, a unit-length first move
      max_step     the largest step length the search extrapolates to
      curvature_eps  a pair is stored only if s.y > curvature_eps * y.y (positive curvature,
                   not vanishingly small); otherwise it is skipped
      retry_shrink when a steepest-descent search found no decrease, the retry starts at
                   retry_shrink times the smallest step that search tried
    Same inputs give the same sequence of vector commands (no randomness, no timing).
    """

    def __init__(self, space: VectorSpace, m: int = 10, c1: float = 1e-4, c2: float = 0.9,
                 max_evals: int = 20, initial_step: float | None = None, max_step: float = 1e10,
                 curvature_eps: float = 1e-10, retry_shrink: float = 1e-3):
        if m < 1:
            raise ValueError(f"m (history) must be >= 1, got {m}")
        if not 0.0 < c1 < c2 < 1.0:
            raise ValueError(f"need 0 < c1 < c2 < 1, got c1={c1}, c2={c2}")
        if max_evals < 1:
            raise ValueError(f"max_evals must be >= 1, got {max_evals}")
        if initial_step is not None and not (0.0 < initial_step <= max_step):
            raise ValueError(f"initial_step must be in (0, max_step], got {initial_step}")
        if not 0.0 < retry_shrink < 1.0:
            raise ValueError(f"retry_shrink must be in (0, 1), got {retry_shrink}")
        self.space = space
        self.m = m
        self.c1 = c1
        self.c2 = c2
        self.max_evals = max_evals
        self.initial_step = initial_step
        self.max_step = max_step
        self.curvature_eps = curvature_eps
        self.retry_shrink = retry_shrink
        # Scalar state (what a checkpoint keeps besides the vectors).
        self.started = False
        self.iteration = 0
        self.f = math.nan
        self.grad_norm = math.nan
        self.slots: list[int] = []  # filled history slots, oldest first
        self.rho: list[float] = []  # 1 / (s.y) per filled slot, aligned with `slots`
        self.gamma = 1.0            # s.y / y.y of the newest pair: the initial Hessian scale
        self.evaluations = 0
        self._x_norm: float | None = None  # cached ||x||, dropped whenever x moves
        # Line-search bookkeeping.
        self._search_evals = 0
        self._f0 = math.nan
        self._slope0 = math.nan
        self._best: _Trial | None = None
        self._best_grad = G_TRIAL
        self._last_alpha: float | None = None
        self._smallest_alpha = math.inf

    # -- public API ----------------------------------------------------------------------

    def start(self) -> float:
        """Evaluate f and g at "x" (one evaluation); raises if either is not finite."""
        self.f = self._evaluate(X, G)
        self._x_norm = None
        self.grad_norm = math.sqrt(self.space.dot(G, G))
        if not (math.isfinite(self.f) and math.isfinite(self.grad_norm)):
            raise NotFinite(f"the objective is not finite at x "
                             f"(loss {self.f}, gradient norm {self.grad_norm})")
        self.started = True
        return self.f

    def step(self, tol: float = 0.0) -> dict:
        """One L-BFGS iteration: direction by the two-loop recursion, strong-Wolfe line
        search, history update; with recovery (see module doc). Returns the step's record.

        If ||g|| <= tol * max(1, ||x||) already (or g is exactly zero), reports
        "converged" without evaluating anything.
        """
        if not self.started:
            raise RuntimeError("call start() before step()")
        self.iteration += 1
        evals_before = self.evaluations
        previous = self.f
        if self.grad_norm == 0.0 or (tol > 0.0 and self.grad_norm <= tol * max(1.0, self.x_norm())):
            return self._record(CONVERGED, previous, evals_before)
        if not math.isfinite(self.grad_norm):
            return self._record(STALLED, previous, evals_before)

        reset = False
        steepest = not self.slots
        if steepest:
            slope0 = self._steepest_direction()
            alpha0 = self._steepest_step()
        else:
            slope0 = self._two_loop_direction()
            alpha0 = min(1.0, self.max_step)
            if not slope0 < 0.0:  # not a descent direction (or NaN): forget the history
                self._reset_history()
                reset, steepest = True, True
                slope0 = self._steepest_direction()
                alpha0 = self._steepest_step()

        search = self._line_search(alpha0, slope0)
        if search.trial is None:
            # No decrease along d: restart from steepest descent with a smaller first step.
            retry_alpha = (self.retry_shrink * search.smallest_alpha if steepest
                           else self._steepest_step())
            if self.slots:
                self._reset_history()
            reset = True
            if not steepest:
                slope0 = self._steepest_direction()
            search = self._line_search(retry_alpha, slope0)
            if search.trial is None:
                return self._record(STALLED, previous, evals_before, reset=reset, slope0=slope0)

        pair_stored = self._accept(search)
        status = OK if search.wolfe else RECOVERED
        return self._record(status, previous, evals_before, reset=reset, slope0=slope0,
                            trial=search.trial, wolfe=search.wolfe, pair_stored=pair_stored)

    def run(self, iterations: int, tol: float = 1e-5, ftol: float = 1e-9) -> list[dict]:
        """Start if needed, then step up to `iterations` times. Stops early with status
        "converged" once ||g|| <= tol * max(1, ||x||) or the relative loss change
        (f_old - f_new) / max(|f_old|, |f_new|, 1) <= ftol, and on "stalled"."""
        if not self.started:
            self.start()
        records = []
        for _ in range(iterations):
            record = self.step(tol)
            records.append(record)
            if record["status"] in (CONVERGED, STALLED):
                break
            change = (record["previous_loss"] - record["loss"]) / max(
                abs(record["previous_loss"]), abs(record["loss"]), 1.0)
            if change <= ftol or self.grad_norm <= tol * max(1.0, self.x_norm()):
                record["status"] = CONVERGED
                break
        return records

    def x_norm(self) -> float:
        """||x|| (one dot product, cached until x moves)."""
        if self._x_norm is None:
            self._x_norm = math.sqrt(self.space.dot(X, X))
        return self._x_norm

    def state(self) -> dict:
        """The scalar state a checkpoint keeps; "vectors" names the vectors it must save."""
        return {
            "m": self.m,
            "started": self.started,
            "iteration": self.iteration,
            "f": self.f,
            "grad_norm": self.grad_norm,
            "slots": list(self.slots),
            "rho": list(self.rho),
            "gamma": self.gamma,
            "evaluations": self.evaluations,
            "vectors": [X, G, *(s_name(i) for i in self.slots), *(y_name(i) for i in self.slots)],
        }

    def load_state(self, state: dict) -> None:
        """Restore `state()` output; the space must already hold the vectors it names."""
        slots, rho = [int(i) for i in state["slots"]], [float(r) for r in state["rho"]]
        if int(state["m"]) != self.m:
            raise ValueError(f"state has history m={state['m']}, this optimizer m={self.m}")
        if len(slots) != len(rho) or len(set(slots)) != len(slots) or any(not 0 <= i < self.m for i in slots):
            raise ValueError(f"inconsistent history in state: slots {slots}, rho {rho}")
        self.started = bool(state["started"])
        self.iteration = int(state["iteration"])
        self.f = float(state["f"])
        self.grad_norm = float(state["grad_norm"])
        self.slots, self.rho = slots, rho
        self.gamma = float(state["gamma"])
        self.evaluations = int(state["evaluations"])
        self._x_norm = None

    # -- direction -----------------------------------------------------------------------

    def _steepest_direction(self) -> float:
        """d = -g; returns the slope g.d = -||g||^2."""
        self.space.copy(G, D)
        self.space.scale(-1.0, D)
        return -self.grad_norm * self.grad_norm

    def _steepest_step(self) -> float:
        """First trial step along steepest descent."""
        step = self.initial_step if self.initial_step is not None else 1.0 / self.grad_norm
        return min(step, self.max_step)

    def _two_loop_direction(self) -> float:
        """d = -H g by the two-loop recursion (N&W Alg. 7.4) with H0 = gamma I, computed in
        place in d (d holds -q, then -r); returns the slope g.d."""
        space = self.space
        space.copy(G, D)
        space.scale(-1.0, D)
        alphas = []
        for slot, rho in zip(reversed(self.slots), reversed(self.rho), strict=True):
            a = -rho * space.dot(s_name(slot), D)  # a = rho s.q with q = -d
            space.axpy(a, y_name(slot), D)           # q -= a y
            alphas.append(a)
        space.scale(self.gamma, D)                   # r = gamma q
        for slot, rho, a in zip(self.slots, self.rho, reversed(alphas), strict=True):
            b = -rho * space.dot(y_name(slot), D)    # b = rho y.r with r = -d
            space.axpy(b - a, s_name(slot), D)       # r += (a - b) s
        return space.dot(G, D)

    def _reset_history(self) -> None:
        self.slots, self.rho, self.gamma = [], [], 1.0

    # -- line search ---------------------------------------------------------------------

    def _evaluate(self, point: str, grad: str) -> float:
        self.evaluations += 1
        return float(self.space.evaluate(point, grad))

    def _sufficient(self, t: _Trial) -> bool:
        """Armijo: f <= f0 + c1 alpha slope0, and a strict decrease (no zero steps)."""
        return t.finite and t.f <= self._f0 + self.c1 * t.alpha * self._slope0 and t.f < self._f0

    def _curvature(self, t: _Trial) -> bool:
        """Strong Wolfe curvature: |slope| <= c2 |slope0|."""
        return abs(t.slope) <= -self.c2 * self._slope0

    def _trial(self, alpha: float) -> _Trial:
        """Evaluate f and its slope at x + alpha d (into x_trial, g_trial)."""
        space = self.space
        if self._best is not None and self._best_grad == G_TRIAL:
            space.copy(G_TRIAL, Q)  # g_trial is about to be overwritten: keep the best's
            self._best_grad = Q
        space.copy(X, X_TRIAL)
        space.axpy(alpha, D, X_TRIAL)
        f = self._evaluate(X_TRIAL, G_TRIAL)
        self._search_evals += 1
        slope = space.dot(G_TRIAL, D) if math.isfinite(f) else math.nan
        t = _Trial(alpha, f, slope)
        self._last_alpha = alpha
        self._smallest_alpha = min(self._smallest_alpha, alpha)
        if self._sufficient(t) and (self._best is None or t.f < self._best.f):
            self._best, self._best_grad = t, G_TRIAL
        return t

    def _line_search(self, alpha: float, slope0: float) -> _Search:
        """Strong-Wolfe search along d from step `alpha` (N&W Alg. 3.5): extrapolate until
        the minimum is bracketed, then zoom. On budget exhaustion returns the best
        sufficient-decrease trial (wolfe=False), or none."""
        self._f0, self._slope0 = self.f, slope0
        self._search_evals = 0
        self._best, self._best_grad = None, G_TRIAL
        self._last_alpha, self._smallest_alpha = None, math.inf
        previous = _Trial(0.0, self.f, slope0)
        accepted = None
        while self._search_evals < self.max_evals:
            t = self._trial(alpha)
            if not self._sufficient(t) or (previous.alpha > 0.0 and t.f >= previous.f):
                accepted = self._zoom(previous, t)
                break
            if self._curvature(t):
                accepted = t
                break
            if t.slope >= 0.0:
                accepted = self._zoom(t, previous)
                break
            if alpha >= self.max_step:
                break  # cannot go further: fall back to the best point
            previous, alpha = t, self._extrapolate(previous, t)
        if accepted is not None:  # always the latest trial: its gradient is in g_trial
            return _Search(accepted, True, G_TRIAL, self._search_evals, self._smallest_alpha)
        return _Search(self._best, False, self._best_grad, self._search_evals, self._smallest_alpha)

    def _extrapolate(self, previous: _Trial, t: _Trial) -> float:
        """Next trial beyond t while f still decreases: the cubic's minimiser, kept between
        doubling and ten times the last advance, capped at max_step."""
        advance = t.alpha - previous.alpha
        low, high = t.alpha + advance, t.alpha + 10.0 * advance
        candidate = _cubic_minimizer(previous, t)
        if candidate is None or not math.isfinite(candidate) or candidate > high:
            candidate = high
        return min(max(candidate, low), self.max_step)

    def _zoom(self, lo: _Trial, hi: _Trial) -> _Trial | None:
        """N&W Alg. 3.6: shrink the bracket [lo, hi] (lo: best sufficient-decrease end)
        until a trial satisfies strong Wolfe; None if the budget runs out or the bracket
        collapses numerically."""
        while self._search_evals < self.max_evals:
            alpha = self._interpolate(lo, hi)
            if alpha is None:
                return None
            t = self._trial(alpha)
            if not self._sufficient(t) or t.f >= lo.f:
                hi = t
            else:
                if self._curvature(t):
                    return t
                if t.slope * (hi.alpha - lo.alpha) >= 0.0:
                    hi = lo
                lo = t
        return None

    @staticmethod
    def _interpolate(lo: _Trial, hi: _Trial) -> float | None:
        """A trial step inside the bracket, at least 10% of its width from either end: the
        cubic (or quadratic) minimiser; next to lo when hi's loss is not finite."""
        width = hi.alpha - lo.alpha
        if abs(width) <= 1e-7 * max(abs(lo.alpha), abs(hi.alpha)):
            return None  # below float32 resolution of the step: nothing new to learn
        inner_lo, inner_hi = sorted((lo.alpha + 0.1 * width, hi.alpha - 0.1 * width))
        if not hi.finite:
            candidate = lo.alpha + 0.1 * width  # too far: stay close to the good end
        else:
            candidate = _cubic_minimizer(lo, hi)
            if candidate is None or not math.isfinite(candidate):
                candidate = _quadratic_minimizer(lo, hi)
            if candidate is None or not math.isfinite(candidate):
                candidate = lo.alpha + 0.5 * width
        return min(max(candidate, inner_lo), inner_hi)

    # -- accepting a step ----------------------------------------------------------------

    def _accept(self, search: _Search) -> bool:
        """Move x to the accepted trial, g to its gradient, and record the pair (s, y) if
        its curvature is positive. When the history is full the oldest slot is reused, so a
        rejected pair also drops the oldest one. Returns whether the pair was stored."""
        space, t = self.space, search.trial
        if t.alpha != self._last_alpha:
            space.copy(X, X_TRIAL)  # rebuild the point exactly as it was evaluated
            space.axpy(t.alpha, D, X_TRIAL)
        if len(self.slots) == self.m:
            slot = self.slots.pop(0)
            self.rho.pop(0)
        else:
            slot = min(set(range(self.m)) - set(self.slots))
        s, y = s_name(slot), y_name(slot)
        space.copy(X_TRIAL, s)
        space.axpy(-1.0, X, s)
        space.copy(search.grad, y)
        space.axpy(-1.0, G, y)
        space.copy(X_TRIAL, X)
        space.copy(search.grad, G)
        self._x_norm = None
        self.f = t.f
        self.grad_norm = math.sqrt(space.dot(G, G))
        sy, yy = space.dot(s, y), space.dot(y, y)
        if math.isfinite(sy) and math.isfinite(yy) and yy > 0.0 and sy > self.curvature_eps * yy:
            self.slots.append(slot)
            self.rho.append(1.0 / sy)
            self.gamma = sy / yy
            return True
        return False

    def _record(self, status: str, previous: float, evals_before: int, *, reset: bool = False,
                slope0: float | None = None, trial: _Trial | None = None, wolfe: bool = False,
                pair_stored: bool = False) -> dict:
        return {
            "iteration": self.iteration,
            "loss": self.f,
            "previous_loss": previous,
            "step_length": trial.alpha if trial is not None else 0.0,
            "evaluations": self.evaluations - evals_before,
            "total_evaluations": self.evaluations,
            "history": len(self.slots),
            "grad_norm": self.grad_norm,
            "reset": reset,
            "status": status,
            "wolfe": wolfe,
            "slope0": slope0,
            "slope": trial.slope if trial is not None else None,
            "pair_stored": pair_stored,
        }
