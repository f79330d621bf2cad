"""CBS, the Combinatorial Brain Surgeon: Yu, Serra, Ramalingam & Zhe, "The Combinatorial Brain
Surgeon: Pruning Weights That Cancel One Another in Neural Networks", ICML 2022
(algorithms.md section 4).

Selection (CBS-S) minimises the loss increase of zeroing a set I without compensation,

  Phi(I) = w_I^T F_II w_I = (1/N) sum_b ||G_b (w . 1_I)_b||^2,   F = (1/N) G^T G    (CBS eq. 4)

(block-diagonal over the Fisher blocks; F is never formed, everything comes from columns of G
and the per-block residuals r_b = G_b (w . 1_I)_b). Starting point, as the CBS code's `mag_perb`
init: plain magnitude pruning and `init_trials` draws of randomized magnitude pruning (RMP:
shuffle the coordinates, cut them into n_c = min(sqrt(p), 1000) chunks and keep the largest
magnitudes of each chunk; `rmp_draws`/`rmp_rounding: reference` make them the CBS code's own
draws, the same for every seed, and its rounding, which keeps more than k); the candidate with
the smallest training loss of the masked network (`select: loss`; `phi`: the smallest Phi)
starts the search. Local search:

  alpha_i = w_i (2 F_{i,I} w_I) - F_ii w_i^2     (i in I: Phi(I) - Phi(I \\ i))
  beta_j  = w_j (2 F_{j,I} w_I) + F_jj w_j^2     (j not in I: Phi(I + j) - Phi(I))
  gamma_ij = 2 w_i w_j F_ij,  Phi(I - i + j) - Phi(I) = beta_j - alpha_i - gamma_ij

Each pass sorts I by alpha (descending) and the kept set J by beta_j - gamma_{j,I[0]}
(ascending), as the CBS code (`greedy_alg/greedy.py::prune_one_iter`): the top pair (I[0], J[0])
is tested first and, when it is not a valid swap, the search is over; otherwise it is swapped and
the i at rank t >= 1 takes the first valid unused j at rank in [max(1, t - range), t + range); a
pass ends once more than `max_no_match` i (in total over the pass) found no swap. A swap is valid
when its exact change of Phi (computed in O(N) from the current residuals, so every accepted swap
lowers Phi by more than `epsilon`) is below -epsilon. Passes repeat (alpha, beta refreshed) up to
`max_iter` times. With `select: loss` (the CBS code's online runs) every pass is scored by the
training loss of the masked network, the search stops once the best pass is `patience` passes
old, and the best-scoring pass (the start included) is the selection: Phi is the search's
objective, the loss its model selection (on MLPNet at 0.98 the lowest Phi is not the lowest loss). (The CBS code counts a miss by testing only the last j of the window, which
differs only when that j was already used; here every i without a swap is a miss.)

Update (CBS-U) is the exact multi-weight OBS on the dampened block Fisher F = lambda I + G^T G / N:

  delta = -F^-1[:, I] (F^-1[I, I])^-1 w_I                                           (CBS eq. 6)

computed in the equivalent form delta_I = -w_I, delta_K = F_KK^-1 F_KI w_I over the kept set K
of each block, with F_KI w_I = (1/N) G_K^T (G_I w_I) and F_KK^-1 by the WoodFisher block inverse
(`pruning.fisher.BlockInverse`, the N x N Woodbury form when N < |K|): no |I| x |I| system and no B x B matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from pruning import factor_cache
from pruning.errors import choice, flag, integer, number, require
from pruning.fisher import DTYPES, BlockInverse, masked_block, method_blocks, validate_settings
from pruning.gradients import GradientMatrix
from pruning.layout import ParamLayout, num_kept
from pruning.methods.base import PruneResult, PruningProblem


@dataclass(frozen=True)
class Config:
    """N, m and the sampled data are the run's `calibration:` settings (reference: N = 1000, m = 1
    on ResNet20)."""

    # lambda of the CBS-U Fisher lambda I + G^T G / N: the CBS MLPNet runs (ResNet20 scripts 1e-5);
    # 1e-5 with the full block fell to 22% at 0.98 on MLPNet, N = 1000 (1e-3: 50%)
    damp: float = 1e-3
    # global (one pruned set over all tensors) | layerwise (same sparsity per tensor)
    scope: str = "global"
    # Fisher blocks (pruning.fisher.method_blocks): auto = full for models of <= 50,000 weights (CBS
    # MLPNet: full F), else G's blocks (ResNet20: per layer) | null = G's blocks | B | full (one p x p block)
    block_size: int | str | None = "auto"
    epsilon: float = 1e-4               # accept a swap when it lowers Phi by more than this (README threshold)
    range: int = 10                     # rho: pruned rank t scans kept ranks [max(1, t - range), t + range) (README)
    max_no_match: int = 20              # tau: a pass ends after more than tau pruned weights without a swap, in total
    max_iter: int = 100                 # passes of the local search (greedy_options.py --max-iter)
    # randomized-magnitude (RMP) draws; the best by `select` starts the search (CBS code: 49 + magnitude,
    # the reproduction study sets that)
    init_trials: int = 1
    update: bool = True                 # CBS-U exact multi-weight OBS update (false = CBS-S, selection only)
    update_scale: float = 1.0           # scale of the CBS-U step (the CBS-U scripts use 1)
    dtype: str = "float64"              # precision of the CBS-U block algebra
    # select: loss: the search stops once its best pass is this many passes old (CBS code max_N_fluctation 5)
    patience: int = 5
    # plain magnitude pruning is a starting candidate too (the CBS code's mag_perb draw 0)
    init_magnitude: bool = False
    # rank the starting candidates and the passes by: phi (G only: under noise every method sees the
    # same signal) | loss (training loss of the masked network without update, the CBS code's online
    # runs: returns the best pass; the MLPNet reproduction study uses it)
    select: str = "phi"
    loss_examples: int = 10000          # training examples scoring a candidate (0 = all: the CBS code on MNIST)
    rmp_rounding: str = "exact"         # exact (every draw keeps k) | reference (the CBS code's per-chunk
                                        #   ceil: keeps more than k, e.g. 712 instead of 647 on MLPNet at 0.98;
                                        #   the run records that sparsity and warns that it is not the target)
    # RMP draws: run (seeded by the run's seed: every seed draws its own starts) | reference (the CBS
    # code's: draw t shuffles with numpy's legacy RandomState(t), t = 1..init_trials, the same draws
    # for every run and seed; with rmp_rounding: reference these are the CBS code's exact starts)
    rmp_draws: str = "run"

    def validate(self) -> None:
        validate_settings(self)
        number(self.epsilon, "method.epsilon", lo=0.0, allowed="a number >= 0", fractions=False)
        for key, lo in (("range", 0), ("max_no_match", 0), ("max_iter", 0), ("init_trials", 0), ("patience", 1),
                        ("loss_examples", 0)):
            integer(getattr(self, key), f"method.{key}", lo)
        flag(self.update, "method.update")
        flag(self.init_magnitude, "method.init_magnitude")
        require(self.init_trials > 0 or self.init_magnitude, "method.init_trials", 0, "an integer >= 1",
                "no starting point: init_magnitude is false")
        choice(self.select, "method.select", ("phi", "loss"))
        choice(self.rmp_rounding, "method.rmp_rounding", ("exact", "reference"))
        choice(self.rmp_draws, "method.rmp_draws", ("run", "reference"))


class SwapObjective:
    """Phi over the Fisher blocks, from column views of G (numpy, no copy of G is made)."""

    def __init__(self, G: GradientMatrix, blocks: list[slice]):
        self.blocks = blocks
        self.N = G.num_rows
        self.cols = [G.columns(sl).detach().cpu().numpy() for sl in blocks]
        sizes = np.array([sl.stop - sl.start for sl in blocks])
        starts = np.array([sl.start for sl in blocks])
        self.bid = np.repeat(np.arange(len(blocks)), sizes)
        self.loc = np.arange(int(sizes.sum())) - np.repeat(starts, sizes)
        self.csq = np.concatenate([np.einsum("ij,ij->j", c, c, dtype=np.float64) for c in self.cols])

    def residuals(self, u: np.ndarray) -> np.ndarray:
        """R[:, b] = G_b u_b, shape (N, number of blocks), in float64."""
        R = np.zeros((self.N, len(self.blocks)))
        for b, (sl, c) in enumerate(zip(self.blocks, self.cols)):
            for lo, part in _float64_parts(c):
                R[:, b] += part @ u[sl.start + lo:sl.start + lo + part.shape[1]]
        return R

    def phi(self, R: np.ndarray) -> float:
        return float(np.einsum("ij,ij->", R, R)) / self.N

    def correlations(self, R: np.ndarray) -> np.ndarray:
        """t_q = g_q^T r_{b(q)} for every coordinate, in float64."""
        t = np.empty(len(self.bid))
        for b, (sl, c) in enumerate(zip(self.blocks, self.cols)):
            t[sl] = _block_t(c, R[:, b])
        return t

    def column_products(self, idx: np.ndarray, v: np.ndarray) -> np.ndarray:
        """G[:, idx]^T v in float64 for columns idx of one block: gathered when they are few, else
        the whole block's products by slabs, indexed (a gather of half of MLPNet's block at
        N = 10,000 allocated 1.3 GB per pass at sparsity 0.5)."""
        b = int(self.bid[idx[0]])
        c = self.cols[b]
        if 8 * len(idx) < c.shape[1]:
            return self.gather(idx).T @ v
        return _block_t(c, v)[self.loc[idx]]

    def gather(self, idx: np.ndarray) -> np.ndarray:
        """Columns idx of G, (N, len(idx)) in float64."""
        b = self.bid[idx]
        if (b == b[0]).all():
            return self.cols[b[0]][:, self.loc[idx]].astype(np.float64)
        out = np.empty((self.N, len(idx)))
        for ub in np.unique(b):
            sel = b == ub
            out[:, sel] = self.cols[ub][:, self.loc[idx[sel]]]
        return out


# columns per float64 slab: a float32 G times a float64 vector made numpy upcast the whole block (2.6 GB
# on MLPNet at N = 10,000) at every pass, 12x slower than casting slab by slab
_SLAB = 8192


def _float64_parts(c: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(first column, float64 copy) of consecutive column slabs of c (c itself when it is float64)."""
    if c.dtype == np.float64:
        yield 0, c
        return
    for lo in range(0, c.shape[1], _SLAB):
        yield lo, c[:, lo:lo + _SLAB].astype(np.float64)


