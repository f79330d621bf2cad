"""SWAP / EWR (pruning/methods/swap.py): transport plans against independent references, the EWR
objective and directions against dense formulas and autograd, the reduction to `lr` with the plan
I/N, and the embedded digits comparison with magnitude pruning."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch

from pruning import methods
from pruning.errors import ConfigError
from pruning.gradients import split_blocks
from pruning.layout import ParamLayout, num_kept
from pruning.methods import lr, swap
from pruning.methods.base import PruningProblem
from pruning.sparse_regression import (
    DenseOperator,
    DensePlan,
    IdentityPlan,
    PlanRegression,
    SolverConfig,
    solve,
)
from pruning.task import run


def make_problem(N: int = 40, p: int = 300, seed: int = 0):
    """A random regression problem whose data term matters (as in test_lr)."""
    g = torch.Generator().manual_seed(seed)
    layout = ParamLayout(("a", "b"), ((p // 3,), (p - p // 3,)))
    G = torch.randn(N, p, generator=g, dtype=torch.float64)
    G = G * (1.0 + torch.arange(p, dtype=torch.float64) % 7 / 3.0)
    w_bar = torch.randn(p, generator=g, dtype=torch.float64)
    return layout, G, split_blocks(G, layout, 64, torch.arange(N).view(N, 1)), w_bar


def lr_problem(layout, Gm, w_bar, w=None):
    return PruningProblem(layout=layout, w=w_bar.clone() if w is None else w, w_bar=w_bar,
                          mask=torch.ones_like(w_bar, dtype=torch.bool), grads=Gm)


def points(n: int = 50, seed: int = 0, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = scale * torch.randn(n, generator=g, dtype=torch.float64)
    yhat = y + 0.5 * scale * torch.randn(n, generator=g, dtype=torch.float64)
    return y, yhat


def brute_q(G, y, w_bar, w, P, lam):
    """(N/2) sum_ij P_ij (y_i - (G w)_j)^2 + (N lam / 2)||w - w_bar||^2, with the N x N cost."""
    N = G.shape[0]
    yhat = G @ w
    return 0.5 * N * (P * (y[:, None] - yhat[None, :]) ** 2).sum() + 0.5 * N * lam * ((w - w_bar) ** 2).sum()


# ---------------------------------------------------------------------------------------- plans
def clusters(n: int = 40, seed: int = 0, gap: float = 30.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets split 20 / 20 and predictions 30 / 10 between two clusters `gap` apart: mass must
    cross the gap at cost ~gap^2, so exp(-M / eps) underflows for small eps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    y[: n // 2] += gap
    yhat = torch.randn(n, generator=g, dtype=torch.float64)
    yhat[: 3 * n // 4] += gap
    return y, yhat


@pytest.mark.parametrize("pts,eps,log_domain", [
    ("gauss", 10.0, False), ("gauss", 1.0, False), ("gauss", 0.1, True),
    ("clusters", 50.0, False), ("clusters", 3.0, True), ("clusters", 1.0, True), ("clusters", 0.5, True)])
def test_sinkhorn_marginals_and_gibbs_form(pts, eps, log_domain):
    y, yhat = points() if pts == "gauss" else clusters()
    M = swap.cost_matrix(y, yhat)
    plan, info = swap.sinkhorn_plan(y, yhat, eps, max_iter=50000, tol=1e-10)
    # auto: the plain iterations unless they overflow (large max(M)/eps with mass crossing the gap)
    # or their progress test predicts no convergence within AUTO_PLAIN_ITER (gauss 0.1 at tol 1e-10:
    # plain needs 790, its rate falls over the probe; clusters 3.0: the error stays at 9e-2 for ~400
    # iterations before the mass crosses the gap), then semi-dual Newton
    assert (info["sinkhorn_method"] == "newton") == log_domain
    assert info["sinkhorn_converged"] and info["sinkhorn_iterations"] < 50000
    assert info["cost_max_over_epsilon"] == pytest.approx(float(M.max()) / eps)
    P = plan.dense()
    n = P.shape[0]
    assert bool(torch.isfinite(P).all()) and bool((P >= 0).all())
    assert float((P.sum(1) - 1 / n).abs().max()) < 1e-6
    assert float((P.sum(0) - 1 / n).abs().max()) < 1e-6
    # entropic OT optimality (independent of the solver): log P + M / eps = f_i + g_j
    ok = P > 1e-280
    L = torch.where(ok, P.log() + M / eps, torch.zeros_like(P))
    i0 = int(ok.sum(1).argmax())           # a row with every entry representable
    assert bool(ok[i0].all())
    f = L[:, :] - L[i0][None, :]           # = f_i - f_i0 wherever ok
    spread = torch.where(ok, f, torch.nan)
    dev = (spread - spread.nanmean(1, keepdim=True)).abs()
    assert float(torch.nan_to_num(dev).max()) < 1e-6 * max(1.0, float(M.max()) / eps)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_plain_sinkhorn_breaks_down_where_the_log_domain_is_used():
    """The case the fallback is for: the plain scalings overflow; auto falls back to Newton, and
    the stabilized iterations reach the same plan too."""
    y, yhat = clusters()
    eps = 1.0
    a = np.full(40, 1 / 40)
    with pytest.warns(UserWarning):
        P = ot.sinkhorn(a, a, swap.cost_matrix(y, yhat).numpy(), eps, method="sinkhorn", numItermax=20000)
    assert not np.isfinite(P).all() or np.abs(P.sum(0) - 1 / 40).max() > 1e-6
    plan, info = swap.sinkhorn_plan(y, yhat, eps, method="sinkhorn")
    assert info["sinkhorn_method"] == "sinkhorn" and info["marginal_error"] > 1e-6
    plan, info = swap.sinkhorn_plan(y, yhat, eps, method="auto", max_iter=50000, tol=1e-10)
    assert info["sinkhorn_method"] == "newton" and info["marginal_error"] < 1e-6
    stab, info = swap.sinkhorn_plan(y, yhat, eps, method="stabilized", max_iter=50000, tol=1e-10)
    assert info["sinkhorn_converged"] and torch.allclose(plan.dense(), stab.dense(), rtol=0, atol=1e-8)
    # the log domain (POT) reaches the same plan
    ref, _ = swap.sinkhorn_plan(y, yhat, eps, method="sinkhorn_log", max_iter=50000, tol=1e-10)
    assert torch.allclose(plan.dense(), ref.dense(), rtol=0, atol=1e-8)


def test_epsilon_zero_is_the_monotone_matching():
    y, yhat = points(40, seed=2)
    cfg = swap.Config(epsilon=0.0)
    plan, info = swap.transport_plan(y, yhat, cfg)
    assert info["plan"] == "monotone"
    P = plan.dense()
    # a permutation / N
    assert bool(((P == 0) | (P == 1 / 40)).all())
    assert torch.equal((P > 0).sum(0), torch.ones(40, dtype=torch.long))
    assert torch.equal((P > 0).sum(1), torch.ones(40, dtype=torch.long))
    # the r-th smallest y is matched to the r-th smallest yhat
    rows, cols = P.nonzero(as_tuple=True)
    assert torch.equal(torch.argsort(torch.argsort(y[rows])), torch.argsort(torch.argsort(yhat[cols])))
    # and it is the exact OT plan (network simplex, independent)
    a = np.full(40, 1 / 40)
    P_emd = ot.emd(a, a, swap.cost_matrix(y, yhat).numpy())
    assert np.allclose(P.numpy(), P_emd, atol=1e-12)
    assert info["plan_entropy"] == pytest.approx(math.log(40))


def test_epsilon_inf_is_uniform_and_the_limit_of_sinkhorn():
    y, yhat = points(30)
    plan, info = swap.transport_plan(y, yhat, swap.Config(epsilon=math.inf))
    assert info["plan"] == "uniform"
    assert torch.allclose(plan.dense(), torch.full((30, 30), 1 / 900, dtype=torch.float64), rtol=0, atol=1e-18)
    assert info["plan_entropy"] == pytest.approx(2 * math.log(30))
    big, _ = swap.sinkhorn_plan(y, yhat, 1e8)
    assert torch.allclose(big.dense(), plan.dense(), rtol=1e-6)
    assert swap.Config(epsilon="inf").epsilon == math.inf  # the string form from YAML / CLI


# ------------------------------------------------------------------------------ the EWR objective
@pytest.mark.parametrize("kind", ["sinkhorn", "monotone", "uniform", "identity"])
def test_objective_and_directions_match_dense_formulas(kind):
    layout, G, Gm, w_bar = make_problem(N=30, p=90)
    g = torch.Generator().manual_seed(5)
    w = w_bar * (torch.rand(90, generator=g, dtype=torch.float64) > 0.5)
    y, yhat = G @ w_bar, G @ w
    lam = 0.01
    cfg = {"sinkhorn": swap.Config(epsilon=float(swap.cost_matrix(y, yhat).median()), epsilon_units="raw"),
           "monotone": swap.Config(epsilon=0.0), "uniform": swap.Config(epsilon=math.inf),
           "identity": swap.Config(plan="identity")}[kind]
    plan, _ = swap.transport_plan(y, yhat, cfg)
    P = plan.dense()
    obj = PlanRegression(y, w_bar, lam, plan, "gradient")
    op = DenseOperator(G)
    assert obj.value(w, op.matvec(w)) == pytest.approx(float(brute_q(G, y, w_bar, w, P, lam)), rel=1e-10)
    # exact gradient == autograd of the brute-force objective
    wr = w.clone().requires_grad_(True)
    brute_q(G, y, w_bar, wr, P, lam).backward()
    assert torch.allclose(obj.direction_vec(op, w, op.matvec(w)), wr.grad, rtol=1e-9, atol=1e-9)
    # the paper-era direction G^T (N P)(G w - y) + N lam (w - w_bar)
    paper = PlanRegression(y, w_bar, lam, plan, "paper")
    N = G.shape[0]
    ref = G.T @ (N * P @ (G @ w - y)) + N * lam * (w - w_bar)
    assert torch.allclose(paper.direction_vec(op, w, op.matvec(w)), ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("direction,eps_factor,algorithm", [
    ("paper", 0.01, "iht"), ("paper", 0.01, "active_iht"), ("gradient", 0.1, "active_iht"),
    ("gradient", 1.0, "iht")])
def test_swap_objective_never_increases(direction, eps_factor, algorithm):
    layout, G, Gm, w_bar = make_problem()
    g = torch.Generator().manual_seed(1)
    w = w_bar + 0.3 * torch.randn(300, generator=g, dtype=torch.float64)  # so that y != yhat
    problem = lr_problem(layout, Gm, w_bar, w)
    y = G @ w_bar
    eps = eps_factor * float(swap.cost_matrix(y, G @ w).median())
    cfg = swap.Config(lam=1e-3, epsilon=eps, epsilon_units="raw", direction=direction, ftol=0.0, max_iter=200,
                      algorithm=algorithm)
    res = swap.prune(problem, 0.9, cfg)
    hist = res.info["history"]
    # the paper direction is not a gradient of Q_OT: it stops once <grad Q, d_S> <= 0 (here after
    # a step); the exact gradient keeps descending
    assert res.info["iterations"] >= 1
    if direction == "paper":
        assert res.info["stop"] == "no_descent"
    else:
        assert len(hist) > 5
    for a, b in zip(hist, hist[1:]):
        assert b <= a * (1 + 1e-12) + 1e-12
    assert res.info["plan"] == "sinkhorn" and res.info["direction"] == direction
    assert int(res.mask.sum()) == num_kept(300, 0.9)
    assert bool((res.w[~res.mask] == 0).all())
    plan, _ = swap.transport_plan(y, G @ w, cfg)
    assert res.info["objective"] == pytest.approx(float(brute_q(G, y, w_bar, res.w, plan.dense(), 1e-3)), rel=1e-9)


# ------------------------------------------------------------------------- reduction to lr (I/N)
@pytest.mark.parametrize("algorithm", ["iht", "active_iht", "backsolve"])
def test_swap_with_identity_plan_is_lr(algorithm):
    layout, G, Gm, w_bar = make_problem()
    g = torch.Generator().manual_seed(7)
    w = w_bar * (torch.rand(300, generator=g, dtype=torch.float64) > 0.3)
    kw = {"lam": 1e-3, "algorithm": algorithm, "ftol": 0.0, "max_iter": 50}
    shared = {"drop_zero_columns": False, "support_steps": "gradient", "finish": "none"}  # lr turns these on
    a = lr.prune(lr_problem(layout, Gm, w_bar, w.clone()), 0.9, lr.Config(**kw, **shared))
    b = swap.prune(lr_problem(layout, Gm, w_bar, w.clone()), 0.9, swap.Config(plan="identity", **kw))
    assert a.info["history"] == b.info["history"]  # step for step
    assert torch.equal(a.w, b.w) and torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("direction", ["paper", "gradient"])
@pytest.mark.parametrize("algorithm", ["iht", "active_iht"])
def test_dense_plan_eye_over_n_matches_lr_step_for_step(direction, algorithm):
    """The general (dense-plan) code path with Pi = I/N gives lr's iterates."""
    layout, G, Gm, w_bar = make_problem()
    g = torch.Generator().manual_seed(8)
    w0 = w_bar * (torch.rand(300, generator=g, dtype=torch.float64) > 0.3)
    y = G @ w_bar
    k = num_kept(300, 0.9)
    cfg = SolverConfig(lam=1e-3, algorithm=algorithm, ftol=0.0, max_iter=40)
    a = solve(Gm, y, w_bar, w0, k, IdentityPlan(40), cfg, "gradient")
    b = solve(Gm, y, w_bar, w0, k, DensePlan(torch.eye(40, dtype=torch.float64) / 40), cfg, direction)
    assert len(a.history) == len(b.history)
    assert np.allclose(a.history, b.history, rtol=1e-10)
    assert torch.equal(a.mask, b.mask)
    assert torch.allclose(a.w, b.w, rtol=1e-8, atol=1e-10)


