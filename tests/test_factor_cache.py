"""Factorisation cache (issue 17 item 1): WoodFisher's and CBS's block algebra is computed once per
(G, block, mask, dtype[, damp, inverse]) and reused from memory or from G's cache entry on disk with
bit-identical pruned weights; a garbled entry is recomputed with a warning; another damp or mask misses."""

from __future__ import annotations

import pytest
import torch

from pruning import factor_cache, fisher, methods
from pruning.gradients import GradientMatrix
from pruning.layout import ParamLayout
from pruning.methods import cbs, woodfisher
from pruning.methods.base import PruningProblem
from pruning.record import digest_path
from pruning.task import Job


@pytest.fixture(autouse=True)
def _cold():
    factor_cache.clear_memory()
    yield
    factor_cache.clear_memory()


LAYOUT = ParamLayout(("a", "b"), ((12, 10), (30,)))  # 150 weights, one full Fisher block (auto)
N = 40


def grads(entry=None, seed: int = 0) -> GradientMatrix:
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(N, LAYOUT.numel, generator=g) @ torch.randn(LAYOUT.numel, LAYOUT.numel, generator=g) / 12
    blocks = LAYOUT.slices()
    return GradientMatrix(blocks, [G[:, sl].contiguous() for sl in blocks], torch.arange(N).view(-1, 1),
                          key="k" * 32 if entry else None, entry=entry)


def problem(G: GradientMatrix, mask: torch.Tensor | None = None) -> PruningProblem:
    w = torch.randn(LAYOUT.numel, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(LAYOUT.numel, dtype=torch.bool) if mask is None else mask
    return PruningProblem(layout=LAYOUT, w=w * mask, w_bar=w.clone(), mask=mask, grads=G,
                          generator=torch.Generator().manual_seed(2), progress=False)


def wf(G, sparsity, mask=None, **kw):
    return woodfisher.prune(problem(G, mask), sparsity, methods.make_config("woodfisher", kw))


def test_woodfisher_reuse_is_bit_identical(tmp_path):
    fresh = {s: wf(grads(), s) for s in (0.5, 0.9)}  # no entry: in-process only
    assert fresh[0.5].info["factor_cache"] == "miss" and fresh[0.9].info["factor_cache"] == "hit"
    factor_cache.clear_memory()
    G = grads(tmp_path / "entry")
    first = wf(G, 0.5)
    assert first.info["factor_cache"] == "miss" and first.info["factor_seconds"] > 0
    files = sorted(p.name for p in (tmp_path / "entry" / "factors").glob("*.pt"))
    assert [f.split("-")[0] for f in files] == ["gram", "inverse"]
    factor_cache.clear_memory()  # a new process: from disk
    second = wf(G, 0.9)
    assert second.info["factor_cache"] == "hit"
    for s, res in ((0.5, first), (0.9, second)):
        assert torch.equal(res.w, fresh[s].w) and torch.equal(res.mask, fresh[s].mask)
    # the cached path equals the plain block inverse (no cache) to rounding
    inv = fisher.BlockInverse(G.dense().double(), 1e-5)
    assert torch.allclose(fisher.cached_inverse(G, slice(0, LAYOUT.numel), torch.ones(150, dtype=torch.bool),
                                                    1e-5, "auto", torch.device("cpu"), torch.float64,
                                                    factor_cache.CacheStats())[1], inv.diag(), rtol=1e-10)


def test_cbs_reuses_the_gram_matrix_bit_identically(tmp_path):
    cfg = methods.make_config("cbs", {"max_iter": 3})
    fresh = cbs.prune(problem(grads()), 0.3, cfg)  # |I| < |K| and N < |K|: the Gram path
    assert fresh.info["factor_cache"] == "miss"
    factor_cache.clear_memory()
    G = grads(tmp_path / "entry")
    wf(G, 0.5)  # WoodFisher stores the Gram matrix of the same block and mask
    factor_cache.clear_memory()
    res = cbs.prune(problem(G), 0.3, cfg)
    assert res.info["factor_cache"] == "hit"
    assert torch.equal(res.w, fresh.w) and torch.equal(res.mask, fresh.mask)
    # and it is the CBS-U step of a direct G_K G_K^T (independent reference: dense F_KK solve)
    Gd = G.dense().double()
    w0 = problem(G).w.double()
    K, drop = res.mask, ~res.mask
    F = Gd.T @ Gd / N + cfg.damp * torch.eye(LAYOUT.numel, dtype=torch.float64)
    dK = torch.linalg.solve(F[K][:, K], (Gd[:, K].T @ (Gd[:, drop] @ w0[drop])) / N)
    assert torch.allclose(res.w[K].double(), (w0[K] + dK).float().double(), atol=1e-5)
    # two CBS sparsities in sequence: the second reuses the first's Gram matrix, bit-identically
    factor_cache.clear_memory()
    cold = cbs.prune(problem(grads()), 0.2, cfg)
    factor_cache.clear_memory()
    assert cbs.prune(problem(G), 0.3, cfg).info["factor_cache"] == "hit"
    again = cbs.prune(problem(G), 0.2, cfg)
    assert again.info["factor_cache"] == "hit" and torch.equal(again.w, cold.w)


def test_garbled_entry_is_recomputed_with_a_warning(tmp_path):
    G = grads(tmp_path / "entry")
    ref = wf(G, 0.7)
    factor_cache.clear_memory()
    path = next((tmp_path / "entry" / "factors").glob("inverse-*.pt"))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="factor cache entry .*inverse-.* not used: its sha256"):
        again = wf(G, 0.7)
    assert "not used" in again.info["factor_cache_warning"]
    assert again.info["factor_cache"] == "miss"
    assert torch.equal(again.w, ref.w)
    assert digest_path(path).is_file()  # rewritten with its digest, good next time
    factor_cache.clear_memory()
    assert wf(G, 0.7).info["factor_cache"] == "hit"


