"""Block empirical-Fisher algebra shared by WoodFisher and CBS (pruning/methods/woodfisher.py,
pruning/methods/cbs.py cite the papers).

Per block b of the prunable weights, with G_b the N x B columns of the gradient matrix (columns of
already-pruned weights zeroed by `masked_block`):

  dampened empirical Fisher   F_b = lambda I + (1/N) G_b^T G_b                            (WF eq. 3)
  Woodbury closed form        F_b^-1 = (1/lambda) [I - G_b^T (N lambda I_N + G_b G_b^T)^-1 G_b]
  rank-1 recursion            F_0^-1 = I / lambda,
                              F_n^-1 = F_{n-1}^-1 - (F_{n-1}^-1 g_n)(F_{n-1}^-1 g_n)^T / (N + g_n^T F_{n-1}^-1 g_n)
                                                                                          (WF eq. 11)

`BlockInverse` gives diag(F_b^-1) and F_b^-1 v without a B x B matrix on the Woodbury path (N < B);
`cached_inverse` stores its factor and diagonal through `pruning.factor_cache`; `method_blocks`
chooses the blocks (`block_size`); `validate_settings` checks the keys both methods share.
"""

from __future__ import annotations

from typing import Any

import torch

from pruning import factor_cache
from pruning.errors import choice, number, require
from pruning.gradients import GradientMatrix
from pruning.layout import ParamLayout

INVERSES = ("auto", "woodbury", "dense", "rank1")
DTYPES = {"float64": torch.float64, "float32": torch.float32}
SCOPES = ("global", "layerwise")


def validate_settings(cfg: Any) -> None:
    """Checks of the keys WoodFisher and CBS share: damp, scope, update_scale, block_size, dtype
    (and inverse, which only WoodFisher has)."""
    number(cfg.damp, "method.damp", lo=0.0, lo_open=True, allowed="a number > 0", fractions=False)
    choice(cfg.scope, "method.scope", SCOPES)
    number(cfg.update_scale, "method.update_scale", lo=0.0, allowed="a number >= 0 (1 = OBS, 0 = OBD)",
           fractions=False)
    check_block_size(cfg.block_size, ("full", "auto"), "auto, null (G's blocks), a positive integer, full")
    if hasattr(cfg, "inverse"):
        choice(cfg.inverse, "method.inverse", INVERSES)
    choice(cfg.dtype, "method.dtype", DTYPES)


def check_block_size(bs: Any, words: tuple[str, ...], allowed: str) -> None:
    """`method.block_size` of a block-diagonal method: null (G's blocks), a positive integer, or one
    of the method's `words`; `allowed` is the error's list."""
    require(bs is None or bs in words or (isinstance(bs, int) and not isinstance(bs, bool) and bs > 0),
            "method.block_size", bs, allowed)


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


# ------------------------------------------------------------------------------ masked columns
def masked_block(G: GradientMatrix, sl: slice, mask: torch.Tensor, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """Columns `sl` of G in `dtype` on `device`, with the columns of pruned weights zeroed (one
    copy of the block: a G on disk hands out fresh reads, masked in place)."""
    fresh = G.on_disk
    Gb = G.columns(sl).to(device=device, dtype=dtype, copy=not fresh)
    return Gb.mul_(mask[sl].to(device=device, dtype=dtype))