def test_config_errors_name_key_and_allowed_values():
    with pytest.raises(ConfigError, match="method.direction.*paper, gradient"):
        methods.make_config("swap", {"direction": "newton"})
    with pytest.raises(ConfigError, match="method.epsilon"):
        methods.make_config("swap", {"epsilon": -1.0})
    with pytest.raises(ConfigError, match="method.sinkhorn_method.*sinkhorn_log"):
        methods.make_config("swap", {"sinkhorn_method": "greenkhorn"})
    cfg = methods.make_config("swap", {"name": "swap", "epsilon": ".inf"})
    assert cfg.epsilon == math.inf and cfg.lam == 0.01 and cfg.direction == "paper"


# ----------------------------------------------------------------- scale-free epsilon, no_progress
def test_default_epsilon_is_scale_free():
    cfg = swap.Config()
    assert (cfg.epsilon, cfg.epsilon_units) == (0.01, "median")
    assert methods.make_config("swap", {}).epsilon_units == "median"  # the YAML default agrees
    y, yhat = points(40, seed=3)
    plans = []
    for scale in (1e-3, 1.0, 1e3):
        plan, info = swap.transport_plan(scale * y, scale * yhat, cfg)
        M = swap.cost_matrix(scale * y, scale * yhat)
        assert info["epsilon_used"] == pytest.approx(0.01 * float(M.median()), rel=1e-12)
        plans.append(plan.dense())
    # rescaling the targets leaves the plan unchanged (raw units would not: see below)
    assert torch.allclose(plans[0], plans[1], atol=1e-9) and torch.allclose(plans[2], plans[1], atol=1e-9)
    raw = [swap.transport_plan(sc * y, sc * yhat, swap.Config(epsilon=1.0, epsilon_units="raw"))[1]["plan_entropy"]
           for sc in (1e-3, 1e3)]
    assert raw[0] == pytest.approx(2 * math.log(40), rel=1e-6) and raw[1] < 1.05 * math.log(40)
    # between the permutation (log N) and the uniform plan (2 log N), far from both
    H = swap.transport_plan(y, yhat, cfg)[1]["plan_entropy"]
    assert 1.1 * math.log(40) < H < 1.9 * math.log(40)


