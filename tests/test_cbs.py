"""CBS (issue 4A): RMP keeps exactly k, the swap search never increases Phi (checked against a
dense w_I^T F_II w_I), CBS-U zeroes I and is the constrained minimiser, sparsity is exact, and
on the embedded digits it shares the cached G with WoodFisher and beats magnitude."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from pruning import methods
from pruning.errors import ConfigError
from pruning.gradients import GradientMatrix
from pruning.layout import ParamLayout, num_kept
from pruning.methods.base import PruningProblem
from pruning.methods.cbs import (
    Config,
    SwapObjective,
    cbs_update,
    local_search,
    magnitude_keep,
    objective,
    prune,
    rmp_keep,
    rmp_keep_reference,
)
from pruning.task import run

LAYOUT = ParamLayout(("a", "b", "c"), ((5, 6), (24,), (2, 7)))


def rand_problem(n: int = 12, seed: int = 0, block_size: int | None = None, mask: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    p = LAYOUT.numel
    G = torch.randn(n, p, generator=g, dtype=torch.float64) @ torch.randn(p, p, generator=g, dtype=torch.float64) / 8
    w = torch.randn(p, generator=g, dtype=torch.float64)
    mask = torch.ones(p, dtype=torch.bool) if mask is None else mask
    blocks = LAYOUT.blocks(block_size)
    gm = GradientMatrix(blocks, [G[:, sl].contiguous() for sl in blocks], torch.arange(n).view(n, 1))
    prob = PruningProblem(layout=LAYOUT, w=w * mask, w_bar=w.clone(), mask=mask, grads=gm,
                          generator=torch.Generator().manual_seed(seed))
    return G, w * mask, prob


def dense_phi(G: torch.Tensor, blocks: list[slice], w: torch.Tensor, pruned: torch.Tensor) -> float:
    """Independent reference: w_I^T F_II w_I with the block-diagonal F = G^T G / N formed densely."""
    F = torch.zeros(G.shape[1], G.shape[1], dtype=torch.float64)
    for sl in blocks:
        F[sl, sl] = G[:, sl].T @ G[:, sl] / G.shape[0]
    u = torch.where(pruned, w, torch.zeros_like(w))
    return float(u @ F @ u)


def test_rmp_keeps_exactly_k_and_prefers_large_weights():
    rng = np.random.default_rng(0)
    w_abs = np.abs(rng.normal(size=1000))
    group = np.arange(100, 900)
    for k in (0, 1, 80, 399, 800):
        kept = rmp_keep(w_abs, group, k, np.random.default_rng(1))
        assert len(kept) == k == len(np.unique(kept)) and np.isin(kept, group).all()
    kept = rmp_keep(w_abs, group, 200, np.random.default_rng(1))
    assert np.array_equal(kept, rmp_keep(w_abs, group, 200, np.random.default_rng(1)))  # seeded
    assert w_abs[kept].mean() > np.quantile(w_abs[group], 0.6)  # mostly large magnitudes
    assert not np.array_equal(np.sort(kept), np.sort(group[np.argsort(-w_abs[group])[:200]]))  # but randomized


@pytest.mark.parametrize("scope,block_size", [("global", None), ("global", 7), ("layerwise", None)])
def test_swap_search_never_increases_phi(scope, block_size):
    G, w, prob = rand_problem(seed=1, block_size=block_size)
    blocks = prob.grads.blocks
    obj = SwapObjective(prob.grads, blocks)
    groups = ([np.arange(LAYOUT.numel)] if scope == "global"
              else [np.arange(sl.start, sl.stop) for sl in LAYOUT.slices()])
    rng = np.random.default_rng(0)
    pruned = np.ones(LAYOUT.numel, dtype=bool)
    for g in groups:
        pruned[rmp_keep(np.abs(w.numpy()), g, num_kept(len(g), 0.6), rng)] = False
    start = dense_phi(G, blocks, w, torch.from_numpy(pruned))
    assert np.isclose(objective(prob.grads, blocks, w.numpy(), pruned), start, rtol=1e-10)
    cfg = Config(epsilon=0.0, range=3, max_no_match=5)
    history = [start]
    for passes in range(1, 6):  # Phi after k passes is non-increasing in k
        out, stats = local_search(obj, w.numpy(), pruned, groups, dataclasses.replace(cfg, max_iter=passes))
        phi = dense_phi(G, blocks, w, torch.from_numpy(out))
        assert np.isclose(stats["phi"], phi, rtol=1e-9)
        assert phi <= history[-1] + 1e-12
        history.append(phi)
        for g in groups:  # swaps keep the size of every group's pruned set
            assert out[g].sum() == pruned[g].sum()
    assert history[-1] < start  # and it does find improving swaps on a random problem
    # with a large epsilon no swap is good enough
    out, stats = local_search(obj, w.numpy(), pruned, groups, dataclasses.replace(cfg, epsilon=1e9))
    assert stats["swaps"] == 0 and np.array_equal(out, pruned)


def reference_search(F: torch.Tensor, w: torch.Tensor, pruned: np.ndarray, cfg: Config) -> tuple[np.ndarray, int]:
    """The CBS search rules written literally on a dense F (global scope): every quantity from
    u^T F u, no residuals. Returns the pruned set and the number of swaps."""
    pruned = pruned.copy()
    wn = w.numpy()
    Fn = F.numpy()

    def phi(mask: np.ndarray) -> float:
        u = np.where(mask, wn, 0.0)
        return float(u @ Fn @ u)

    def change(i: int, j: int) -> float:
        new = pruned.copy()
        new[i], new[j] = False, True
        return phi(new) - phi(pruned)

    swaps = 0
    for _ in range(cfg.max_iter):
        Ip, J = np.nonzero(pruned)[0], np.nonzero(~pruned)[0]
        base = phi(pruned)
        alpha = np.array([base - phi(pruned & (np.arange(len(wn)) != i)) for i in Ip])
        beta = np.array([phi(pruned | (np.arange(len(wn)) == j)) - base for j in J])
        Ip = Ip[np.argsort(-alpha, kind="stable")]
        gamma0 = np.array([2 * wn[Ip[0]] * wn[j] * Fn[Ip[0], j] for j in J])
        J = J[np.argsort(beta - gamma0, kind="stable")]
        if not change(Ip[0], J[0]) < -cfg.epsilon:
            break
        pruned[Ip[0]], pruned[J[0]] = False, True
        swaps += 1
        used, misses = {0}, 0
        for t in range(1, len(Ip)):
            if misses > cfg.max_no_match:
                break
            for r in range(max(1, t - cfg.range), min(len(J), t + cfg.range)):
                if r not in used and change(Ip[t], J[r]) < -cfg.epsilon:
                    pruned[Ip[t]], pruned[J[r]] = False, True
                    used.add(r)
                    swaps += 1
                    break
            else:
                misses += 1
    return pruned, swaps


@pytest.mark.parametrize("rng_,no_match", [(0, 0), (1, 0), (2, 1), (3, 4), (10, 20)])
@pytest.mark.parametrize("block_size", [None, 7])
def test_swap_search_follows_the_cbs_rules(rng_, no_match, block_size):
    """Same pruned set and swap count as the literal dense reference of the CBS rules (windows
    [max(1, t - range), t + range), misses counted over the whole pass, stop on the top pair)."""
    G, w, prob = rand_problem(n=10, seed=5, block_size=block_size)
    blocks = prob.grads.blocks
    F = torch.zeros(LAYOUT.numel, LAYOUT.numel, dtype=torch.float64)
    for sl in blocks:
        F[sl, sl] = G[:, sl].T @ G[:, sl] / G.shape[0]
    pruned = np.zeros(LAYOUT.numel, dtype=bool)
    pruned[rmp_keep(np.abs(w.numpy()), np.arange(LAYOUT.numel), 20, np.random.default_rng(0))] = True  # 20 pruned
    cfg = Config(epsilon=1e-6, range=rng_, max_no_match=no_match, max_iter=6)
    out, stats = local_search(SwapObjective(prob.grads, blocks), w.numpy(), pruned, [np.arange(LAYOUT.numel)], cfg)
    expected, swaps = reference_search(F, w, pruned, cfg)
    assert swaps > 0
    assert np.array_equal(out, expected) and stats["swaps"] == swaps
    assert np.isclose(stats["phi"], dense_phi(G, blocks, w, torch.from_numpy(out)), rtol=1e-9)


def test_swap_search_stops_when_the_top_pair_is_not_a_swap():
    """Hand-checked: F diagonal except F_03 = -0.7, w = 1, I = {0, 1}. alpha = (1, 0.9), so i = 0
    ranks first; beta_j - gamma_{j,0} = (1.2, 1.5) puts j = 2 first. The top pair changes Phi by
    (0.9 + 1.2) - 1.9 = +0.2: the search is over, although swapping 1 for 3 would lower Phi by 0.8."""
    F = torch.tensor([[1.0, 0, 0, -0.7], [0, 0.9, 0, 0], [0, 0, 1.2, 0], [-0.7, 0, 0, 1.5]], dtype=torch.float64)
    G = 2.0 * torch.linalg.cholesky(F).T  # N = 4 rows with G^T G / 4 = F
    gm = GradientMatrix([slice(0, 4)], [G.contiguous()], torch.arange(4).view(4, 1))
    w = np.ones(4)
    pruned = np.array([True, True, False, False])
    obj = SwapObjective(gm, [slice(0, 4)])
    assert np.isclose(obj.phi(obj.residuals(np.where(pruned, w, 0.0))), 1.9)
    flip = np.array([True, False, False, True])
    assert np.isclose(obj.phi(obj.residuals(np.where(flip, w, 0.0))), 1.1)  # the swap the rules never reach
    out, stats = local_search(obj, w, pruned, [np.arange(4)], Config(epsilon=1e-4))
    assert np.array_equal(out, pruned) and stats["swaps"] == 0 and stats["stop"] == "top_pair"
    # with F_03 = 0 the same scan has no improving pair at all; with F_22 = 0.5 the top pair swaps
    F2 = F.clone()
    F2[2, 2] = 0.5
    gm2 = GradientMatrix([slice(0, 4)], [(2.0 * torch.linalg.cholesky(F2).T).contiguous()], torch.arange(4).view(4, 1))
    out2, stats2 = local_search(SwapObjective(gm2, [slice(0, 4)]), w, pruned, [np.arange(4)], Config(epsilon=1e-4))
    assert out2.tolist() == [False, True, True, False] and stats2["swaps"] >= 1  # 0 out, 2 in: Phi 1.9 -> 1.4


@pytest.mark.parametrize("prior", [False, True])
def test_cbs_update_is_the_exact_multi_weight_obs(prior):
    damp = 1e-2
    mask0 = torch.ones(LAYOUT.numel, dtype=torch.bool)
    if prior:  # some weights were pruned by an earlier stage
        mask0[::5] = False
    G, w, prob = rand_problem(n=9, seed=2, mask=mask0)
    blocks = prob.grads.blocks
    mask = mask0.clone()
    mask[torch.randperm(LAYOUT.numel, generator=torch.Generator().manual_seed(3))[:30]] = False
    delta = cbs_update(prob.grads, blocks, w, mask0, mask, damp, torch.float64)
    new_w = w + delta
    assert torch.all(new_w[~mask] == 0)  # zeroes I exactly (and keeps earlier zeros)
    for sl in blocks:
        Gb = G[:, sl] * mask0[sl]  # masked gradients, as in the method
        F = damp * torch.eye(sl.stop - sl.start, dtype=torch.float64) + Gb.T @ Gb / G.shape[0]
        Finv = torch.linalg.inv(F)
        pr = torch.nonzero(~mask[sl]).squeeze(1)
        # CBS eq. 6 literally: delta = -F^-1[:, I] (F^-1[I, I])^-1 w_I
        literal = -Finv[:, pr] @ torch.linalg.solve(Finv[pr][:, pr], w[sl][pr])
        assert torch.allclose(delta[sl], literal, rtol=1e-8, atol=1e-10)
        # and the KKT solution of min 1/2 d^T F d  s.t.  d_I = -w_I
        b, k = sl.stop - sl.start, len(pr)
        kkt = torch.zeros(b + k, b + k, dtype=torch.float64)
        kkt[:b, :b] = F
        kkt[pr, b + torch.arange(k)] = 1.0
        kkt[b + torch.arange(k), pr] = 1.0
        rhs = torch.cat([torch.zeros(b, dtype=torch.float64), -w[sl][pr]])
        assert torch.allclose(delta[sl], torch.linalg.solve(kkt, rhs)[:b], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_sparsity_is_exact(scope):
    for s in (0.2, 0.5, 0.9):
        for update in (True, False):
            G, w, prob = rand_problem(seed=4)
            res = prune(prob, s, Config(scope=scope, update=update, epsilon=0.0, max_iter=3))
            assert torch.equal(res.w != 0, res.mask)
            if scope == "global":
                assert int(res.mask.sum()) == num_kept(LAYOUT.numel, s)
            else:
                for sl in LAYOUT.slices():
                    assert int(res.mask[sl].sum()) == num_kept(sl.stop - sl.start, s)
            assert res.info["phi"] <= res.info["phi_rmp"] + 1e-12
            if not update:
                assert torch.equal(res.w[res.mask], w[res.mask])


def passes_of(obj, w, pruned, groups, cfg, upto):
    """The pruned set after 0, 1, ..., upto passes of the plain (Phi-only) search."""
    return [local_search(obj, w, pruned, groups, dataclasses.replace(cfg, max_iter=t))[0] for t in range(upto + 1)]


def test_scored_search_returns_the_best_pass_and_stops_on_patience():
    """With a score the search visits the same sets as without one, returns the lowest-scoring
    (first on ties, the start counted as pass 0), and stops after a pass scoring above the best
    once the best is `patience` passes old (the CBS code's max_N_fluctation rule)."""
    G, w, prob = rand_problem(n=10, seed=5)
    blocks = prob.grads.blocks
    obj, groups = SwapObjective(prob.grads, blocks), [np.arange(LAYOUT.numel)]
    pruned = np.zeros(LAYOUT.numel, dtype=bool)
    pruned[rmp_keep(np.abs(w.numpy()), groups[0], 20, np.random.default_rng(0))] = True
    cfg = Config(epsilon=1e-6, range=3, max_no_match=2, max_iter=30, patience=3)
    sets = passes_of(obj, w.numpy(), pruned, groups, cfg, 6)
    assert all(not np.array_equal(a, b) for a, b in zip(sets, sets[1:5]))  # passes 1-4 each swap something
    script = [5.0, 3.0, 4.0, 3.0, 6.0, 2.0, 1.0]  # pass 3 ties pass 1; pass 4 is 3 passes after the best
    calls = []

    def score(p: np.ndarray) -> float:
        calls.append(p.copy())
        return script[len(calls) - 1]

    out, stats = local_search(obj, w.numpy(), pruned, groups, cfg, score=score)
    assert stats["stop"] == "patience" and stats["passes"] == 4 and len(calls) == 5
    assert all(np.array_equal(c, s_) for c, s_ in zip(calls, sets))  # scored exactly the passes' sets
    assert stats["best_pass"] == 1 and np.array_equal(out, sets[1]) and stats["score"] == 3.0
    assert np.isclose(stats["phi"], dense_phi(G, blocks, w, torch.from_numpy(sets[1])), rtol=1e-9)
    # a start no pass beats is returned unchanged; without patience the search runs to its own end
    out, stats = local_search(obj, w.numpy(), pruned, groups, dataclasses.replace(cfg, patience=100),
                              score=lambda p: 0.0 if np.array_equal(p, pruned) else 1.0)
    assert np.array_equal(out, pruned) and stats["best_pass"] == 0 and stats["stop"] == "top_pair"


def test_rmp_reference_rounding_keeps_what_the_cbs_code_keeps():
    """Hand-computed for MLPNet's 32,360 weights: 179 chunks of 181; at 0.98 each of the first 178
    keeps ceil(181 x 0.02) = 4 (712 > int(647.2) = 647, so the last keeps 0); at 0.95 10 each
    (1,780 > 1,618), at 0.9 19 each (3,382 > 3,236). Each chunk keeps its largest |w|."""
    p = 32360
    w_abs = np.abs(np.random.default_rng(0).normal(size=p))
    for s, kept in ((0.98, 712), (0.95, 1780), (0.9, 3382)):
        keep = rmp_keep_reference(w_abs, np.arange(p), s, np.random.default_rng(1))
        assert len(keep) == len(np.unique(keep)) == kept
    order = np.random.default_rng(1).permutation(p)  # the same draw: rebuild the chunks by hand
    keep = set(rmp_keep_reference(w_abs, np.arange(p), 0.98, np.random.default_rng(1)).tolist())
    for c in range(178):
        chunk = order[181 * c:181 * (c + 1)]
        assert set(chunk[np.argsort(-w_abs[chunk])[:4]].tolist()) <= keep
    # when the ceilings do not overshoot, the last chunk takes the remainder and the total is int(n (1 - s))
    keep = rmp_keep_reference(w_abs[:100], np.arange(100), 0.5, np.random.default_rng(2))
    assert len(keep) == 50


def test_start_is_magnitude_or_rmp_by_phi_or_loss():
    """select: phi with no draws starts from plain magnitude pruning; select: loss ranks the
    candidates by the given loss: with loss = sum of the pruned w^2 (what magnitude minimises)
    magnitude wins over every RMP draw, the loss gets `loss_examples`, and the selected pass never
    scores above the start."""
    G, w, prob = rand_problem(seed=4)
    k = num_kept(LAYOUT.numel, 0.7)
    res = prune(prob, 0.7, Config(select="phi", init_trials=0, init_magnitude=True, max_iter=0, update=False, block_size=None))
    mp = np.ones(LAYOUT.numel, dtype=bool)
    mp[magnitude_keep(np.abs(w.numpy()), np.arange(LAYOUT.numel), k)] = False
    assert res.info["start"] == "magnitude" and np.array_equal(~res.mask.numpy(), mp)
    assert np.isclose(res.info["phi_rmp"], dense_phi(G, prob.grads.blocks, w, torch.from_numpy(mp)), rtol=1e-9)
    seen = []

    def loss(wv: torch.Tensor, n: int) -> float:
        seen.append(n)
        return float(((wv - w) ** 2).sum())

    _, _, prob = rand_problem(seed=4)
    prob.loss = loss
    res = prune(prob, 0.7, Config(select="loss", init_trials=5, init_magnitude=True, loss_examples=123, update=False))
    assert res.info["select"] == "loss" and res.info["start"] == "magnitude" and set(seen) == {123}
    assert len(seen) >= 6 and res.info["loss_selected"] <= res.info["loss_start"]
    assert np.isclose(res.info["loss_selected"], loss(w * res.mask, 0))
    assert int(res.mask.sum()) == k
    # without a loss the problem falls back to Phi and says so
    _, _, prob = rand_problem(seed=4)
    assert prune(prob, 0.7, Config(select="loss", init_trials=2, max_iter=1)).info["select"].startswith("phi")


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="method.range"):
        methods.make_config("cbs", {"range": -1})
    with pytest.raises(ConfigError, match="method.epsilon"):
        methods.make_config("cbs", {"epsilon": "small"})
    with pytest.raises(ConfigError, match="method.colour"):
        methods.make_config("cbs", {"colour": 1})
    for key, bad in (("select", "grad"), ("rmp_rounding", "floor"), ("patience", 0), ("loss_examples", -1),
                     ("init_magnitude", "yes")):
        with pytest.raises(ConfigError, match=f"method.{key}"):
            methods.make_config("cbs", {key: bad})
    with pytest.raises(ConfigError, match="method.init_trials"):
        methods.make_config("cbs", {"init_trials": 0, "init_magnitude": False})


