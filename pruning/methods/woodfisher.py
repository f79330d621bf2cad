"""WoodFisher: Singh & Alistarh, "WoodFisher: Efficient Second-Order Approximation for Neural
Network Compression", NeurIPS 2020 (algorithms.md section 3).

Per block b of the prunable weights (one per tensor, tensors cut into chunks of at most B, or one
block over everything with `block_size: full`; the default `auto` is full for models of at most
`pruning.fisher.FULL_BLOCK_MAX` weights, as the reference's MLPNet runs), with G_b the N x B columns of the gradient matrix
(columns of already-pruned weights zeroed, as the reference masks its gradients):

  dampened empirical Fisher   F_b = lambda I + (1/N) G_b^T G_b                            (WF eq. 3)
  Woodbury closed form        F_b^-1 = (1/lambda) [I - G_b^T (N lambda I_N + G_b G_b^T)^-1 G_b]
  rank-1 recursion            F_0^-1 = I / lambda,
                              F_n^-1 = F_{n-1}^-1 - (F_{n-1}^-1 g_n)(F_{n-1}^-1 g_n)^T / (N + g_n^T F_{n-1}^-1 g_n)
                                                                                          (WF eq. 11)
  OBS saliency                rho_q = w_q^2 / (2 [F^-1]_qq)                               (WF eq. 5)
  pruning update              delta = -c_u F^-1 sum_{q in Q} (w_q / [F^-1]_qq) e_q        (WF eq. 4, summed
                              over the pruned set Q; c_u = update_scale, 0 gives OBD)

The block algebra is `pruning.fisher` (shared with CBS). When N < B (`inverse: auto`) no B x B
matrix is formed: diag(F_b^-1) and F_b^-1 v come from the Cholesky factor of the N x N matrix
N lambda I + G_b G_b^T, in O(N^2 B + N^3) time and O(N B) memory. When N >= B a dense B x B inverse is used (`dense`); `rank1` is the paper's recursion,
kept as a reference (O(N B^2)). Selection is global (one threshold over all rho, the reference's
`--woodburry-joint-sparsify`) or layerwise (the same sparsity in every tensor). After the update the
new mask is applied, so pruned weights are exactly zero (`--zero-after-prune`). The factor and
diag(F^-1) of each block (and G G^T) go through `pruning.factor_cache`: other sparsities, methods
and jobs of the same G, mask and damp reuse them (stage info `factor_cache`, `factor_seconds`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from pruning import factor_cache
from pruning.fisher import (
    DTYPES,
    BlockInverse,
    cached_inverse,
    masked_block,
    method_blocks,
    validate_settings,
)
from pruning.layout import select_mask
from pruning.methods.base import PruneResult, PruningProblem

_KEEP_FACTORS = 1 << 27  # elements of block factors kept between the two passes (1 GiB in fp64)


@dataclass(frozen=True)
class Config:
    """N, m and the sampled data are the run's `calibration:` settings (the reference scripts:
    N = 1000, m = 1 on ResNet20)."""

    # lambda in F = lambda I + G^T G / N (reference scripts' fisher_damp: 1e-5; MLPNet CBS runs 1e-3)
    damp: float = 1e-5
    # global (one threshold over all rho, "joint") | layerwise (same sparsity per tensor)
    scope: str = "global"
    # c_u of the summed single-weight OBS update: 1 = OBS (reference default), 0 = OBD (no update);
    # CBS/SWAP scripts 0.9
    update_scale: float = 1.0
    # auto: one full block for models of <= 50,000 weights (WF/CBS MLPNet runs: full p x p; at 0.98
    # per-layer blocks fell 3-13 points below magnitude on MLPNet), else G's blocks (ResNet/MobileNet
    # runs: per layer) | null = G's blocks (calibration.block_size) | B | full (one p x p block)
    block_size: int | str | None = "auto"
    # auto (Woodbury N x N closed form when N < B, else dense) | woodbury | dense | rank1 (reference recursion)
    inverse: str = "auto"
    # precision of the block algebra (float32 halves memory; float64 is safe with tiny damp)
    dtype: str = "float64"

    def validate(self) -> None:
        validate_settings(self)


def prune(problem: PruningProblem, sparsity: float, cfg: Config) -> PruneResult:
    G = problem.grads
    if G is None:
        raise ValueError("woodfisher needs the gradient matrix (problem.grads)")
    layout, dtype = problem.layout, DTYPES[cfg.dtype]
    device = G.device
    w = problem.w.to(device=device, dtype=dtype)
    mask0 = problem.mask.to(device=device, dtype=torch.bool)
    w = w * mask0
    blocks = method_blocks(layout, G, cfg.block_size)
    d = torch.empty_like(w)
    factors: list[torch.Tensor | None] = []
    kept = 0
    stats = factor_cache.CacheStats()
    for sl in tqdm(blocks, desc="woodfisher inverse", leave=False, disable=not problem.progress or len(blocks) < 4):
        inv, d[sl] = cached_inverse(G, sl, mask0, cfg.damp, cfg.inverse, device, dtype, stats)
        f = inv.factor()
        keep = kept + f.numel() <= _KEEP_FACTORS
        factors.append(f if keep else None)
        kept += f.numel() if keep else 0
        del inv
    rho = w.pow(2) / (2.0 * d)
    mask = select_mask(rho, layout, sparsity, cfg.scope)
    pruned = mask0 & ~mask
    new_w = w.clone()
    if cfg.update_scale != 0 and bool(pruned.any()):
        v = torch.where(pruned, -w / d, torch.zeros_like(w))
        for sl, f in zip(blocks, factors):
            if not bool(pruned[sl].any()):
                continue
            inv = BlockInverse(masked_block(G, sl, mask0, device, dtype), cfg.damp, cfg.inverse, dtype, factor=f)
            new_w[sl] += cfg.update_scale * inv.matvec(v[sl])
    new_w = new_w * mask
    out_w = new_w.to(device=problem.w.device, dtype=problem.w.dtype)
    info = {"saliency_pruned": float(rho[pruned].sum()), "blocks": len(blocks),
            "inverse": cfg.inverse, "damp": float(cfg.damp), **stats.info("inverse")}
    return PruneResult(w=out_w, mask=mask.to(problem.mask.device), info=info)