@pytest.mark.parametrize("method", ["lr", "swap"])
def test_no_progress_flag_when_the_solver_returns_its_start(method):
    """From the dense anchor, H_k(w_bar) (magnitude pruning) is the start; with max_iter = 0 and no
    data term to follow (G w_bar = y: the first IHT step is H_k(w_bar) again) the solver returns it."""
    layout, G, Gm, w_bar = make_problem()
    module = {"lr": lr, "swap": swap}[method]
    # lr's default exact backsolve on the final support would move off the start: off here
    cfg = module.Config(lam=1e-3, algorithm="iht", max_iter=0, **({"finish": "none"} if method == "lr" else {}))
    res = module.prune(lr_problem(layout, Gm, w_bar), 0.9, cfg)
    magnitude = w_bar * (w_bar.abs() >= w_bar.abs().topk(num_kept(300, 0.9)).values.min())
    assert torch.equal(res.w, magnitude)
    assert res.info["no_progress"] is True and res.info["no_progress_reason"] == "no_step"
    res = module.prune(lr_problem(layout, Gm, w_bar), 0.9, module.Config(lam=1e-3))
    assert res.info["no_progress"] is False and "no_progress_reason" not in res.info
    assert not torch.equal(res.w, magnitude)


@pytest.mark.parametrize("method", ["lr", "swap"])
def test_no_pruning_asked_is_not_flagged_as_no_progress(method):
    """k = p (SWAP's first stage, s_0 = 0): the anchor is the minimiser, so staying put is no failure."""
    layout, G, Gm, w_bar = make_problem()
    module = {"lr": lr, "swap": swap}[method]
    res = module.prune(lr_problem(layout, Gm, w_bar), 0.0, module.Config(lam=1e-3))
    assert "no_progress" not in res.info and int(res.mask.sum()) == w_bar.numel()