def test_embedded_digits_shares_g_and_beats_magnitude(make_cfg, tmp_path, session_cache):
    grads = session_cache / "grads"
    accs, before = {}, None
    for method in ("magnitude", "woodfisher", "cbs"):
        cfg = make_cfg(f"method={method}", "sparsity=0.9", "seed=3", "calibration.num_samples=200")
        if method == "cbs":
            before = {p.name for p in grads.iterdir()}
        rec = run(cfg, tmp_path / method)
        m = rec["metrics"]
        assert m["nnz_prunable"] == num_kept(m["numel_prunable"], 0.9)
        accs[method] = m["final_acc"]
    assert {p.name for p in grads.iterdir()} == before  # cbs found woodfisher's G in the cache
    assert accs["cbs"] > accs["magnitude"], accs


def test_reference_rounding_completes_with_its_real_sparsity_and_a_warning(make_cfg, tmp_path):
    """`method.rmp_rounding=reference` keeps more than the target on purpose (the CBS code's
    per-chunk ceiling): the run completes, the record says how many weights were kept and warns
    that the cell is not at its nominal sparsity (it used to fail the sparsity check); exact
    rounding keeps k and declares nothing."""
    out = {}
    for rounding in ("reference", "exact"):
        cfg = make_cfg("method=cbs", "sparsity=0.9", "seed=3", "calibration.num_samples=200",
                       f"method.rmp_rounding={rounding}", "method.init_trials=2")
        out[rounding] = run(cfg, tmp_path / rounding)
    ref, exact = out["reference"], out["exact"]
    m = ref["metrics"]
    k = num_kept(m["numel_prunable"], 0.9)
    assert ref["status"] == "completed" and m["nnz_prunable"] > k
    assert ref["stages"][-1]["sparsity_rule"] == f"rmp_rounding=reference ({m['nnz_prunable']} weights kept, not {k})"
    assert [w for w in ref["warnings"] if "not at its nominal sparsity" in w] != []
    assert exact["metrics"]["nnz_prunable"] == k and "sparsity_rule" not in exact["stages"][-1]
    assert not [w for w in exact["warnings"] if "nominal sparsity" in w]
    below = m["sparsity_below_target"]
    assert below == pytest.approx(0.9 - m["sparsity_prunable"]) and below > 0
    assert "sparsity_below_target" not in exact["metrics"]
    # the report marks the cell with the sparsity it reached (only the reference run)
    from pruning.report import load_local, render_markdown

    md = render_markdown(load_local(tmp_path))
    assert f"cbs at 0.9 reached {m['sparsity_prunable']:.4f} (1 run(s))" in md
    # the cell holding the reference run is marked, and the note under the table explains the mark
    assert md.count("† Not at their nominal sparsity") == 1
    marked = [line for line in md.splitlines() if line.startswith("| 0.9 |") and line.endswith("† |")]
    assert len(marked) == 1, md


