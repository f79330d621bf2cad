"""LR / CHITA (pruning/methods/lr.py, pruning/sparse_regression.py) against dense references."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pruning import methods
from pruning.errors import ConfigError
from pruning.gradients import split_blocks
from pruning.layout import ParamLayout, num_kept, topk_mask
from pruning.methods import lr
from pruning.methods.base import PruningProblem
from pruning.sparse_regression import DenseOperator, IdentityPlan, SolverConfig, solve
from pruning.task import run


def make_problem(N: int = 40, p: int = 300, seed: int = 0, blocks: int | None = 64):
    """A random regression problem whose data term matters (lam small against G^T G)."""
    g = torch.Generator().manual_seed(seed)
    layout = ParamLayout(("a", "b"), ((p // 3,), (p - p // 3,)))
    G = torch.randn(N, p, generator=g, dtype=torch.float64)
    G = G * (1.0 + torch.arange(p, dtype=torch.float64) % 7 / 3.0)  # uneven column scales
    w_bar = torch.randn(p, generator=g, dtype=torch.float64)
    Gm = split_blocks(G, layout, blocks, torch.arange(N).view(N, 1))
    return layout, G, Gm, w_bar


def q_lr(G: torch.Tensor, w_bar: torch.Tensor, w: torch.Tensor, lam: float) -> float:
    """Independent dense evaluation of 1/2||G w_bar - G w||^2 + (N lam / 2)||w - w_bar||^2."""
    r = G @ w_bar - G @ w
    return float(0.5 * r @ r + 0.5 * G.shape[0] * lam * (w - w_bar) @ (w - w_bar))


def lr_problem(layout, Gm, w_bar, w=None):
    return PruningProblem(layout=layout, w=w_bar.clone() if w is None else w, w_bar=w_bar,
                          mask=torch.ones_like(w_bar, dtype=torch.bool), grads=Gm)


@pytest.mark.parametrize("algorithm", ["iht", "active_iht"])
def test_objective_never_increases(algorithm):
    layout, G, Gm, w_bar = make_problem()
    cfg = lr.Config(lam=1e-3, algorithm=algorithm, ftol=0.0, max_iter=200)
    res = lr.prune(lr_problem(layout, Gm, w_bar), 0.9, cfg)
    hist = res.info["history"]
    assert len(hist) > 5, "the solver should take several steps on this problem"
    for a, b in zip(hist, hist[1:]):
        assert b <= a * (1 + 1e-12) + 1e-12
    assert hist[-1] < 0.9 * hist[0]
    # the reported objective is Q_LR of the returned weights (independent dense evaluation)
    assert res.info["objective"] == pytest.approx(q_lr(G, w_bar, res.w, 1e-3), rel=1e-10)


def test_beats_magnitude_and_is_stationary_on_its_support():
    layout, G, Gm, w_bar = make_problem(seed=1)
    lam, k = 1e-3, num_kept(300, 0.9)
    res = lr.prune(lr_problem(layout, Gm, w_bar), 0.9, lr.Config(lam=lam, ftol=0.0, max_iter=2000))
    mag = w_bar * topk_mask(w_bar.abs(), k)
    assert q_lr(G, w_bar, res.w, lam) < q_lr(G, w_bar, mag, lam)
    # converged IHT-LS: the ridge minimiser on its own support (dense normal equations)
    S = res.mask.nonzero().squeeze(1)
    GS = G[:, S]
    N = G.shape[0]
    ref = torch.linalg.solve(GS.T @ GS + N * lam * torch.eye(len(S), dtype=G.dtype),
                             GS.T @ (G @ w_bar) + N * lam * w_bar[S])
    assert torch.allclose(res.w[S], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algorithm", ["active_iht", "iht", "backsolve"])
def test_returns_w_bar_when_nothing_is_pruned(algorithm):
    layout, G, Gm, w_bar = make_problem()
    res = lr.prune(lr_problem(layout, Gm, w_bar), 0.0, lr.Config(algorithm=algorithm))
    assert bool(res.mask.all())
    assert torch.allclose(res.w, w_bar, rtol=0, atol=1e-9)
    # from another start the unconstrained minimiser of Q_LR is still w_bar
    start = w_bar + 0.1 * torch.randn(w_bar.shape, generator=torch.Generator().manual_seed(3), dtype=w_bar.dtype)
    res = lr.prune(lr_problem(layout, Gm, w_bar, start), 0.0,
                   lr.Config(algorithm=algorithm, lam=1.0, ftol=0.0, max_iter=500))
    assert torch.allclose(res.w, w_bar, atol=1e-6)


@pytest.mark.parametrize("N,sparsity", [(40, 0.5), (200, 0.9)])  # Woodbury (N < k) and primal (k <= N)
def test_backsolve_solves_the_normal_equations(N, sparsity):
    layout, G, Gm, w_bar = make_problem(N=N)
    lam = 0.01
    res = lr.prune(lr_problem(layout, Gm, w_bar), sparsity, lr.Config(algorithm="backsolve", lam=lam))
    k = num_kept(300, sparsity)
    assert res.info["backsolve"] == ("woodbury" if N < k else "primal")
    assert torch.equal(res.mask, topk_mask(w_bar.abs(), k))
    S = res.mask.nonzero().squeeze(1)
    GS = G[:, S]
    lhs = GS.T @ GS + N * lam * torch.eye(k, dtype=G.dtype)
    rhs = GS.T @ (G @ w_bar) + N * lam * w_bar[S]
    ref = torch.linalg.solve(lhs, rhs)
    assert torch.allclose(res.w[S], ref, rtol=1e-8, atol=1e-10)
    assert torch.allclose(lhs @ res.w[S], rhs, rtol=1e-8, atol=1e-8)
    assert bool((res.w[~res.mask] == 0).all())


@pytest.mark.parametrize("sparsity", [0.3, 0.75, 0.9, 0.99])
@pytest.mark.parametrize("algorithm", ["active_iht", "backsolve"])
def test_achieved_sparsity_equals_target(sparsity, algorithm):
    layout, G, Gm, w_bar = make_problem()
    res = lr.prune(lr_problem(layout, Gm, w_bar), sparsity, lr.Config(algorithm=algorithm))
    k = num_kept(300, sparsity)
    assert int(res.mask.sum()) == k == res.info["k"]
    assert bool((res.w[~res.mask] == 0).all())


def test_block_layout_and_dense_operator_agree():
    """Column access through GradientMatrix blocks (tensor boundaries, chunking) and a dense matrix."""
    layout, G, Gm, w_bar = make_problem(blocks=37)
    idx = torch.tensor([0, 5, 36, 37, 99, 100, 101, 250, 299])
    assert torch.equal(Gm.dense_columns(idx), G[:, idx])
    k = num_kept(300, 0.8)
    cfg = SolverConfig(lam=1e-3)
    y = G @ w_bar
    a = solve(Gm, y, w_bar, w_bar, k, IdentityPlan(40), cfg, "gradient")
    b = solve(DenseOperator(G), y, w_bar, w_bar, k, IdentityPlan(40), cfg, "gradient")
    assert torch.equal(a.mask, b.mask)
    assert torch.allclose(a.w, b.w, rtol=1e-9, atol=1e-12)


def test_float32_precision_matches_float64():
    layout, G, Gm, w_bar = make_problem()
    G32 = split_blocks(G.float(), layout, 64, torch.arange(40).view(40, 1))
    r64 = lr.prune(lr_problem(layout, Gm, w_bar), 0.9, lr.Config(lam=1e-3))
    r32 = lr.prune(lr_problem(layout, G32, w_bar.float()), 0.9, lr.Config(lam=1e-3, precision="float32"))
    assert r32.w.dtype == torch.float32
    assert r32.info["objective"] == pytest.approx(r64.info["objective"], rel=1e-3)


def test_config_errors_name_key_and_allowed_values():
    with pytest.raises(ConfigError, match="method.algorithm.*active_iht, iht, backsolve"):
        methods.make_config("lr", {"name": "lr", "algorithm": "cd"})
    with pytest.raises(ConfigError, match="method.lam"):
        methods.make_config("lr", {"lam": -1.0})
    with pytest.raises(ConfigError, match="method.bogus"):
        methods.make_config("lr", {"bogus": 1})
    cfg = methods.make_config("lr", {"name": "lr"})
    assert cfg.lam == 0.01 and cfg.algorithm == "active_iht" and not math.isnan(cfg.ftol)


def test_backsolve_without_ridge_when_n_below_k_is_a_config_error():
    layout, G, Gm, w_bar = make_problem()
    with pytest.raises(ConfigError, match="method.lam"):
        lr.prune(lr_problem(layout, Gm, w_bar), 0.5, lr.Config(algorithm="backsolve", lam=0.0))


def test_lr_beats_magnitude_on_digits(make_cfg, tmp_path):
    accs = {}
    for method in ("magnitude", "lr"):
        rec = run(make_cfg(f"method={method}", "sparsity=0.9"), tmp_path / method)
        accs[method] = rec["metrics"]["final_acc"]
        assert rec["metrics"]["sparsity_prunable"] == pytest.approx(0.9, abs=1e-4)
    stage = rec["stages"][0]
    assert stage["objective"] <= stage["objective_start"]
    assert accs["lr"] > accs["magnitude"], accs


# ------------------------------------------------- CHITA parity: zero columns, kimp, backsolve, cg
def ill_conditioned(N: int = 60, p: int = 200, seed: int = 4):
    """Columns with scales spread over one decade: steepest descent on a support converges slowly."""
    g = torch.Generator().manual_seed(seed)
    layout = ParamLayout(("a",), ((p,),))
    G = torch.randn(N, p, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(-0.5, 0.5, p, dtype=torch.float64))
    G = G + 0.9 * torch.randn(N, 1, generator=g, dtype=torch.float64) * G.abs().mean()  # correlated columns
    w_bar = 0.05 * torch.randn(p, generator=g, dtype=torch.float64)
    w_bar[::5] += 3.0  # a clear support of p / 5 weights: the solve is the subproblem on it
    return layout, G, split_blocks(G, layout, None, torch.arange(N).view(N, 1)), w_bar


@pytest.mark.parametrize("algorithm", ["active_iht", "iht", "backsolve"])
def test_zero_columns_are_dropped_as_if_removed_by_hand(algorithm):
    layout, G, Gm, w_bar = make_problem(seed=2)
    zero = torch.zeros(300, dtype=torch.bool)
    zero[::7] = True
    G = G * ~zero
    Gm = split_blocks(G, layout, 64, torch.arange(40).view(40, 1))
    w_bar = w_bar + 3.0 * zero  # large weights on the zero columns: top-k |w_bar| would keep them
    lam, s = 1e-3, 0.8
    k = num_kept(300, s)
    kw = {"lam": lam, "algorithm": algorithm, "finish": "none", "ftol": 0.0, "max_iter": 30}  # ftol sees the offset
    res = lr.prune(lr_problem(layout, Gm, w_bar), s, lr.Config(**kw))
    assert res.info["dropped_columns"] == int(zero.sum()) and int(res.mask.sum()) == k
    assert not bool(res.mask[zero].any()) and bool((res.w[zero] == 0).all())
    # the same solver on the problem with the columns removed by hand, embedded back
    keep = (~zero).nonzero().squeeze(1)
    Gk, wk = G[:, keep], w_bar[keep]
    ref = solve(DenseOperator(Gk), Gk @ wk, wk, wk, k, IdentityPlan(40), lr.Config(**kw), "gradient")
    assert torch.equal(res.mask[keep], ref.mask)
    assert torch.allclose(res.w[keep], ref.w, rtol=1e-6, atol=1e-8)  # same iterates up to summation order
    # the recorded objective is Q_LR of the full vector (the dropped weights pay their ridge term)
    assert res.info["objective"] == pytest.approx(q_lr(G, w_bar, res.w, lam), rel=1e-10)
    off = lr.prune(lr_problem(layout, Gm, w_bar), s, lr.Config(**kw, drop_zero_columns=False))
    assert off.info["dropped_columns"] == 0 and bool(off.mask[zero].any())


def test_initial_active_set_is_int_of_kimp_k():
    layout, G, Gm, w_bar = make_problem()
    for s, k in ((0.91, 27), (0.9, 30)):  # int(1.5 * 27) = 40 (CHITA), not ceil = 41
        assert num_kept(300, s) == k
        res = lr.prune(lr_problem(layout, Gm, w_bar), s, lr.Config(lam=1e-3, active_set_rounds=1))
        assert res.info["active_set_size"] == int(1.5 * k)


@pytest.mark.parametrize("N,sparsity", [(40, 0.5), (200, 0.9)])  # Woodbury (N < k) and primal (k <= N)
def test_finish_is_the_ridge_minimiser_on_the_final_support(N, sparsity):
    layout, G, Gm, w_bar = make_problem(N=N, seed=3)
    lam = 1e-3
    res = lr.prune(lr_problem(layout, Gm, w_bar), sparsity, lr.Config(lam=lam, max_iter=5))
    k = num_kept(300, sparsity)
    assert res.info["finish"] == ("woodbury" if N < k else "primal")
    S = res.mask.nonzero().squeeze(1)
    GS = G[:, S]
    lhs = GS.T @ GS + N * lam * torch.eye(k, dtype=G.dtype)
    ref = torch.linalg.lstsq(lhs, GS.T @ (G @ w_bar) + N * lam * w_bar[S]).solution  # dense normal equations
    assert torch.allclose(res.w[S], ref, rtol=1e-7, atol=1e-9)
    assert res.info["objective"] == pytest.approx(q_lr(G, w_bar, res.w, lam), rel=1e-10)
    assert res.info["objective"] <= res.info["objective_iht"]
    # max_iter = 5 cannot converge here: the cap is recorded
    assert res.info["max_iter_hit"] and res.info["iterations"] >= 5


def test_cg_converges_on_ftol_where_gradient_steps_hit_the_cap():
    layout, G, Gm, w_bar = ill_conditioned()
    lam = 1e-4
    base = {"lam": lam, "algorithm": "iht", "finish": "none", "max_iter": 100, "ftol": 1e-9}
    grad = lr.prune(lr_problem(layout, Gm, w_bar), 0.8, lr.Config(**base, support_steps="gradient"))
    cg = lr.prune(lr_problem(layout, Gm, w_bar), 0.8, lr.Config(**base, support_steps="cg"))
    assert grad.info["stop"] == "max_iter" and grad.info["max_iter_hit"]
    assert cg.info["stop"] in ("ftol", "no_decrease") and not cg.info["max_iter_hit"]
    assert cg.info["iterations"] < grad.info["iterations"]
    assert cg.info["objective"] <= grad.info["objective"] * (1 + 1e-9)
    hist = cg.info["history"]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(hist, hist[1:]))
    # converged: the ridge minimiser on its support (dense normal equations)
    S = cg.mask.nonzero().squeeze(1)
    GS, N = G[:, S], G.shape[0]
    ref = torch.linalg.solve(GS.T @ GS + N * lam * torch.eye(len(S), dtype=G.dtype),
                             GS.T @ (G @ w_bar) + N * lam * w_bar[S])
    assert q_lr(G, w_bar, cg.w, lam) == pytest.approx(q_lr(G, w_bar, cg.w * 0 + _embed(ref, S, 200), lam), rel=1e-6)


def _embed(v: torch.Tensor, idx: torch.Tensor, p: int) -> torch.Tensor:
    out = torch.zeros(p, dtype=v.dtype)
    out[idx] = v
    return out


def test_lr_defaults_are_chita_parity_and_swap_keeps_the_shared_defaults():
    cfg = methods.make_config("lr", {"name": "lr"})
    assert cfg.drop_zero_columns and cfg.support_steps == "cg" and cfg.finish == "backsolve"
    shared = SolverConfig()
    assert not shared.drop_zero_columns and shared.support_steps == "gradient" and shared.finish == "none"
    with pytest.raises(ConfigError, match="method.support_steps.*gradient, cg"):
        methods.make_config("lr", {"support_steps": "newton"})
    with pytest.raises(ConfigError, match="method.finish.*none, backsolve"):
        methods.make_config("lr", {"finish": "cd"})


def test_float32_finish_reaches_the_float64_minimiser_on_its_support():
    """With N < k the Woodbury form subtracts nearly equal vectors: in float32 on an ill-conditioned
    G (column scales over 3 decades, small ridge) its answer was worse than the IHT iterate and the
    finish was silently skipped. Solved in float64, it is the exact minimiser (dense reference)."""
    g = torch.Generator().manual_seed(7)
    N, p, lam, s = 30, 400, 1e-3, 0.75
    layout = ParamLayout(("a",), ((p,),))
    G = torch.randn(N, p, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(-1, 2, p, dtype=torch.float64))
    G = G + 3.0 * torch.randn(N, 1, generator=g, dtype=torch.float64) * G.abs().mean(0)  # correlated columns
    w_bar = torch.randn(p, generator=g, dtype=torch.float64)
    G32 = split_blocks(G.float(), layout, None, torch.arange(N).view(N, 1))
    res = lr.prune(lr_problem(layout, G32, w_bar.float()), s, lr.Config(lam=lam, max_iter=20))
    k = num_kept(p, s)
    assert res.info["finish"] == "woodbury" and k > N
    S = res.mask.nonzero().squeeze(1)
    GS, y = G.float().double()[:, S], G.float().double() @ w_bar.float().double()
    ref = torch.linalg.solve(GS.T @ GS + N * lam * torch.eye(k, dtype=torch.float64),
                             GS.T @ y + N * lam * w_bar.float().double()[S])
    q_ref = q_lr(G.float().double(), w_bar.float().double(), _embed(ref, S, p), lam)
    assert res.info["objective"] < res.info["objective_iht"]  # the finish was taken
    assert res.info["objective"] == pytest.approx(q_ref, rel=1e-5)


def test_record_says_why_each_active_set_round_stopped():
    layout, G, Gm, w_bar = make_problem()
    res = lr.prune(lr_problem(layout, Gm, w_bar), 0.9, lr.Config(lam=1e-3, max_iter=3))
    stops = res.info["stops"].split(",")
    assert len(stops) == res.info["active_set_rounds"] and stops[-1] == res.info["stop"]
    assert res.info["rounds_capped"] == stops.count("max_iter") >= 1 and res.info["max_iter_hit"]


def test_backsolve_gathers_the_support_once_when_a_dense_copy_fits(monkeypatch):
    """The float64 refinement takes several products with G_S. When G_S fits the operator's resident
    budget it is gathered once (a gather of a stored G is a disk read); streamed otherwise. Both
    routes give the same minimiser."""
    g = torch.Generator().manual_seed(3)
    N, p = 30, 400
    layout = ParamLayout(("a",), ((p,),))
    G = torch.randn(N, p, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(-1, 2, p, dtype=torch.float64))
    w_bar = torch.randn(p, generator=g, dtype=torch.float64)
    G32 = split_blocks(G.float(), layout, 100, torch.arange(N).view(N, 1))
    calls = []
    gather = type(G32).column_chunks
    monkeypatch.setattr(type(G32), "column_chunks", lambda self, *a, **kw: (calls.append(1), gather(self, *a, **kw))[1])
    cfg = lr.Config(lam=1e-3, algorithm="backsolve", drop_zero_columns=False)
    results = {}
    for name, budget in (("dense", None), ("streamed", 0)):
        calls.clear()
        op = dataclasses.replace(G32, max_resident_bytes=budget)
        results[name] = (lr.prune(lr_problem(layout, op, w_bar.float()), 0.5, cfg), len(calls))
    (dense, n_dense), (streamed, n_streamed) = results["dense"], results["streamed"]
    assert dense.info["backsolve"] == "woodbury" and dense.info["backsolve_refinements"] >= 1
    assert n_dense == 1 and n_streamed > 4
    assert torch.allclose(dense.w, streamed.w, rtol=1e-5, atol=1e-6)
    assert dense.info["backsolve_residual"] < 1e-9


@pytest.mark.parametrize("block_size,nblocks", [(None, 6), (37, 9)])  # G's blocks (64 per tensor); B = 37
def test_blocks_backsolve_each_block_on_its_own_targets(block_size, nblocks):
    """CHITA Heuristic_LSBlock: the global top-k |w_bar| support, then per block b the dense ridge
    solution of min 1/2||G_b w_bar_b - G_b w_b||^2 + (N lam / 2)||w_b - w_bar_b||^2 on its support."""
    layout, G, Gm, w_bar = make_problem(N=40, blocks=64)
    lam, s = 1e-2, 0.8
    k = num_kept(300, s)
    res = lr.prune(lr_problem(layout, Gm, w_bar), s, lr.Config(lam=lam, block_size=block_size))
    assert torch.equal(res.mask, topk_mask(w_bar.abs(), k)) and int(res.mask.sum()) == k
    assert res.info["blocks"] == nblocks and res.info["algorithm"] == "block_backsolve"
    if block_size is None:
        edges = [0, 64, 100, 164, 228, 292, 300]  # tensor a (100) and b (200) cut at 64
    else:
        edges = [0, 37, 74, 100, 137, 174, 211, 248, 285, 300]
    q = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        S = torch.arange(lo, hi)[res.mask[lo:hi]]
        Gb, GS, wb = G[:, lo:hi], G[:, S], w_bar[lo:hi]
        ref = torch.linalg.solve(GS.T @ GS + 40 * lam * torch.eye(len(S), dtype=G.dtype),
                                 GS.T @ (Gb @ wb) + 40 * lam * w_bar[S])
        assert torch.allclose(res.w[S], ref, rtol=1e-8, atol=1e-10)
        q += q_lr(Gb, wb, res.w[lo:hi], lam)
    assert bool((res.w[~res.mask] == 0).all())
    assert res.info["objective"] == pytest.approx(q, rel=1e-9)  # the block-diagonal model's Q
    # a block never spans two tensors
    two = lr.prune(lr_problem(layout, split_blocks(G, layout, 300, torch.arange(40).view(40, 1)), w_bar), s,
                   lr.Config(lam=lam, block_size=300))
    assert two.info["blocks"] == 2
    # one block over everything is the full backsolve on the same support
    single = ParamLayout(("a",), ((300,),))
    Gs = split_blocks(G, single, None, torch.arange(40).view(40, 1))
    full = lr.prune(lr_problem(single, Gs, w_bar), s, lr.Config(lam=lam, algorithm="backsolve"))
    one = lr.prune(lr_problem(single, Gs, w_bar), s, lr.Config(lam=lam, block_size=None))
    assert one.info["blocks"] == 1 and torch.equal(full.mask, one.mask)
    assert torch.allclose(one.w, full.w, rtol=1e-8, atol=1e-10)
    assert one.info["objective"] == pytest.approx(full.info["objective"], rel=1e-9)


def test_blocks_prune_zero_columns_first_and_reject_bad_sizes():
    layout, G, Gm, w_bar = make_problem(seed=3)
    zero = torch.zeros(300, dtype=torch.bool)
    zero[::11] = True
    G = G * ~zero
    Gm = split_blocks(G, layout, 64, torch.arange(40).view(40, 1))
    w_bar = torch.where(zero, 3.0 + w_bar.abs(), w_bar)  # the largest magnitudes sit on the zero columns
    res = lr.prune(lr_problem(layout, Gm, w_bar), 0.8, lr.Config(block_size=None))
    assert res.info["dropped_columns"] == int(zero.sum()) and not bool(res.mask[zero].any())
    keep = lr.prune(lr_problem(layout, Gm, w_bar), 0.8, lr.Config(block_size=None, drop_zero_columns=False))
    assert bool(keep.mask[zero].all())
    for bad in ("auto", 0, -5, True):
        with pytest.raises(ConfigError, match="method.block_size.*full, null"):
            methods.make_config("lr", {"block_size": bad})
