"""LR / CHITA: pruning as cardinality-constrained sparse ridge regression on the gradient matrix.

Benbaki, Chen, Meng, Hazimeh, Ponomareva, Zhao, Mazumder, "Fast as CHITA: Neural Network Pruning
with Combinatorial Optimization", ICML 2023 (code: mazumder-lab/CHITA, `CHITA_opt/L0_card_const.py`);
also the "LR" arm of SWAP (You & Cheng, ICLR 2024). algorithms.md sections 1.1 and 5.1.

With G (N x p, rows = per-sample gradients at the current weights), the anchor w_bar and
y = G w_bar, one pruning step solves

    min_w  Q_LR(w) = 1/2 ||y - G w||^2 + (N lam / 2) ||w - w_bar||^2   s.t.  ||w||_0 <= k,

k = floor((1 - s) p) (`pruning.layout.num_kept`), lam = `lam` (CHITA `l2`, SWAP lambda = 0.01).
Gradient: grad Q_LR = G^T (G w - y) + N lam (w - w_bar).

`algorithm` (all in `pruning.sparse_regression`, which `swap` shares; with the plan I/N the two
methods run identical iterations):

* ``active_iht`` (default, CHITA `Active_IHTCDLS`): IHT with exact line search (CHITA
  `hard_thresholding_ls`: the step tau* = <grad, d_S> / (||G d_S||^2 + N lam ||d_S||^2) that
  minimises Q along the gradient on the current support, taken when it is below the
  support-change bound, else step expansion from that bound) on an active set that starts from
  the support of one IHT step with int(1.5 k) non-zeros (CHITA kimp) and grows by an outlier search.
* ``iht``: the same IHT with line search on all p columns.
* ``backsolve`` (CHITA `Heuristic_LS`): support = top-k |w_bar| (or one IHT step), then the ridge
  least squares on the support, (G_S^T G_S + N lam I) w_S = G_S^T y + N lam w_bar_S, solved in
  the N x N space with Woodbury when N < k.

lr's defaults beyond the solver shared with `swap` (whose defaults keep the original behaviour):

* ``drop_zero_columns`` (CHITA's `*_PP` wrappers): weights whose column of G is all zero (inputs
  that are always zero, dead units, weights pruned earlier) are left out of the solve and pruned
  for free; Q still counts their ridge term (N lam / 2) w_bar_j^2.
* ``support_steps: cg``: while the support does not change, steps follow conjugate directions
  (Polak-Ribiere+, exact line search): on a fixed support Q is quadratic and these are linear CG
  steps, so the solve stops on its tolerance `ftol` instead of creeping at steepest descent's rate
  until `max_iter` (info `max_iter_hit` records whether any inner solve hit the cap, `stops` how
  each active-set round ended).
* ``finish: backsolve``: the final support gets the exact ridge minimiser above (CHITA
  `Heuristic_LS` on the support IHT chose; info `objective_iht` is Q before it), refined to the float64
  solution whatever G's dtype.

``block_size`` (CHITA ``Heuristic_LSBlock``, the variant its ResNet scripts run with
``block_size > 0``): ``full`` (default) is the one regression above. Otherwise Q is made
block-diagonal over blocks b (``null``: G's blocks, one per tensor by default; an integer B: each
tensor cut into chunks of at most B, where CHITA's ``get_blocklist`` cuts chunks of about B): the
support is the global top-k of |w_bar| (with ``drop_zero_columns``, all-zero columns first out),
which fixes each block's k_b, and every block is backsolved on its own targets,

    min_{w_b}  1/2 ||G_b w_bar_b - G_b w_b||^2 + (N lam / 2)||w_b - w_bar_b||^2  on its k_b weights,

so no block sees another's residual. The cost is that of the backsolves, O(N^2 k_b) per block in
the Woodbury form, and each block is the WoodFisher per-block OBS update of the magnitude support
with ridge lam for the damping.

Never forms a p x p matrix; G is used through matvec / rmatvec and column subsets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pruning.fisher import check_block_size, method_blocks
from pruning.layout import topk_mask
from pruning.methods.base import PruneResult, PruningProblem
from pruning.sparse_regression import (
    IdentityPlan,
    PlanRegression,
    SolverConfig,
    backsolve,
    nonzero_columns,
    regression_problem,
    solve,
    solve_info,
)


@dataclass(frozen=True)
class Config(SolverConfig):
    """The solver knobs of `pruning.sparse_regression.SolverConfig` (CHITA's solver; lam = 0.01 is
    SWAP's lambda, shared with `swap` so the two arms solve one objective; CHITA's scripts use
    l2 = 1e-4, which oneshot_resnet20_cifar10 sets), with CHITA's zero-column drop, conjugate steps
    on a fixed support and the final backsolve on."""

    # CHITA Active_IHTCDLS_PP: all-zero columns of G are pruned for free (swap keeps them: false)
    drop_zero_columns: bool = True
    # cg: conjugate steps while the support is fixed, stops on ftol (steepest descent on a support hits
    # max_iter) | gradient (CHITA, swap)
    support_steps: str = "cg"
    # backsolve: exact ridge minimiser on the final support (CHITA Heuristic_LS) | none
    finish: str = "backsolve"
    # full: one regression over all weights | null: block-diagonal over G's blocks (one per tensor by
    # default) | B: blocks of at most B weights per tensor. Blocks = CHITA Heuristic_LSBlock: magnitude
    # support, each block backsolved on its own targets
    block_size: int | str | None = "full"

    def validate(self) -> None:
        super().validate()
        check_block_size(self.block_size, ("full",), "full, null (G's blocks), a positive integer")


def prune(problem: PruningProblem, sparsity: float, cfg: Config) -> PruneResult:
    t0 = time.perf_counter()
    if cfg.block_size != "full":
        return _block_prune(problem, sparsity, cfg, t0)
    op, k, w_bar, y = regression_problem(problem, sparsity, cfg, "lr")
    res = solve(op, y, w_bar, problem.w, k, IdentityPlan(op.num_rows), cfg, direction="gradient")
    info = solve_info(res, k, cfg.algorithm, time.perf_counter() - t0)
    return PruneResult(w=res.w, mask=res.mask, info=info)


def _block_prune(problem: PruningProblem, sparsity: float, cfg: Config, t0: float) -> PruneResult:
    """CHITA Heuristic_LSBlock: the global magnitude support, then each block's own ridge backsolve."""
    op, k, w_bar, _ = regression_problem(problem, sparsity, cfg, "lr", targets=False)
    w_bar = w_bar.to(op.device, op.dtype)
    score = w_bar.abs().to(torch.float64)
    dropped = 0
    if cfg.drop_zero_columns:
        nz = nonzero_columns(op).to(score.device)
        dropped = int((~nz).sum())
        score[~nz] = -1.0  # below every |w_bar|: pruned first, for free
    mask = topk_mask(score, k)
    w = torch.zeros_like(w_bar)
    objective = 0.0
    blocks = method_blocks(problem.layout, problem.grads, cfg.block_size)
    for sl in blocks:
        sub = op.restrict(torch.arange(sl.start, sl.stop))
        wb = w_bar[sl]
        obj = PlanRegression(sub.matvec(wb), wb, cfg.lam, IdentityPlan(op.num_rows))
        res = backsolve(obj, sub, wb, int(mask[sl].sum()), cfg, mask=mask[sl])
        w[sl] = res.w
        objective += res.objective
    info = {"objective": objective, "k": k, "algorithm": "block_backsolve", "blocks": len(blocks),
            "dropped_columns": dropped, "solve_seconds": round(time.perf_counter() - t0, 4)}
    return PruneResult(w=w.to(problem.w.device, problem.w.dtype), mask=mask.to(problem.w.device), info=info)