def test_float32_g_products_are_float64_slab_by_slab(monkeypatch):
    """A float32 G times float64 residuals: computed in float64 slab by slab (numpy would upcast
    the whole block at every pass), equal to the dense float64 products to rounding."""
    import pruning.methods.cbs as cbs_mod

    monkeypatch.setattr(cbs_mod, "_SLAB", 7)  # several slabs per block, a ragged last one
    g = torch.Generator().manual_seed(5)
    p, n = LAYOUT.numel, 9
    G32 = torch.randn(n, p, generator=g).float()
    blocks = LAYOUT.blocks(None)
    Gm = GradientMatrix(blocks, [G32[:, sl].contiguous() for sl in blocks], torch.arange(n).view(n, 1))
    obj = SwapObjective(Gm, blocks)
    assert obj.cols[0].dtype == np.float32
    u = np.random.default_rng(0).standard_normal(p)
    G64 = G32.double().numpy()
    R = obj.residuals(u)
    ref_R = np.stack([G64[:, sl] @ u[sl] for sl in blocks], axis=1)
    np.testing.assert_allclose(R, ref_R, rtol=1e-12, atol=1e-12)
    t = obj.correlations(ref_R)
    ref_t = np.concatenate([G64[:, sl].T @ ref_R[:, b] for b, sl in enumerate(blocks)])
    np.testing.assert_allclose(t, ref_t, rtol=1e-12, atol=1e-12)
    assert R.dtype == t.dtype == np.float64