def test_near_uniform_plan_stops_at_magnitude_and_says_so():
    """The reported bug: with a plan close to uniform (epsilon = inf here; epsilon = 1 raw on
    targets ~1e-2), the paper direction has no descent from H_k(w_bar): the result is magnitude
    pruning, flagged no_progress / no_descent; the scale-free default moves off it."""
    layout, G, Gm, w_bar = make_problem()
    magnitude = w_bar * (w_bar.abs() >= w_bar.abs().topk(num_kept(300, 0.9)).values.min())
    res = swap.prune(lr_problem(layout, Gm, w_bar), 0.9, swap.Config(lam=1e-3, epsilon=math.inf))
    if res.info["no_progress"]:
        assert torch.equal(res.w, magnitude) and res.info["no_progress_reason"] == "no_descent"
    else:  # a descent can exist for this random G; then the result is not magnitude
        assert not torch.equal(res.w, magnitude)
    res = swap.prune(lr_problem(layout, Gm, w_bar), 0.9, swap.Config(lam=1e-3))
    assert res.info["no_progress"] is False and not torch.equal(res.w, magnitude)
    assert res.info["objective"] < res.info["objective_start"]


@pytest.mark.parametrize("method,eps,cap", [("auto", 0.1, 5000), ("stabilized", 0.1, 5000),
                                            ("stabilized", 0.01, 50000)])