def _block_t(c: np.ndarray, v: np.ndarray) -> np.ndarray:
    """c^T v in float64 for a block c of G, slab by slab."""
    t = np.empty(c.shape[1])
    for lo, part in _float64_parts(c):
        t[lo:lo + part.shape[1]] = part.T @ v
    return t


def objective(G: GradientMatrix, blocks: list[slice], w: np.ndarray, pruned: np.ndarray) -> float:
    """Phi(I) for the boolean pruned set I."""
    obj = SwapObjective(G, blocks)
    return obj.phi(obj.residuals(np.where(pruned, w, 0.0)))


# a run's own draws (Generator) or the CBS code's (legacy RandomState, rmp_draws: reference)
Rng = np.random.Generator | np.random.RandomState


def rmp_keep(w_abs: np.ndarray, group: np.ndarray, k: int, rng: Rng) -> np.ndarray:
    """Randomized magnitude pruning over the coordinates `group`: the kept coordinates (exactly k).

    Chunk c of n_c = min(floor(sqrt(n)), 1000) random chunks keeps floor(k n_c_len / n) of its
    largest |w|, the remainder going to the chunks with the largest fractional parts."""
    n = len(group)
    if k <= 0 or n == 0:
        return group[:0]
    n_c = max(1, min(int(math.isqrt(n)), 1000))
    chunks = np.array_split(group[rng.permutation(n)], n_c)
    exact = np.array([k * len(c) / n for c in chunks])
    counts = np.floor(exact + 1e-9).astype(int)
    extra = k - int(counts.sum())
    if extra > 0:
        counts[np.argsort(-(exact - counts), kind="stable")[:extra]] += 1
    kept = [c[np.argsort(-w_abs[c], kind="stable")[:cnt]] for c, cnt in zip(chunks, counts)]
    return np.concatenate(kept)


