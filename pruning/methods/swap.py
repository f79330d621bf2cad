"""SWAP: pruning by entropic Wasserstein regression (EWR).

You & Cheng, "SWAP: Sparse Entropic Wasserstein Regression for Robust Network Pruning", ICLR 2024
(code: youlei202/Entropic-Wasserstein-Pruning, `pruners/optimal_transport_pruner.py`);
algorithms.md sections 6.1, 6.2 and 6.5.

With G recomputed at the current weights w_t, targets y = G w_bar (w_bar = the dense anchor) and
predictions yhat(w) = G w, one stage solves

    min_w  Q_OT(w) = (N/2) sum_ij Pi_ij (y_i - yhat_j(w))^2 + (N lam / 2) ||w - w_bar||^2,
           ||w||_0 <= k = floor((1 - s) p),

where Pi is the transport plan between uniform marginals a = b = 1/N for the 1-D squared cost
M_ij = (y_i - yhat_j(w_t))^2, computed once at w_t and held fixed for the stage:

* epsilon > 0: entropic OT, min <Pi, M> + eps sum Pi log Pi (POT's convention) with
  eps = epsilon x median(M) (`epsilon_units: median`, the default: scale-free) or eps = epsilon in
  raw cost units (`raw`, the reference code's --reg). `sinkhorn_method: auto` runs POT's plain
  scaling iterations (one N x N matrix-vector product per half-step) and, when they break down
  (the scalings overflow: large max(M)/eps with mass crossing large costs) or stall (their linear
  rate degrades as max(M)/eps grows: heavy-tailed targets, the default scale-free epsilon), Newton's
  method on the semi-dual (`newton_sinkhorn`: quadratic convergence, tens of steps cold, 2-5 from
  the potentials of a 100-iteration plain probe, which also decides whether to switch; the
  alternatives `stabilized` (absorption and epsilon scaling) and `sinkhorn_log` stay selectable).
  Each stage records sinkhorn_iterations, sinkhorn_converged and the marginal error (absolute,
  and relative to 1/N).

  Default epsilon = 0.01 (median units), chosen from the plan, not from accuracy. Measure the
  plan by exp(H)/N, the (geometric) number of transport partners per target: 1 for a permutation
  (the exact OT plan, or Pi = I/N), N for the uniform plan. On MLPNet / MNIST at the dense weights
  (N = 1000, y = G w_bar heavy-tailed: std 1.8, max |y| 31, median(M) 0.13), clean or with gradient
  noise (kappa 1, fraction 0.25), the same at the dense and at 90 %-magnitude weights:
  epsilon x median = 1: 438 partners (H = 0.94 of its maximum 2 log N: near uniform),
  0.1: 192, 0.01: 74, 0.001: 26, 1e-4: 10; the reference's 1 in raw units gives H = 0.98 of the
  maximum there and a uniform plan on the digits MLP (targets ~1e-2). 0.01 keeps each target's
  neighbourhood a few per cent of the samples: averaging over tens of neighbours, far from both
  the permutation (no averaging: LR up to the sort) and the uniform plan (only the mean is matched).
  On such heavy-tailed targets at 0.01 x median, max(M)/eps ~ 1e6 and the plain scalings stall
  (column-marginal L2 error 5e-6, 50x the tolerance, after 1,000 iterations on MLPNet); auto's progress test switches
  after the probe (sinkhorn_switch: stall) and Newton converges. The record says
  sinkhorn_converged = false if a plan still misses `sinkhorn_tol`.
* epsilon = 0: the exact 1-D OT plan, the monotone matching of sorted y to sorted yhat (a
  permutation / N, O(N log N) by sorting instead of a network simplex);
* epsilon = inf: the uniform plan 1/N^2;
* `plan: identity`: Pi = I/N, which turns Q_OT into the LR objective (the LR arm, for ablations).

Search direction (`direction`):

* ``paper`` (default): d = G^T (N Pi)(G w - y) + N lam (w - w_bar), as in the SWAP code used for
  the paper (commits 787ea51 ... c10832f); row i of N Pi r is a transport-weighted average of the
  residuals (the "neighbourhood interpolation").
* ``gradient``: the exact gradient of Q_OT with Pi fixed, G^T (N diag(b) G w - N Pi^T y) +
  N lam (w - w_bar).

The step along d is the exact minimiser of Q_OT (a quadratic in the step), with CHITA's
support-change bound and step expansion, inside the same IHT / active-set / backsolve machinery as
`lr` (`pruning.sparse_regression`); with Pi = I/N the two methods produce the same iterates. The
reference code takes one such IHT step per stage (`algorithm: iht`, `max_iter: 1` is the closest
setting); the default runs the solver to convergence with the plan fixed.

Why one-shot SWAP used to equal magnitude pruning: from the dense anchor, y = G w_bar = yhat, so the
first iterate is H_k(w_bar) (magnitude pruning); with the near-uniform plan of epsilon = 1 raw,
N Pi r is ~ the mean residual and the paper direction has <grad Q, d_S> <= 0 there: IHT-LS stops at
`no_descent` before its first step and returns magnitude pruning. The solver now says so
(`no_progress`, `no_progress_reason` in the stage row and a console warning, from
`pruning.sparse_regression.solve`), and the scale-free default leaves that regime.

Logged per stage: objective, iterations, the plan kind, epsilon used, plan entropy, the Sinkhorn
iterations, convergence and marginal error, the direction variant and no_progress.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pruning.errors import ConfigError, choice, integer, number, require
from pruning.methods.base import PruneResult, PruningProblem
from pruning.sparse_regression import (
    DIRECTIONS,
    DensePlan,
    IdentityPlan,
    PermutationPlan,
    Plan,
    SolverConfig,
    UniformPlan,
    regression_problem,
    solve,
    solve_info,
)

SINKHORN_METHODS = ("auto", "sinkhorn", "newton", "stabilized", "sinkhorn_log")
AUTO_PLAIN_ITER = 1000  # auto: plain scalings first, Newton when they have not converged by then
# auto: plain iterations run before the progress test. The easy cases converge in 11-41 iterations
# (inside the probe: their plan is POT's, bit for bit); 100 iterations cost ~0.1 s at N = 1000,
# and leave potentials from which Newton at the target epsilon needs 2-9 steps on MLPNet
AUTO_PROBE_ITER = 100
WARM_NEWTON_ITER = 50  # a warm start that needs more Newton steps than the cold solve's usual 20-80 is no help
PLANS = ("ot", "identity")
EPSILON_UNITS = ("raw", "median")


@dataclass(frozen=True)
class Config(SolverConfig):
    """Solver knobs of `lr` plus the transport plan and the direction variant."""

    # entropic regularisation; 0 = exact 1-D OT; inf (.inf in YAML) = uniform plan. Scale-free by
    # default: 0.01 x median(M). On MLPNet / MNIST G (N = 1000, clean and with gradient noise) it gives
    # each target ~74 transport partners (exp(H)/N; H - log N = 0.62 log N, halfway-ish between the
    # permutation, 0, and the uniform plan, 1); 1 x median gives ~438 (near uniform), and the
    # reference's 1 in raw units gives H = 0.98 of its maximum there and a uniform plan on the digits
    # MLP (targets ~1e-2). Chosen from these plan statistics, not from accuracy (see the docstring).
    epsilon: float = 0.01
    # median (epsilon times the median cost, scale-free) | raw (POT reg in cost units, the SWAP code's --reg)
    epsilon_units: str = "median"
    # paper: G^T (N Pi)(G w - y) + N lam (w - w_bar) | gradient: exact gradient of the EWR objective
    direction: str = "paper"
    plan: str = "ot"                 # ot | identity (Pi = I/N: the LR arm)
    # auto (plain scalings; semi-dual Newton when they overflow, when their progress over the first
    # AUTO_PROBE_ITER predicts no convergence by AUTO_PLAIN_ITER, or at AUTO_PLAIN_ITER)
    # | sinkhorn | newton | stabilized | sinkhorn_log
    sinkhorn_method: str = "auto"
    # POT numItermax (the SWAP code: 5000; the stage row records sinkhorn_iterations and sinkhorn_converged)
    sinkhorn_max_iter: int = 5000
    # POT stopThr: L2 error of the column marginal (1e-7: per-entry relative error <= 1e-4 at N = 1000)
    sinkhorn_tol: float = 1e-7

    def __post_init__(self) -> None:
        if isinstance(self.epsilon, str) and self.epsilon.strip().lower() in ("inf", "+inf", ".inf", "infinity"):
            object.__setattr__(self, "epsilon", math.inf)

    def validate(self) -> None:
        super().validate()
        eps = self.epsilon
        require(not isinstance(eps, bool) and isinstance(eps, int | float) and not math.isnan(eps) and eps >= 0,
                "method.epsilon", eps, "a number >= 0, or inf")
        choice(self.epsilon_units, "method.epsilon_units", EPSILON_UNITS)
        choice(self.direction, "method.direction", DIRECTIONS)
        choice(self.plan, "method.plan", PLANS)
        choice(self.sinkhorn_method, "method.sinkhorn_method", SINKHORN_METHODS)
        integer(self.sinkhorn_max_iter, "method.sinkhorn_max_iter", lo=1)
        number(self.sinkhorn_tol, "method.sinkhorn_tol", lo=0.0, lo_open=True, allowed="a number > 0", fractions=False)


# ------------------------------------------------------------------------------- transport plans
def cost_matrix(y: torch.Tensor, yhat: torch.Tensor) -> torch.Tensor:
    """M_ij = (y_i - yhat_j)^2 in float64 (what `ot.dist(..., 'sqeuclidean')` gives in 1-D)."""
    y, yhat = y.to(torch.float64).reshape(-1), yhat.to(torch.float64).reshape(-1)
    return (y[:, None] - yhat[None, :]) ** 2


def monotone_plan(y: torch.Tensor, yhat: torch.Tensor) -> PermutationPlan:
    """Exact 1-D OT for a convex cost: the r-th smallest y goes to the r-th smallest yhat."""
    iy = torch.sort(y.to(torch.float64).cpu(), stable=True).indices
    ih = torch.sort(yhat.to(torch.float64).cpu(), stable=True).indices
    perm = torch.empty_like(iy)
    perm[iy] = ih
    return PermutationPlan(perm)


def marginal_error(P: torch.Tensor) -> float:
    """max |P 1 - 1/N|, |P^T 1 - 1/N| (uniform marginals)."""
    n = P.shape[0]
    return float(max((P.sum(1) - 1.0 / n).abs().max(), (P.sum(0) - 1.0 / n).abs().max()))


def stabilized_sinkhorn(M: torch.Tensor, epsilon: float, max_iter: int = 5000, tol: float = 1e-7,
                        factor: float = 0.5, level_iter: int = 200) -> tuple[torch.Tensor, dict[str, Any]]:
    """Sinkhorn with absorption and epsilon scaling (Schmitzer, "Stabilized sparse scaling algorithms
    for entropy regularized transport problems", SIAM J. Sci. Comput. 2019, Algorithms 2-3).

    Plain scaling iterations (matrix-vector products) on the kernel exp((f_i + g_j - M_ij) / eps),
    whose dual potentials f, g absorb the scalings whenever they leave [e^-100, e^100], so nothing
    overflows; eps runs down geometrically (x `factor`) from max(M) to `epsilon`, at most
    `level_iter` iterations per coarser level, each level warm-started from the previous
    potentials. Stops on the POT criterion ||P^T 1 - 1/N||_2 < tol (rows are exact after each
    half-step). Uniform marginals; M is (N, N) float64.
    """
    n = M.shape[0]
    a = torch.full((n,), 1.0 / n, dtype=torch.float64)
    f, g = torch.zeros_like(a), torch.zeros_like(a)
    levels, e = [], max(float(M.max()), epsilon)
    while e > epsilon:
        levels.append(e)
        e *= factor
    levels.append(epsilon)
    total, err = 0, math.inf
    for li, e in enumerate(levels):
        last = li == len(levels) - 1
        K = torch.exp((f[:, None] + g[None, :] - M) / e)
        u, v = torch.ones_like(a), torch.ones_like(a)
        it = 0
        while total < max_iter and (last or it < level_iter):
            v = a / (K.T @ u).clamp_min(1e-300)
            u = a / (K @ v).clamp_min(1e-300)
            total, it = total + 1, it + 1
            if it % 10 == 0 or total == max_iter:
                err = float((v * (K.T @ u) - a).norm())
                if err < tol:
                    break
            if float(u.max()) > 1e100 or float(u.min()) < 1e-100 or float(v.max()) > 1e100 or float(v.min()) < 1e-100:
                f, g = f + e * u.log(), g + e * v.log()  # absorb: the kernel stays representable
                K = torch.exp((f[:, None] + g[None, :] - M) / e)
                u, v = torch.ones_like(a), torch.ones_like(a)
        f, g = f + e * u.log(), g + e * v.log()
        if total >= max_iter:
            break
    P = torch.exp((f[:, None] + g[None, :] - M) / epsilon)
    err = float((P.sum(0) - a).norm())
    return P, {"iterations": total, "levels": len(levels), "err": err}


def _rows_exact(M: torch.Tensor, g: torch.Tensor, eps: float, log_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For column potentials g, the row potentials f that make every row sum exact,
    f_i = eps (log a_i - logsumexp_j (g_j - M_ij) / eps), and the plan P_ij = exp((f_i + g_j - M_ij) / eps)."""
    logits = (g[None, :] - M) / eps
    lse = torch.logsumexp(logits, dim=1)
    return eps * (log_a - lse), torch.exp(logits + (log_a - lse)[:, None])


DENSE_NEWTON_MAX = 4096  # N up to which the Newton system is solved directly (O(N^3), exact), else CG


def _newton_direction(P: torch.Tensor, a: torch.Tensor, r: torch.Tensor, rtol: float,
                      max_cg: int) -> tuple[torch.Tensor, int]:
    """Solve A d = r with A = diag(P^T 1) - P^T diag(1/a) P (minus the semi-dual Hessian times eps:
    PSD, null space the constants, r orthogonal to them).

    N <= DENSE_NEWTON_MAX: directly, on A + 1 1^T mean(diag A) / N (same solution orthogonal to the
    constants, nonsingular), with the diagonal formed as sum_i P_ij (1 - P_ij / a_i) so that a
    near-permutation plan (A tiny and ill-conditioned: weakly coupled chains of points in the tails)
    loses nothing to cancellation; returns (d, 0). Larger N: Jacobi-preconditioned CG, matrix-free
    in the covariance form (A v)_j = sum_i P_ij (v_j - m_i), m = diag(1/a) P v (O(N^2) a step)."""
    Q = P / a[:, None]
    n = P.shape[0]
    diag = (P * (1.0 - Q)).sum(0)
    if n <= DENSE_NEWTON_MAX:
        A = -(P.T @ Q)
        A.diagonal().copy_(diag)
        A += float(diag.mean().clamp_min(1e-300)) / n
        return torch.linalg.solve(A, r), 0

    def apply(v: torch.Tensor) -> tuple[torch.Tensor, float]:
        dev = v[None, :] - (Q @ v)[:, None]
        Pdev = P * dev
        return Pdev.sum(0), float((Pdev * dev).sum())  # A v and v^T A v (a sum of squares: >= 0)

    diag = diag.clamp_min(1e-300)
    d, res = torch.zeros_like(r), r.clone()
    z = res / diag
    q, rz, target, k = z.clone(), float(res @ z), rtol * float(r.norm()), 0
    while k < max_cg:
        k += 1
        Aq, curv = apply(q)
        if not curv > 0:
            break
        step = rz / curv
        d, res = d + step * q, res - step * Aq
        if float(res.norm()) <= target:
            break
        z = res / diag
        rz_new = float(res @ z)
        q, rz = z + (rz_new / rz) * q, rz_new
    return d, k


def newton_sinkhorn(M: torch.Tensor, epsilon: float, max_iter: int = 5000, tol: float = 1e-7,
                    factor: float = 0.5, max_cg: int = 200,
                    g0: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Entropic OT by Newton's method on the semi-dual (Brauer, Clason, Lorenz & Wirth, "A
    Sinkhorn-Newton method for entropic optimal transport", 2017; the semi-dual of Cuturi & Peyre,
    "A smoothed dual approach for variational Wasserstein problems", SIAM J. Imaging Sci. 2016).

    With the row potentials eliminated (rows exact, `_rows_exact`), the dual is the concave function
    S(g) = <a, f(g)> + <b, g> of the column potentials, with gradient b - P^T 1 (the column
    marginal error, POT's stopping quantity) and Hessian -(diag(P^T 1) - P^T diag(1/a) P) / eps.
    Each iteration takes the inexact Newton step (CG, forcing term min(0.5, sqrt(err))) and
    backtracks until S rises (Armijo 1e-4). Where Sinkhorn's linear rate degrades as max(M)/eps
    grows (the stall at the default scale-free epsilon and with heavy-tailed targets), Newton
    converges quadratically near the optimum. epsilon runs down geometrically (x `factor`) from
    max(M) (each level warm-started, solved to max(tol, 1e-3 / N)) so early steps are well
    conditioned. Stops on ||P^T 1 - 1/N||_2 < tol at `epsilon`, or after `max_iter` Newton steps
    over all levels. Uniform marginals; M is (N, N) float64; memory a few N x N arrays.

    `g0`: column potentials to start from at `epsilon` itself, with no scaling levels (e.g. eps
    log v of a run of plain scalings). A poor start can make the Newton matrix singular
    (torch.linalg.LinAlgError): the caller then starts cold.
    """
    n = M.shape[0]
    a = torch.full((n,), 1.0 / n, dtype=torch.float64)
    log_a = a.log()
    levels, e = [], max(float(M.max()), epsilon)
    while g0 is None and e > epsilon:
        levels.append(e)
        e *= factor
    levels.append(epsilon)
    g = torch.zeros_like(a) if g0 is None else g0.to(torch.float64).clone()
    total, cg_total, err = 0, 0, math.inf
    for li, e in enumerate(levels):
        level_tol = tol if li == len(levels) - 1 else max(tol, 1e-3 / n)
        f, P = _rows_exact(M, g, e, log_a)
        while total < max_iter:
            r = a - P.sum(0)
            err = float(r.norm())
            if err < level_tol:
                break
            d, k = _newton_direction(P, a, r, min(0.5, math.sqrt(err)), max_cg)
            d = e * d
            cg_total, total = cg_total + k, total + 1
            S0, slope, t = float(a @ f + a @ g), float(r @ d), 1.0
            while True:  # backtracking on the concave semi-dual
                f_new, P_new = _rows_exact(M, g + t * d, e, log_a)
                # Armijo on S, or (near the optimum, where S changes below float64 resolution)
                # a smaller marginal error
                if (float(a @ f_new + a @ (g + t * d)) >= S0 + 1e-4 * t * slope
                        or float((a - P_new.sum(0)).norm()) < (1 - 1e-4 * t) * err or t < 1e-10):
                    break
                t *= 0.5
            g, f, P = g + t * d, f_new, P_new
        if total >= max_iter:
            break
    err = float((P.sum(0) - a).norm())
    return P, {"iterations": total, "levels": len(levels), "err": err, "cg_iterations": cg_total}


def plain_will_converge(errors: list[float], tol: float, budget: int, every: int = 10) -> bool:
    """Whether plain Sinkhorn, whose column-marginal errors at iterations 0, every, 2 every, ...
    are `errors`, is predicted to reach `tol` within `budget` iterations in all.

    Sinkhorn converges linearly, but on heavy-tailed 1-D costs its rate itself decays (MLPNet at
    the default epsilon: error ~ t^-0.65, 1.4e-4 at 10 iterations, 3.3e-5 at 90, 4.9e-6 at 1,000),
    so a constant-rate (geometric) extrapolation from the probe is too hopeful there (it predicts
    ~450 iterations). The rule: measure the rate (decrease of log error per iteration) over two
    successive windows [t/4, t/2] and [t/2, t] of the probe, let it keep shrinking by the same factor
    q <= 1 for each later window of doubled length, and predict convergence when the extrapolated
    log error reaches log(tol) by `budget`. q = 1 is the geometric model; a rate that does not fall
    (no progress in the last window) predicts no convergence."""
    if len(errors) < 5 or not all(math.isfinite(e) and e > 0 for e in errors):
        return False
    jc = len(errors) - 1
    jb, ja = jc // 2, jc // 4
    r_late = math.log(errors[jb] / errors[jc]) / (every * (jc - jb))
    if not r_late > 0:
        return False
    r_early = math.log(errors[ja] / errors[jb]) / (every * (jb - ja))
    q = min(1.0, r_late / r_early) if r_early > 0 else 1.0
    t, rate, gap = every * jc, r_late, math.log(errors[jc] / tol)
    while gap > 0 and t < budget:
        rate *= q
        step = min(t, budget - t)  # the next window doubles t (the last one is cut at the budget)
        gap, t = gap - rate * step, t + step
    return gap <= 0


def sinkhorn_plan(y: torch.Tensor, yhat: torch.Tensor, epsilon: float, method: str = "auto",
                  max_iter: int = 5000, tol: float = 1e-7) -> tuple[DensePlan, dict[str, Any]]:
    """Entropic OT plan between uniform marginals on the 1-D squared cost: POT's Sinkhorn, the
    semi-dual Newton iterations of `newton_sinkhorn`, or the stabilized epsilon-scaling iterations
    of `stabilized_sinkhorn`.

    `auto` runs the plain scalings (fast where they converge: tens of iterations) for
    `AUTO_PROBE_ITER` iterations. When they have not met `tol` by then, `plain_will_converge`
    decides from their error history: plain again from the start (the same iterates as one plain
    run, so the plan is POT's, unchanged) for at most `AUTO_PLAIN_ITER` iterations, or Newton at
    once. Newton starts from the plain potentials (warm; a few steps) and, if that start fails,
    runs its own epsilon scaling (cold); after an overflow it starts cold. The row records the
    plain, Newton and CG iteration counts, why it switched (`sinkhorn_switch`: none, overflow,
    stall predicted at the probe, or the plain cap reached) and how Newton started."""
    import ot

    t0 = time.perf_counter()
    if not epsilon > 0 or math.isinf(epsilon):
        raise ValueError(f"epsilon={epsilon} must be finite and > 0 for Sinkhorn")
    choice(method, "method.sinkhorn_method", SINKHORN_METHODS)
    Mt = cost_matrix(y, yhat).cpu()
    # numpy arrays: POT's numpy backend runs the log-domain iterations several times faster
    # than its torch backend on CPU, and N <= a few thousand
    M = Mt.numpy()
    n = M.shape[0]
    a = np.full(n, 1.0 / n)
    extra: dict[str, Any] = {"sinkhorn_levels": 1}

    def run(name: str, budget: int, g0: torch.Tensor | None = None,
            stop: float | None = None) -> tuple[torch.Tensor, int, dict[str, Any]]:
        if name in ("stabilized", "newton"):
            kw = {"g0": g0} if g0 is not None else {}
            P, log = (stabilized_sinkhorn if name == "stabilized" else newton_sinkhorn)(Mt, epsilon, budget,
                                                                                        stop or tol, **kw)
            extra["sinkhorn_levels"] = log["levels"]
            return P, log["iterations"], log
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            P, log = ot.sinkhorn(a, a, M, epsilon, method=name, numItermax=budget, stopThr=tol, log=True, warn=False)
        niter = log.get("niter")
        return torch.from_numpy(np.asarray(P, dtype=np.float64)), int(niter) + 1 if niter is not None else -1, log

    def column_error(P: torch.Tensor) -> float:
        return float((P.sum(0) - 1.0 / n).norm()) if bool(torch.isfinite(P).all()) else math.inf

    if method != "auto":
        P, iters, log = run(method, max_iter)
        if "cg_iterations" in log:
            extra["sinkhorn_cg_iterations"] = log["cg_iterations"]
        chosen = method
    else:
        chosen, P, iters, extra = _auto_plan(run, column_error, min(max_iter, AUTO_PLAIN_ITER), max_iter, tol,
                                             epsilon, extra)
    col_err = column_error(P)
    info = {"sinkhorn_method": chosen, "sinkhorn_iterations": iters, "sinkhorn_converged": col_err < tol, **extra,
            "marginal_error": marginal_error(P), "marginal_error_rel": n * marginal_error(P),
            "cost_max_over_epsilon": float(M.max()) / epsilon,
            "sinkhorn_seconds": round(time.perf_counter() - t0, 4)}  # plan_seconds adds the stage's setup
    return DensePlan(P), info


def _auto_plan(run: Any, column_error: Any, plain_budget: int, max_iter: int, tol: float, epsilon: float,
               extra: dict[str, Any]) -> tuple[str, torch.Tensor, int, dict[str, Any]]:
    """`sinkhorn_method: auto` (see `sinkhorn_plan`): (method, plan, its iterations, record fields)."""
    probe = min(plain_budget, AUTO_PROBE_ITER)
    P, iters, log = run("sinkhorn", probe)
    plain = max(iters, 0)
    # POT stops early either on convergence (column-marginal L2 error < tol) or when the scalings
    # overflow (it then returns the last finite iterate, whose marginals are off)
    converged = column_error(P) < tol
    overflow = 0 <= iters < probe and not converged
    if converged:
        extra.update(sinkhorn_plain_iterations=plain, sinkhorn_switch="none")
        return "sinkhorn", P, iters, extra
    reason = "overflow" if overflow else "stall"
    if not overflow and plain_budget > probe and plain_will_converge(log.get("err", []), tol, plain_budget):
        P, iters, log = run("sinkhorn", plain_budget)  # from the start: one plain run's iterates
        plain += max(iters, 0)
        if column_error(P) < tol:
            extra.update(sinkhorn_plain_iterations=plain, sinkhorn_switch="none")
            return "sinkhorn", P, iters, extra
        overflow = 0 <= iters < plain_budget
        reason = "overflow" if overflow else "plain_cap"
    extra.update(sinkhorn_plain_iterations=plain, sinkhorn_switch=reason)  # `run` writes the levels here too
    newton, cg, start, left = 0, 0, "cold", max_iter - plain
    if left <= 0:
        return "sinkhorn", P, iters, extra
    v = torch.from_numpy(np.asarray(log.get("v", np.zeros(1)), dtype=np.float64))
    if not overflow and bool((v > 0).all()) and bool(torch.isfinite(v).all()):
        try:
            # past tol (one or two more quadratic steps): the plan is then the optimum's, not the
            # start's, so it is the same for any nearby start (rescaled targets, y from G w or G^T)
            Pw, it, wlog = run("newton", min(left, WARM_NEWTON_ITER), epsilon * v.log(), max(tol * 1e-3, 1e-13))
            newton, cg = it, wlog["cg_iterations"]
            if column_error(Pw) < tol:
                P, start = Pw, "warm"
        except torch.linalg.LinAlgError:  # a start with (numerically) disconnected mass
            pass
    if start == "cold" and left - newton > 0:
        P, it, clog = run("newton", left - newton)
        newton, cg = newton + it, cg + clog["cg_iterations"]
    extra.update(sinkhorn_newton_start=start, sinkhorn_cg_iterations=cg)
    return "newton", P, newton, extra


def transport_plan(y: torch.Tensor, yhat: torch.Tensor, cfg: Config) -> tuple[Plan, dict[str, Any]]:
    """The plan of `cfg` for targets y and predictions yhat, with what to log about it."""
    n = int(y.numel())
    if cfg.plan == "identity":
        plan: Plan = IdentityPlan(n)
        info: dict[str, Any] = {"plan": "identity", "epsilon_used": 0.0}
    elif cfg.epsilon == 0:
        plan, info = monotone_plan(y, yhat), {"plan": "monotone", "epsilon_used": 0.0}
    elif math.isinf(cfg.epsilon):
        plan, info = UniformPlan(n), {"plan": "uniform", "epsilon_used": math.inf}
    else:
        eps = float(cfg.epsilon)
        if cfg.epsilon_units == "median":
            eps *= float(cost_matrix(y, yhat).median())
            if not eps > 0:
                raise ConfigError("method.epsilon_units", "median", "raw", "gives epsilon = 0 (median cost is 0)")
        plan, info = sinkhorn_plan(y, yhat, eps, cfg.sinkhorn_method, cfg.sinkhorn_max_iter, cfg.sinkhorn_tol)
        info = {"plan": "sinkhorn", "epsilon_used": eps, **info}
    info["plan_entropy"] = plan.entropy()
    return plan, info


# ----------------------------------------------------------------------------------------- prune
def prune(problem: PruningProblem, sparsity: float, cfg: Config) -> PruneResult:
    t0 = time.perf_counter()
    op, k, w_bar, y = regression_problem(problem, sparsity, cfg, "swap")
    yhat = op.matvec(problem.w)
    plan, plan_info = transport_plan(y, yhat, cfg)
    t_plan = time.perf_counter() - t0
    res = solve(op, y, w_bar, problem.w, k, plan, cfg, direction=cfg.direction)
    info = solve_info(res, k, cfg.algorithm, time.perf_counter() - t0)
    info.update(plan_info)
    info.update(direction=cfg.direction, epsilon=float(cfg.epsilon), plan_seconds=round(t_plan, 4))
    return PruneResult(w=res.w, mask=res.mask, info=info)