def test_sinkhorn_converges_below_cap(method, eps, cap):
    """Median-scaled epsilon on Gaussian targets: marginals met before the iteration cap, and the
    plan is the log domain's (independent solver). At the default 0.01 the plain iterations stall
    at a relative marginal error ~4e-5 and the stabilized ones need ~35k iterations (N = 200)."""
    y, yhat = points(200, seed=6)
    cfg = swap.Config(sinkhorn_method=method, epsilon=eps, sinkhorn_max_iter=cap)
    plan, info = swap.transport_plan(y, yhat, cfg)
    assert info["sinkhorn_converged"] and info["sinkhorn_iterations"] < cfg.sinkhorn_max_iter
    P = plan.dense()
    assert float((P.sum(0) - 1 / 200).norm()) < cfg.sinkhorn_tol
    assert float((P.sum(1) - 1 / 200).abs().max()) < 1e-6 / 200
    ref, _ = swap.sinkhorn_plan(y, yhat, info["epsilon_used"], method="sinkhorn_log", max_iter=100000, tol=1e-10)
    assert torch.allclose(P, ref.dense(), rtol=0, atol=1e-7)  # entries up to ~1 / 200


@pytest.mark.parametrize("tol", [1e-7, 1e-9])
def test_sinkhorn_converges_below_cap_with_heavy_tails(tol):
    """Heavy-tailed targets (a few far outliers, max(M)/eps ~ 3e6 at the default scale-free
    epsilon, as y = G w_bar on MLPNet with gradient noise): the scaling iterations (plain and
    stabilized) stall at their cap; auto's Newton fallback meets the marginals in tens of steps."""
    g = torch.Generator().manual_seed(4)
    y = torch.randn(200, generator=g, dtype=torch.float64) * 0.3
    y[:5] = torch.tensor([30.0, -25.0, 18.0, 12.0, -9.0], dtype=torch.float64)
    yhat = 0.9 * y + 0.05 * torch.randn(200, generator=g, dtype=torch.float64)
    cfg = swap.Config(sinkhorn_tol=tol, sinkhorn_max_iter=5000)
    plan, info = swap.transport_plan(y, yhat, cfg)
    assert info["sinkhorn_method"] == "newton" and info["sinkhorn_converged"] and info["sinkhorn_iterations"] < 200
    P = plan.dense()
    assert float((P.sum(1) - 1 / 200).abs().max()) < 1e-12 and float((P.sum(0) - 1 / 200).norm()) < tol
    # the same plan as the log domain (independent solver)
    ref, _ = swap.sinkhorn_plan(y, yhat, info["epsilon_used"], method="sinkhorn_log", max_iter=100000, tol=1e-11)
    assert torch.allclose(P, ref.dense(), rtol=0, atol=1e-7)