def rmp_keep_reference(w_abs: np.ndarray, group: np.ndarray, sparsity: float, rng: Rng) -> np.ndarray:
    """RMP as the CBS code rounds it (`constructive_greedy_prune_one_iter`), for reproducing its
    tables: chunks of ceil(n / n_c) coordinates each keep ceil(chunk (1 - s)) of their largest |w|
    and the last chunk keeps what is left of int(n (1 - s)), never below zero. The ceilings make
    the kept set larger than int(n (1 - s)) whenever they add up past it (MLPNet at 0.98: 712
    instead of 647, sparsity 0.978), so the result is not at the requested sparsity."""
    n = len(group)
    n_c = max(1, min(int(math.isqrt(n)), 1000))
    size = math.ceil(n / n_c)
    target, per = int(n * (1 - sparsity)), math.ceil(size * (1 - sparsity))
    order = group[rng.permutation(n)]
    kept: list[np.ndarray] = []
    for c in range(n_c):
        chunk = order[c * size:(c + 1) * size] if c < n_c - 1 else order[c * size:]
        if c == n_c - 1:
            per = max(0, target - sum(len(x) for x in kept))
        kept.append(chunk[np.argsort(-w_abs[chunk], kind="stable")[:per]])
    return np.concatenate(kept)


def magnitude_keep(w_abs: np.ndarray, group: np.ndarray, k: int) -> np.ndarray:
    """The k largest |w| of `group` (ties to the lower index): the plain magnitude start."""
    return group[np.argsort(-w_abs[group], kind="stable")[:k]]