def test_column_products_gathered_or_by_slabs_agree(monkeypatch):
    """G[:, idx]^T v: a few columns are gathered, many are read off the whole block's slab
    products; both equal the dense float64 product."""
    import pruning.methods.cbs as cbs_mod

    monkeypatch.setattr(cbs_mod, "_SLAB", 5)
    g = torch.Generator().manual_seed(6)
    p, n = LAYOUT.numel, 11
    G32 = torch.randn(n, p, generator=g).float()
    blocks = LAYOUT.blocks(None)
    obj = SwapObjective(GradientMatrix(blocks, [G32[:, sl].contiguous() for sl in blocks],
                                       torch.arange(n).view(n, 1)), blocks)
    v = np.random.default_rng(1).standard_normal(n)
    sl = blocks[1]
    for idx in (np.array([sl.start + 3]), np.arange(sl.start, sl.stop)[::-2]):  # few, many (unsorted)
        ref = G32.double().numpy()[:, idx].T @ v
        np.testing.assert_allclose(obj.column_products(idx, v), ref, rtol=1e-12, atol=1e-12)


def test_starting_set_ranks_magnitude_and_rmp_draws():
    """The start is the lowest-ranked of plain magnitude and the RMP draws; every candidate keeps k
    per group, and a rank that prefers one draw picks that draw."""
    from pruning.methods.cbs import Config, magnitude_keep, starting_set

    rng = np.random.default_rng(0)
    w = rng.standard_normal(400)
    groups = [np.arange(0, 250), np.arange(250, 400)]
    cfg = Config(init_trials=6, init_magnitude=True)
    seen: list[np.ndarray] = []

    def rank(pruned: np.ndarray) -> float:
        seen.append(pruned.copy())
        return 0.0 if len(seen) == 4 else 1.0  # the third RMP draw (candidates: magnitude, rmp 0, 1, 2, ...)

    best, start = starting_set(w, groups, 0.9, cfg, seed=3, rank=rank)
    assert len(seen) == 7 and start == "rmp 2"
    np.testing.assert_array_equal(best, seen[3])
    for pruned in seen:
        assert [int((~pruned[g]).sum()) for g in groups] == [25, 15]
    mag = np.ones(400, dtype=bool)
    for g in groups:
        mag[magnitude_keep(np.abs(w), g, len(g) // 10)] = False
    np.testing.assert_array_equal(seen[0], mag)
    best, start = starting_set(w, groups, 0.9, cfg, seed=3, rank=lambda p: 0.0)  # ties: the first
    assert start == "magnitude"


def test_reference_draws_are_the_cbs_codes_starts():
    """`rmp_draws: reference` with `rmp_rounding: reference` rebuilds the CBS code's mag_perb starts
    (`constructive_greedy_prune_one_iter(itr)`, written out here as that code does it: the global
    numpy state seeded with itr, one shuffle of all indices, chunks of ceil(p / n_c) keeping
    ceil(chunk (1 - s)) each, the last chunk what is left of int(p (1 - s))). The draws do not
    depend on the run's seed; `rmp_draws: run` does."""
    from pruning.methods.cbs import Config, starting_set

    p, s = 2000, 0.9
    w = np.random.default_rng(5).standard_normal(p)

    def cbs_code_draw(itr: int) -> np.ndarray:
        n_chunk = max(1, min(int(math.sqrt(p)), 1000))
        size = math.ceil(p / n_chunk)
        target, per = int(p * (1 - s)), math.ceil(size * (1 - s))
        state = np.random.get_state()
        np.random.seed(itr)
        shf = np.arange(p)
        np.random.shuffle(shf)
        np.random.set_state(state)
        kept: list[int] = []
        for c in range(n_chunk):
            b, e = size * c, (size * (c + 1) if c < n_chunk - 1 else p)
            if c == n_chunk - 1:
                per = max(0, target - len(kept))
            chunk = shf[b:e]
            kept += chunk[np.argsort(-np.abs(w[chunk]))[:per]].tolist()
        pruned = np.ones(p, dtype=bool)
        pruned[kept] = False
        return pruned

    for draws in ("reference", "run"):
        cfg = Config(init_trials=3, rmp_rounding="reference", rmp_draws=draws)
        by_seed = []
        for seed in (0, 7):
            seen: list[np.ndarray] = []
            starting_set(w, [np.arange(p)], s, cfg, seed=seed, rank=lambda pr, seen=seen: seen.append(pr.copy()) or 0.0)
            by_seed.append(seen)
        if draws == "reference":
            for itr in (1, 2, 3):
                np.testing.assert_array_equal(by_seed[0][itr - 1], cbs_code_draw(itr))
                np.testing.assert_array_equal(by_seed[1][itr - 1], cbs_code_draw(itr))
        else:
            assert not np.array_equal(by_seed[0][0], by_seed[1][0])
    with pytest.raises(ConfigError, match="method.rmp_draws"):
        methods.make_config("cbs", {"rmp_draws": "numpy"})