def test_progress_test_of_the_plain_iterations():
    """Geometric decrease: converges when the budget allows; a rate that decays like a power law
    (MLPNet's stall, error ~ t^-0.65) or no progress: predicted not to."""
    geometric = [1e-2 * 0.8 ** j for j in range(10)]  # per 10 iterations, checks at 0 ... 90
    need = 90 + 10 * math.log(1e-7 / geometric[-1]) / math.log(0.8)  # ~ 480 iterations
    assert swap.plain_will_converge(geometric, 1e-7, 1000) and not swap.plain_will_converge(geometric, 1e-7, int(need) - 50)
    power = [1e-3 * (10 * j + 10) ** -0.65 for j in range(10)]
    assert not swap.plain_will_converge(power, 1e-7, 1000)
    assert not swap.plain_will_converge([9e-2] * 10, 1e-7, 1000)  # no progress
    assert not swap.plain_will_converge([1e-2, 5e-3], 1e-7, 1000)  # too short a history to judge


def test_auto_switches_to_newton_after_the_probe_on_a_stall():
    """Gaussian targets at 0.01 x median (N = 200): the plain scalings are still at a relative error
    ~2e-2 after 1,000 iterations. auto stops them after the probe and Newton, warm-started from
    their potentials, meets the marginals in a few steps, with the plan of Newton from the start."""
    y, yhat = points(200, seed=6)
    eps = 0.01 * float(swap.cost_matrix(y, yhat).median())
    plan, info = swap.sinkhorn_plan(y, yhat, eps)
    assert info["sinkhorn_switch"] == "stall" and info["sinkhorn_plain_iterations"] == swap.AUTO_PROBE_ITER
    assert info["sinkhorn_method"] == "newton" and info["sinkhorn_newton_start"] == "warm"
    assert info["sinkhorn_converged"] and info["sinkhorn_iterations"] < 30 and info["sinkhorn_levels"] == 1
    cold, cinfo = swap.sinkhorn_plan(y, yhat, eps, method="newton")
    assert cinfo["sinkhorn_converged"] and cinfo["sinkhorn_levels"] > 1
    assert torch.allclose(plan.dense(), cold.dense(), rtol=0, atol=1e-7)  # entries ~1 / 200
    # a warm start that cannot be used (mass not yet across the gap: singular Newton matrix) starts cold
    y, yhat = clusters()
    plan, info = swap.sinkhorn_plan(y, yhat, 3.0, max_iter=50000, tol=1e-10)
    assert info["sinkhorn_switch"] == "stall" and info["sinkhorn_newton_start"] == "cold"
    assert info["sinkhorn_converged"] and info["sinkhorn_levels"] > 1


