"""What every schedule does per pruning step: the cubic sparsity schedule, one pruning step of a
weight-space method on the run's state, and the stage row of the record."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from pruning import methods
from pruning.layout import apply_mask, get_flat, set_flat, sparsity_stats
from pruning.methods.base import PruneResult, PruningProblem
from pruning.seeds import generator

if TYPE_CHECKING:
    from pruning.context import RunContext


def cubic_sparsity(t: int, t0: int, t_end: int, s_init: float, s_final: float) -> float:
    """s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t_end - t0))^3, clamped to [t0, t_end] (Zhu & Gupta,
    "To prune, or not to prune", 2017, eq. 1; WoodFisher and SWAP use it too)."""
    if t_end <= t0:
        return s_final
    frac = min(max((t - t0) / (t_end - t0), 0.0), 1.0)
    return s_final + (s_init - s_final) * (1.0 - frac) ** 3


def prune_step(job: RunContext, sparsity: float, stage: int, num_stages: int, w_bar: torch.Tensor) -> PruneResult:
    """Prune the state's model to `sparsity` with the run's method (G at the current weights when
    the method needs it), anchored at `w_bar`; the new weights and mask go into the state."""
    st, name = job.state, job.cfg.method.name
    w = get_flat(st.model, st.layout)
    grads = job.gradient_matrix(stage) if methods.needs_gradients(name) else None
    problem = PruningProblem(layout=st.layout, w=w, w_bar=w_bar, mask=st.mask.clone(), grads=grads,
                             generator=generator(int(job.cfg.seed), f"method/{stage}"), stage=stage,
                             num_stages=num_stages, progress=job.progress, loss=job.masked_loss)
    result = methods.get(name).prune(problem, sparsity, job.method_config())
    # when the target keeps more weights than are left, a top-k fills the mask with pruned weights
    # picked by index, still at zero, which training would regrow: they stay pruned. A pruned weight
    # the method gives a value (lr/swap anchored at the dense weights in the SWAP protocol) is its choice.
    filler = result.mask.to(st.mask.device) & ~st.mask & (result.w.to(st.mask.device) == 0)
    if bool(filler.any()):
        job.record.warn(f"stage {stage}: the target sparsity {sparsity:g} keeps more weights than the "
                        f"{int(st.mask.sum())} left; the {int(filler.sum())} pruned ones the method kept at zero "
                        f"stay pruned")
        result.mask = result.mask & ~filler.to(result.mask.device)
    set_flat(st.model, st.layout, result.w * result.mask)
    st.mask = result.mask.to(st.device)
    apply_mask(st.model, st.layout, st.mask)
    return result


def timed_step(job: RunContext, sparsity: float, stage: int, num_stages: int, w_bar: torch.Tensor, **extra: Any) -> None:
    """`prune_step`, then its stage row with the seconds it took."""
    t0 = time.perf_counter()
    result = prune_step(job, sparsity, stage, num_stages, w_bar)
    record_stage(job, stage, sparsity, result, time.perf_counter() - t0, **extra)


def record_stage(job: RunContext, stage: int, target: float, result: PruneResult | None, seconds: float,
                 **extra: Any) -> None:
    """The stage row (target and achieved sparsity, test accuracy and loss, the method's scalar
    info) in the record and the metrics stream, and its console line."""
    ev = job.evaluate()
    stats = sparsity_stats(job.state.model, job.state.layout)
    row = {"stage": stage, "target_sparsity": target, "sparsity": stats["sparsity_prunable"],
           "acc": ev["acc"], "loss": ev["loss"], "seconds": round(seconds, 4), **extra}
    if result is not None:
        row.update({k: v for k, v in result.info.items() if isinstance(v, (int, float, str, bool))})
    job.record.add_stage(row)
    job.log({"phase": "prune", **row})
    job.say(f"  stage {stage}: target {target:.4f} achieved {row['sparsity']:.4f} acc {ev['acc']:.4f}")
    method = job.cfg.method.name
    if row.get("no_progress"):  # the solver returned its start (e.g. magnitude pruning): say so
        job.record.warn(f"stage {stage}: {method} made no progress from its starting point "
                        f"({row.get('no_progress_reason', 'no step')})")
    if row.get("sinkhorn_converged") is False:  # the plan is not a coupling: its objective means little
        job.record.warn(f"stage {stage}: {method}'s transport plan did not converge "
                        f"(method.sinkhorn_method={row.get('sinkhorn_method')}, relative marginal error "
                        f"{row.get('marginal_error_rel', float('nan')):.3g} after {row.get('sinkhorn_iterations')} "
                        f"iterations); method.sinkhorn_method=auto falls back to Newton, or raise method.epsilon")
