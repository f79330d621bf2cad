"""WoodFisher: Singh & Alistarh, "WoodFisher: Efficient Second-Order Approximation for Neural
Network Compression", NeurIPS 2020 (algorithms.md section 3).

Per block b of the prunable weights (one per tensor, tensors cut into chunks of at most B, or one
block over everything with `block_size: full`; the default `auto` is full for models of at most
FULL_BLOCK_MAX weights, as the reference's MLPNet runs), with G_b the N x B columns of the gradient matrix
(columns of already-pruned weights zeroed, as the reference masks its gradients):

  dampened empirical Fisher   F_b = lambda I + (1/N) G_b^T G_b                            (WF eq. 3)
  Woodbury closed form        F_b^-1 = (1/lambda) [I - G_b^T (N lambda I_N + G_b G_b^T)^-1 G_b]
  rank-1 recursion            F_0^-1 = I / lambda,
                              F_n^-1 = F_{n-1}^-1 - (F_{n-1}^-1 g_n)(F_{n-1}^-1 g_n)^T / (N + g_n^T F_{n-1}^-1 g_n)
                                                                                          (WF eq. 11)
  OBS saliency                rho_q = w_q^2 / (2 [F^-1]_qq)                               (WF eq. 5)
  pruning update              delta = -c_u F^-1 sum_{q in Q} (w_q / [F^-1]_qq) e_q        (WF eq. 4, summed
                              over the pruned set Q; c_u = update_scale, 0 gives OBD)

When N < B (`inverse: auto`) no B x B matrix is formed: diag(F_b^-1) and F_b^-1 v come from the
Cholesky factor of the N x N matrix N lambda I + G_b G_b^T, in O(N^2 B + N^3) time and O(N B)
memory. When N >= B a dense B x B inverse is used (`dense`); `rank1` is the paper's recursion,
kept as a reference (O(N B^2)). Selection is global (one threshold over all rho, the reference's
`--woodburry-joint-sparsify`) or layerwise (the same sparsity in every tensor). After the update the
new mask is applied, so pruned weights are exactly zero (`--zero-after-prune`). The factor and
diag(F^-1) of each block (and G G^T) go through `pruning.factor_cache`: other sparsities, methods
and jobs of the same G, mask and damp reuse them (stage info `factor_cache`, `factor_seconds`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from pruning import factor_cache
from pruning.errors import ConfigError, choice
from pruning.gradients import GradientMatrix
from pruning.layout import ParamLayout, select_mask
from pruning.methods.base import PruneResult, PruningProblem

NEEDS_GRADIENTS = True

INVERSES = ("auto", "woodbury", "dense", "rank1")
DTYPES = {"float64": torch.float64, "float32": torch.float32}
_KEEP_FACTORS = 1 << 27  # elements of block factors kept between the two passes (1 GiB in fp64)


@dataclass(frozen=True)
class Config:
    damp: float = 1e-5                  # lambda, additive dampening (the reference scripts' fisher_damp)
    scope: str = "global"               # global (joint threshold) | layerwise
    update_scale: float = 1.0           # c_u: 1 = OBS (reference default), 0 = OBD, CBS/SWAP scripts 0.9
    block_size: int | str | None = "auto"  # auto | null = G's blocks (calibration.block_size) | B | "full"
    inverse: str = "auto"               # auto | woodbury | dense | rank1 (reference recursion)
    dtype: str = "float64"              # precision of the block algebra

    def validate(self) -> None:
        validate_common(self)


def validate_common(cfg: Config) -> None:
    """Checks shared with CBS (which has the same damp/scope/block_size/dtype keys)."""
    if isinstance(cfg.damp, bool) or not isinstance(cfg.damp, (int, float)) or not cfg.damp > 0:
        raise ConfigError("method.damp", cfg.damp, "a number > 0")
    if cfg.scope not in ("global", "layerwise"):
        raise ConfigError("method.scope", cfg.scope, "global, layerwise")
    us = cfg.update_scale
    if isinstance(us, bool) or not isinstance(us, (int, float)) or not math.isfinite(us) or us < 0:
        raise ConfigError("method.update_scale", us, "a number >= 0 (1 = OBS, 0 = OBD)")
    bs = cfg.block_size
    if not (bs is None or bs in ("full", "auto") or (isinstance(bs, int) and not isinstance(bs, bool) and bs > 0)):
        raise ConfigError("method.block_size", bs, "auto, null (G's blocks), a positive integer, full")
    if getattr(cfg, "inverse", "auto") not in INVERSES:
        raise ConfigError("method.inverse", cfg.inverse, ", ".join(INVERSES))
    choice(cfg.dtype, "method.dtype", DTYPES)


# `block_size: auto` takes one full Fisher block up to this many prunable weights: the reference
# prunes MLPNet (32,360 weights) with the full p x p Fisher (WoodFisher `woodfisher` pruner, the CBS
# MLPNet scripts) and ResNet-20 (0.27M) and larger per layer (`woodfisherblock`).
FULL_BLOCK_MAX = 50_000


def method_blocks(layout: ParamLayout, G: GradientMatrix, block_size: int | str | None) -> list[slice]:
    """The Fisher blocks: G's own (None), chunks of at most B per tensor, one block ("full"), or
    "auto": one block for a small model (at most FULL_BLOCK_MAX weights) whose G has the default
    per-layer blocks, else G's blocks."""
    if block_size == "auto":
        per_layer = [(sl.start, sl.stop) for sl in G.blocks] == [(sl.start, sl.stop) for sl in layout.slices()]
        block_size = "full" if per_layer and layout.numel <= FULL_BLOCK_MAX else None
    if block_size is None:
        return list(G.blocks)
    if block_size == "full":
        return [slice(0, layout.numel)]
    return layout.blocks(int(block_size))