@pytest.mark.parametrize("rel,plain", [(1.0, 21), (0.1, 301)])
def test_auto_keeps_the_plain_plan_where_it_converges(rel, plain):
    """Where plain Sinkhorn converges (within the probe, or predicted to within AUTO_PLAIN_ITER and
    then run again from the start), auto's plan is POT's, bit for bit."""
    y, yhat = points(200, seed=6)
    M = swap.cost_matrix(y, yhat)
    eps = rel * float(M.median())
    plan, info = swap.sinkhorn_plan(y, yhat, eps)
    assert info["sinkhorn_method"] == "sinkhorn" and info["sinkhorn_switch"] == "none" and info["sinkhorn_converged"]
    assert info["sinkhorn_iterations"] == plain
    assert info["sinkhorn_plain_iterations"] == plain + (swap.AUTO_PROBE_ITER if plain > swap.AUTO_PROBE_ITER else 0)
    a = np.full(200, 1 / 200)
    ref = ot.sinkhorn(a, a, M.numpy(), eps, numItermax=swap.AUTO_PLAIN_ITER, stopThr=1e-7)
    assert np.array_equal(plan.dense().numpy(), ref)


def test_swap_beats_magnitude_on_digits(make_cfg, tmp_path, capsys):
    """One-shot 90% on the embedded digits MLP. Its per-sample targets y = G w_bar are ~1e-2, so the
    reference epsilon = 1 (raw cost units) gives a uniform plan: the paper direction finds no descent
    and the result is magnitude pruning, now flagged and warned; the scale-free default prunes."""
    accs, stages = {}, {}
    for name, method, extra in (("magnitude", "magnitude", []), ("swap", "swap", []),
                                ("raw1", "swap", ["method.epsilon=1", "method.epsilon_units=raw"])):
        rec = run(make_cfg(f"method={method}", "sparsity=0.9", *extra), tmp_path / name)
        accs[name] = rec["metrics"]["final_acc"]
        stages[name] = rec["stages"][0]
        assert rec["metrics"]["sparsity_prunable"] == pytest.approx(0.9, abs=1e-4)
    stage = stages["swap"]
    assert stage["plan"] == "sinkhorn" and stage["direction"] == "paper" and stage["no_progress"] is False
    assert stage["epsilon_used"] > 0 and "sinkhorn_converged" in stage and stage["sinkhorn_iterations"] >= 1
    assert stage["objective"] <= stage["objective_start"]
    assert math.log(64) <= stage["plan_entropy"] <= 2 * math.log(64)
    assert accs["swap"] > accs["magnitude"], accs
    raw = stages["raw1"]
    assert raw["no_progress"] is True and raw["no_progress_reason"] == "no_descent"
    assert accs["raw1"] == accs["magnitude"]
    assert "warning: stage 1: swap made no progress" in capsys.readouterr().out


def test_an_unconverged_plan_is_warned_and_recorded(make_cfg, tmp_path, capsys):
    """Plain Sinkhorn at a tiny raw epsilon overflows and returns a plan that is not a coupling; the
    stage carries on, so the run must say so (auto would have fallen back to Newton)."""
    rec = run(make_cfg("method=swap", "sparsity=0.9", "method.sinkhorn_method=sinkhorn", "method.epsilon=1e-6",
                       "method.epsilon_units=raw", "method.sinkhorn_max_iter=20"), tmp_path / "run")
    stage = rec["stages"][0]
    assert stage["sinkhorn_converged"] is False
    assert any("transport plan did not converge" in w for w in rec["warnings"]), rec.get("warnings")
    assert "method.sinkhorn_method=sinkhorn" in capsys.readouterr().out