def swap_deltas(obj: SwapObjective, w: np.ndarray, R: np.ndarray, i: int,
                js: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact Phi(I - i + j) - Phi(I) for every j in js, O(N) each from the current residuals R;
    also returns g_i and the columns G[:, js] (reused to update R after a swap)."""
    N = obj.N
    bi, bj = obj.bid[i], obj.bid[js]
    gi = obj.gather(np.array([i]))[:, 0]
    Gj = obj.gather(js)
    si = gi @ R[:, bi]
    sj = np.einsum("ij,ij->j", Gj, R[:, bj])
    cross = np.where(bj == bi, Gj.T @ gi, 0.0)
    delta = (-2.0 * w[i] * si + w[i] ** 2 * obj.csq[i] + 2.0 * w[js] * sj + w[js] ** 2 * obj.csq[js]
             - 2.0 * w[i] * w[js] * cross) / N
    return delta, gi, Gj


def _group_pass(obj: SwapObjective, w: np.ndarray, R: np.ndarray, pruned: np.ndarray, group: np.ndarray,
                alpha: np.ndarray, beta: np.ndarray, cfg: Config,
                swap: Callable[[int, int, np.ndarray, np.ndarray], None]) -> int:
    """One pass of the search over one group (the rules in `local_search`); returns the swaps made
    (0: the group's search is over: its top pair is not a valid swap, or nothing to swap)."""
    N = obj.N
    drop, J = group[pruned[group]], group[~pruned[group]]
    if len(drop) == 0 or len(J) == 0:
        return 0
    drop = drop[np.argsort(-alpha[drop], kind="stable")]
    i0 = drop[0]
    gamma0 = np.zeros(len(J))
    same = obj.bid[J] == obj.bid[i0]
    if same.any():
        gi0 = obj.gather(np.array([i0]))[:, 0]
        gamma0[same] = 2.0 / N * w[i0] * w[J[same]] * obj.column_products(J[same], gi0)
    J = J[np.argsort(beta[J] - gamma0, kind="stable")]
    delta, gi, Gj = swap_deltas(obj, w, R, int(i0), J[:1])
    if not delta[0] < -cfg.epsilon:  # the best-ranked pair does not improve: converged
        return 0
    swap(int(i0), int(J[0]), gi, Gj[:, 0])
    swaps = 1
    used = np.zeros(len(J), dtype=bool)
    used[0] = True
    misses = 0
    for pos in range(1, len(drop)):
        if misses > cfg.max_no_match:
            break
        lo, hi = max(1, pos - cfg.range), min(len(J), pos + cfg.range)
        cand = np.arange(lo, hi)[~used[lo:hi]] if lo < hi else np.arange(0)
        hits = np.arange(0)
        if len(cand):
            i = int(drop[pos])
            delta, gi, Gj = swap_deltas(obj, w, R, i, J[cand])
            hits = np.nonzero(delta < -cfg.epsilon)[0]
        if not len(hits):
            misses += 1
            continue
        found = int(hits[0])
        swap(i, int(J[cand[found]]), gi, Gj[:, found])
        used[cand[found]] = True
        swaps += 1
    return swaps


def local_search(obj: SwapObjective, w: np.ndarray, pruned: np.ndarray, groups: list[np.ndarray],
                 cfg: Config, progress: bool = False, score: Callable[[np.ndarray], float] | None = None,
                 ) -> tuple[np.ndarray, dict[str, float | int | str]]:
    """The CBS swap search with the rules of the CBS code (`greedy.py::prune_one_iter`); returns
    the new pruned set (a copy) and statistics.

    Per pass and group: sort the pruned set by alpha (descending) and the kept set J by
    beta_j - gamma_{j, I[0]} (ascending). The top pair (rank 0, rank 0) is tested first; when it is
    not a valid swap the group's search is over (no further passes). Otherwise it is swapped, and
    each pruned weight at rank t = 1, 2, ... takes the first valid, not yet used kept weight at
    rank in [max(1, t - range), min(|J|, t + range)); the pass ends once more than `max_no_match`
    pruned weights found none (misses are counted over the whole pass, never reset). A swap is
    valid when its exact change of Phi (from the current residuals) is below -epsilon. Swaps stay
    inside a group (all coordinates for global scope, one tensor for layerwise), so every group
    keeps the size of its pruned set. `stop` is "top_pair" (every group ended on an invalid top
    pair), "max_iter" or "patience".

    With `score` (a loss of the pruned set, lower is better; the CBS code's training loss of the
    masked network), the start and every pass are scored and the best-scoring set is returned
    (the first one on ties); the search also stops after a pass scoring above the best so far
    when the best is `patience` or more passes old (the CBS code's `max_N_fluctation`)."""
    pruned = pruned.copy()
    N, wsq = obj.N, w * w
    R = obj.residuals(np.where(pruned, w, 0.0))
    phi0 = obj.phi(R)
    swaps_total, passes, stop = 0, 0, "max_iter"
    done = [False] * len(groups)
    scores = [] if score is None else [float(score(pruned))]
    best, best_pass = pruned.copy(), 0
    bar = tqdm(total=cfg.max_iter, desc="cbs local search", leave=False, disable=not progress)

    def swap(i: int, j: int, gi: np.ndarray, gj: np.ndarray) -> None:
        pruned[i], pruned[j] = False, True
        R[:, obj.bid[i]] -= w[i] * gi
        R[:, obj.bid[j]] += w[j] * gj

    for _ in range(cfg.max_iter):
        if all(done):
            stop = "top_pair"
            break
        passes += 1
        t = obj.correlations(R)
        alpha = (2.0 * w * t - wsq * obj.csq) / N
        beta = (2.0 * w * t + wsq * obj.csq) / N
        for gnum, group in enumerate(groups):
            if not done[gnum]:
                made = _group_pass(obj, w, R, pruned, group, alpha, beta, cfg, swap)
                done[gnum] = made == 0
                swaps_total += made
        bar.update(1)
        if score is not None:
            scores.append(float(score(pruned)))
            prev_best = int(np.argmin(scores[:-1]))
            if scores[-1] < scores[prev_best]:
                best, best_pass = pruned.copy(), passes
            elif passes >= 2 and scores[-1] > scores[prev_best] and passes - prev_best >= cfg.patience:
                stop = "patience"
                break
    else:
        if all(done):
            stop = "top_pair"
    bar.close()
    if score is None:
        best, best_pass = pruned, passes
    R = obj.residuals(np.where(best, w, 0.0))  # exact, not accumulated
    stats: dict[str, float | int | str] = {"phi_init": phi0, "phi": obj.phi(R), "swaps": swaps_total,
                                          "passes": passes, "stop": stop, "best_pass": best_pass}
    if score is not None:
        stats.update(score_init=scores[0], score=scores[best_pass])
    return best, stats


def cbs_update(G: GradientMatrix, blocks: list[slice], w: torch.Tensor, mask0: torch.Tensor, mask: torch.Tensor,
               damp: float, dtype: torch.dtype, progress: bool = False,
               stats: factor_cache.CacheStats | None = None) -> torch.Tensor:
    """The exact multi-weight OBS step delta (CBS-U) per Fisher block, for the newly pruned set
    I = mask0 & ~mask (weights pruned before stay zero): delta_I = -w_I and
    delta_K = F_KK^-1 (1/N) G_K^T G_I w_I on the kept set K; zero elsewhere.

    On the Woodbury path with |I| < |K|, G_K G_K^T = G_b G_b^T - G_I G_I^T from the block's Gram
    matrix, shared across sparsities and with WoodFisher (`pruning.factor_cache.gram`): N^2 |I|
    instead of N^2 |K| per call (columns of weights pruned before are zero in G_b, in neither set)."""
    stats = stats if stats is not None else factor_cache.CacheStats()
    delta = torch.zeros_like(w)
    pruned = mask0 & ~mask
    N = G.num_rows
    for sl in tqdm(blocks, desc="cbs update", leave=False, disable=not progress):
        idx_i = torch.nonzero(pruned[sl]).squeeze(1)
        if len(idx_i) == 0:
            continue
        idx_k = torch.nonzero(mask[sl]).squeeze(1)
        Gb = masked_block(G, sl, mask0, w.device, dtype)
        wI = w[sl][idx_i]
        delta[sl.start + idx_i] = -wI
        if len(idx_k) == 0:
            continue
        GK, GI = Gb[:, idx_k], Gb[:, idx_i]
        rhs = GK.T @ (GI @ wI) / N
        gram = None
        if N < len(idx_k) and len(idx_i) < len(idx_k):
            gram = factor_cache.gram(G, Gb, sl, mask0, stats)
            gram = torch.addmm(gram, GI, GI.T, alpha=-1.0)
        delta[sl.start + idx_k] = BlockInverse(GK, damp, "auto", dtype, gram=gram).matvec(rhs)
    return delta


def starting_set(w: np.ndarray, groups: list[np.ndarray], sparsity: float, cfg: Config, seed: int,
                 rank: Callable[[np.ndarray], float]) -> tuple[np.ndarray, str]:
    """The CBS code's `mag_perb` start: plain magnitude pruning (with `init_magnitude`) and
    `init_trials` RMP draws, each group at the target sparsity; returns the pruned set with the lowest
    `rank` (the first one on ties) and its name ("magnitude" or "rmp <draw>")."""
    w_abs = np.abs(w)
    best, best_rank, start = None, math.inf, ""
    for trial in range(-1 if cfg.init_magnitude else 0, cfg.init_trials):  # -1: plain magnitude
        # the CBS code seeds its global numpy state with the draw's index (mag_perb itr 1, 2, ...)
        rng = (np.random.RandomState(trial + 1) if cfg.rmp_draws == "reference"
               else np.random.default_rng([seed, max(trial, 0)]))
        pruned = np.ones(len(w), dtype=bool)
        for g in groups:
            if trial < 0:
                keep = magnitude_keep(w_abs, g, num_kept(len(g), sparsity))
            elif cfg.rmp_rounding == "reference":
                keep = rmp_keep_reference(w_abs, g, sparsity, rng)
            else:
                keep = rmp_keep(w_abs, g, num_kept(len(g), sparsity), rng)
            pruned[keep] = False
        r = rank(pruned)
        if r < best_rank:
            best, best_rank, start = pruned, r, "magnitude" if trial < 0 else f"rmp {trial}"
    return best, start


def _groups(layout: ParamLayout, scope: str) -> list[np.ndarray]:
    if scope == "global":
        return [np.arange(layout.numel)]
    return [np.arange(sl.start, sl.stop) for sl in layout.slices()]


def prune(problem: PruningProblem, sparsity: float, cfg: Config) -> PruneResult:
    G = problem.grads
    if G is None:
        raise ValueError("cbs needs the gradient matrix (problem.grads)")
    layout, dtype = problem.layout, DTYPES[cfg.dtype]
    blocks = method_blocks(layout, G, cfg.block_size)
    mask0 = problem.mask.detach().cpu().to(torch.bool)
    w_t = problem.w.detach().cpu().to(torch.float64) * mask0
    w = w_t.numpy()
    groups = _groups(layout, cfg.scope)
    seed = 0 if problem.generator is None else int(torch.randint(2**62, (1,), generator=problem.generator))
    obj = SwapObjective(G, blocks)
    score, select = None, cfg.select
    if select == "loss" and problem.loss is None:
        select = "phi (no loss given)"  # a problem built without the network: G is all there is
    elif select == "loss":
        def score(pruned: np.ndarray) -> float:
            return float(problem.loss(torch.from_numpy(np.where(pruned, 0.0, w)), cfg.loss_examples))
    rank = score if score is not None else (lambda pruned: obj.phi(obj.residuals(np.where(pruned, w, 0.0))))
    best, start = starting_set(w, groups, sparsity, cfg, seed, rank)
    pruned, stats = local_search(obj, w, best, groups, cfg, progress=layout.numel > 50_000, score=score)
    mask = torch.from_numpy(~pruned)
    new_w = w_t.clone()
    cache = factor_cache.CacheStats()
    if cfg.update and cfg.update_scale != 0:
        dev = G.device
        delta = cbs_update(G, blocks, w_t.to(dev, dtype), mask0.to(dev), mask.to(dev), cfg.damp, dtype,
                           progress=len(blocks) >= 4, stats=cache)
        new_w += cfg.update_scale * delta.cpu().to(torch.float64)
    new_w = new_w * mask
    info = {"phi_rmp": stats["phi_init"], "phi": stats["phi"], "swaps": stats["swaps"],
            "passes": stats["passes"], "stop": stats["stop"], "blocks": len(blocks), "start": start,
            "select": select, "best_pass": stats["best_pass"]}
    if score is not None:
        info.update(loss_start=stats["score_init"], loss_selected=stats["score"])
    kept, wanted = int(mask.sum()), sum(num_kept(len(g), sparsity) for g in groups)
    if kept > wanted:  # only the reference rounding overshoots: the run's sparsity check is told why
        info["sparsity_rule"] = f"rmp_rounding=reference ({kept} weights kept, not {wanted})"
    if cache.status:
        info.update(cache.info("gram"))
    return PruneResult(w=new_w.to(device=problem.w.device, dtype=problem.w.dtype),
                       mask=mask.to(problem.mask.device), info=info)