# ------------------------------------------------------------------------------ block inverse
def fisher_inverse_rank1(G: torch.Tensor, damp: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense F^-1 of F = damp I + G^T G / N by N rank-1 Sherman-Morrison updates (the paper's
    recursion; reference implementation, O(N B^2) time and B x B memory)."""
    n, b = G.shape
    G = G.to(dtype)
    Finv = torch.eye(b, dtype=dtype, device=G.device) / damp
    for i in range(n):
        u = Finv @ G[i]
        Finv.sub_(torch.outer(u, u), alpha=1.0 / float(n + G[i] @ u))
    return Finv


def fisher_inverse_dense(G: torch.Tensor, damp: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense F^-1 by a Cholesky factorisation of the B x B matrix F."""
    n = G.shape[0]
    G = G.to(dtype)
    F = G.T @ G / n
    F.diagonal().add_(damp)
    return torch.cholesky_inverse(_cholesky(F, "F = damp I + G^T G / N"))


def _cholesky(A: torch.Tensor, what: str) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise FloatingPointError(f"Cholesky of {what} failed (not positive definite in {A.dtype}); "
                                 "raise method.damp or use method.dtype=float64")
    return L


class BlockInverse:
    """F^-1 for one block, F = damp I + (1/N) G^T G, without a B x B matrix on the Woodbury path.

    `method`: woodbury (the N x N closed form), dense (B x B Cholesky inverse), rank1 (the
    recursion), auto (woodbury when N < B, else dense). `factor` reuses the result of `factor()`
    of an earlier object built on the same G (Cholesky factor or dense inverse); `gram` is G G^T
    when already known (`pruning.factor_cache.gram`), so only the damp and the Cholesky remain.
    """

    def __init__(self, G: torch.Tensor, damp: float, method: str = "auto", dtype: torch.dtype = torch.float64,
                 factor: torch.Tensor | None = None, gram: torch.Tensor | None = None):
        if method not in INVERSES:
            raise ValueError(f"method={method!r} is not one of {INVERSES}")
        self.N, self.B = G.shape
        self.damp = float(damp)
        self.method = ("woodbury" if self.N < self.B else "dense") if method == "auto" else method
        self.G = G.to(dtype)
        if self.method == "woodbury":
            if factor is None:
                K = self.G @ self.G.T if gram is None else gram.to(dtype, copy=True)
                K.diagonal().add_(self.N * self.damp)
                factor = _cholesky(K, "N damp I + G G^T")
            self.L = factor
        elif factor is not None:
            self.Finv = factor
        elif self.method == "dense":
            self.Finv = fisher_inverse_dense(self.G, self.damp, dtype)
        else:
            self.Finv = fisher_inverse_rank1(self.G, self.damp, dtype)

    def factor(self) -> torch.Tensor:
        return self.L if self.method == "woodbury" else self.Finv

    def diag(self, chunk: int | None = None) -> torch.Tensor:
        """diag(F^-1) = (1 - ||L^-1 g_q||^2) / damp on the Woodbury path, `chunk` columns per
        triangular solve (default: 2^24 / N, so each solve's N x chunk result stays near 128 MiB
        in float64 while small N still gets few, large calls)."""
        if self.method != "woodbury":
            return self.Finv.diagonal().clone()
        chunk = chunk or max(4096, (1 << 24) // max(self.N, 1))
        out = torch.empty(self.B, dtype=self.G.dtype, device=self.G.device)
        for s in range(0, self.B, chunk):
            Z = torch.linalg.solve_triangular(self.L, self.G[:, s:s + chunk], upper=False)
            out[s:s + chunk] = (1.0 - Z.pow(2).sum(0)) / self.damp
        return out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """F^-1 v for v of shape (B,) or (B, k)."""
        v = v.to(self.G.dtype)
        if self.method != "woodbury":
            return self.Finv @ v
        Gv = self.G @ v
        rhs = Gv.unsqueeze(1) if Gv.dim() == 1 else Gv
        sol = torch.cholesky_solve(rhs, self.L)
        sol = sol.squeeze(1) if v.dim() == 1 else sol
        return (v - self.G.T @ sol) / self.damp

    def dense(self) -> torch.Tensor:
        """F^-1 as a B x B matrix (tests and small blocks only)."""
        if self.method != "woodbury":
            return self.Finv
        return self.matvec(torch.eye(self.B, dtype=self.G.dtype, device=self.G.device))


def cached_inverse(G: GradientMatrix, sl: slice, mask: torch.Tensor, damp: float, method: str,
                   device: torch.device, dtype: torch.dtype,
                   stats: factor_cache.CacheStats) -> tuple[BlockInverse, torch.Tensor]:
    """The block inverse of columns `sl` (pruned columns zeroed by `mask`) and diag(F^-1), through
    `pruning.factor_cache`: the factor (L or the dense F^-1) and the diagonal are computed once per
    (G, block, mask, damp, inverse, dtype) and G G^T once per (G, block, mask, dtype)."""
    Gb = masked_block(G, sl, mask, device, dtype)
    n, b = Gb.shape
    resolved = ("woodbury" if n < b else "dense") if method == "auto" else method
    identity = factor_cache.matrix_identity(G, Gb)

    def compute() -> dict[str, torch.Tensor]:
        K = factor_cache.gram(G, Gb, sl, mask, stats, identity) if resolved == "woodbury" else None
        inv = BlockInverse(Gb, damp, resolved, dtype, gram=K)
        return {"factor": inv.factor(), "diag": inv.diag()}

    parts = {"block": [sl.start, sl.stop], "rows": n, "dtype": str(dtype), "mask": factor_cache.mask_hash(mask[sl]),
             "damp": float(damp), "inverse": resolved}
    shapes = {"factor": (n, n) if resolved == "woodbury" else (b, b), "diag": (b,)}
    got = factor_cache.lookup(G, "inverse", identity, parts, shapes, dtype, device, compute, stats)
    return BlockInverse(Gb, damp, resolved, dtype, factor=got["factor"]), got["diag"]


# ------------------------------------------------------------------------------------ pruning
def masked_block(G: GradientMatrix, sl: slice, mask: torch.Tensor, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """Columns `sl` of G in `dtype` on `device`, with the columns of pruned weights zeroed (one
    copy of the block: a G on disk hands out fresh reads, masked in place)."""
    fresh = G.on_disk
    Gb = G.columns(sl).to(device=device, dtype=dtype, copy=not fresh)
    return Gb.mul_(mask[sl].to(device=device, dtype=dtype))


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