def test_other_damp_or_mask_misses(tmp_path):
    G = grads(tmp_path / "entry")
    wf(G, 0.5, damp=1e-3)
    stats = factor_cache.CacheStats()
    other = wf(G, 0.5, damp=1e-2)
    assert other.info["factor_cache"] == "miss"
    # the Gram matrix does not depend on damp: reused
    sl, ones = slice(0, LAYOUT.numel), torch.ones(LAYOUT.numel, dtype=torch.bool)
    Gb = fisher.masked_block(G, sl, ones, torch.device("cpu"), torch.float64)
    factor_cache.gram(G, Gb, sl, ones, stats)
    assert stats.status == {"gram": ["hit"]}
    mask = ones.clone()
    mask[::3] = False
    res = wf(G, 0.6, mask=mask, damp=1e-3)
    assert res.info["factor_cache"] == "miss"
    assert not bool(res.mask[~mask].any())
    Gm = fisher.masked_block(G, sl, mask, torch.device("cpu"), torch.float64)
    stats = factor_cache.CacheStats()
    factor_cache.gram(G, Gm, sl, mask, stats)
    assert stats.status == {"gram": ["hit"]}  # the masked run stored its own
    assert len(list((tmp_path / "entry" / "factors").glob("gram-*.pt"))) == 2


def test_row_noise_drops_the_entry():
    from dataclasses import replace

    G = grads(entry="/nonexistent")
    assert factor_cache.matrix_identity(G, G.dense()).startswith("grads:")
    assert factor_cache.matrix_identity(replace(G, entry=None), G.dense()).startswith("values:")


def _pruned(make_cfg, tmp_path, name, *overrides):
    job = Job(make_cfg(*overrides), tmp_path / name)
    rec = job.run()
    from pruning.layout import get_flat

    return get_flat(job.state.model, job.state.layout).detach().clone(), rec["stages"][0]


def test_task_sparsities_share_the_cache(make_cfg, tmp_path):
    """Two sparsities in sequence sharing a cache dir (as two jobs: the in-process cache is
    cleared between them) reuse the factorisation and give the weights of a cold, uncached run."""
    shared = [f"paths.cache_dir={tmp_path / 'cache'}", "seed=0", "schedule=oneshot", "finetune.epochs=0"]
    w1, row1 = _pruned(make_cfg, tmp_path, "wf50", "method=woodfisher", "sparsity=0.5", *shared)
    factor_cache.clear_memory()
    w2, row2 = _pruned(make_cfg, tmp_path, "wf90", "method=woodfisher", "sparsity=0.9", *shared)
    factor_cache.clear_memory()
    w3, row3 = _pruned(make_cfg, tmp_path, "cbs30", "method=cbs", "sparsity=0.3", "++method.max_iter=2", *shared)
    assert (row1["factor_cache"], row2["factor_cache"], row3["factor_cache"]) == ("miss", "hit", "hit")
    assert all(isinstance(r["factor_seconds"], float) for r in (row1, row2, row3))
    cold = [*shared[1:], f"paths.cache_dir={tmp_path / 'cache'}", "calibration.cache=false"]
    for name, w, over in (("wf90", w2, ["method=woodfisher", "sparsity=0.9"]),
                          ("cbs30", w3, ["method=cbs", "sparsity=0.3", "++method.max_iter=2"])):
        factor_cache.clear_memory()
        wc, rowc = _pruned(make_cfg, tmp_path, name + "-cold", *over, *cold)
        assert rowc["factor_cache"] == "miss"
        assert torch.equal(wc, w), name
