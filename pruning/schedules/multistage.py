"""Multi-stage pruning on the cubic schedule (the SWAP protocol: You & Cheng, "SWAP: Sparse
Entropic Wasserstein Regression for Robust Network Pruning", ICLR 2024). For t = 1..T,

  s_t = s_T + (s_0 - s_T)(1 - (t - 1)/(T - 1))^3        (Zhu & Gupta's cubic, over stages)

stage t computes G at the current weights (a fresh calibration draw), prunes to s_t with targets
anchored to the dense weights (y = G w_dense), or to the current weights with `reanchor: true`
(CHITA++, Benbaki et al., ICML 2023), then optionally fine-tunes the masked model for
`finetune_epochs` (SWAP: 1) with `stage_finetune`'s optimiser (else the finetune group's). The
stage row then also records the accuracy after that fine-tuning (finetuned_acc, finetuned_loss).

Boundaries: `prune/<t>` after each stage's pruning, `stage<t>_finetune/<epoch>` in its training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from pruning import finetune
from pruning.errors import ConfigError
from pruning.layout import get_flat
from pruning.schedules.step import cubic_sparsity, timed_step
from pruning.train import TrainConfig

if TYPE_CHECKING:
    from pruning.context import RunContext


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate(cfg: Any) -> None:
    sched = cfg.schedule
    if not _is_int(sched.stages) or sched.stages < 1:
        raise ConfigError("schedule.stages", sched.stages, "a positive integer")
    epochs = sched.get("finetune_epochs", 0)
    if not _is_int(epochs) or epochs < 0:
        raise ConfigError("schedule.finetune_epochs", epochs, "an integer >= 0")
    stage_recipe(cfg)


def stage_recipe(cfg: Any) -> TrainConfig | None:
    """The per-stage fine-tuning recipe: `stage_finetune` (any TrainConfig key but epochs), else
    the finetune group's when finetune.epochs > 0, else TrainConfig's defaults; None without
    per-stage fine-tuning."""
    sched = cfg.schedule
    epochs = int(sched.get("finetune_epochs", 0))
    if epochs <= 0:
        return None
    own = sched.get("stage_finetune")
    group = own if own else (cfg.finetune if cfg.finetune.epochs else None)
    params = dict(OmegaConf.to_container(group, resolve=True)) if group is not None else {}
    return finetune.recipe(cfg, params, epochs, "schedule.stage_finetune" if own else "finetune")


def run(job: RunContext, target: float) -> None:
    sched, st = job.cfg.schedule, job.state
    T, s0 = int(sched.stages), float(sched.get("initial_sparsity", 0.0))
    tc = stage_recipe(job.cfg)
    for t in range(1, T + 1):
        if not job.ckpt.passed(f"prune/{t}"):
            anchor = get_flat(st.model, st.layout) if sched.get("reanchor", False) else st.w_dense
            timed_step(job, cubic_sparsity(t, 1, T, s0, target), t, T, anchor)
            job.ckpt.save(st, f"prune/{t}")
        if tc is not None:
            finetune.train_masked(job, tc, f"finetune/stage{t}", f"stage{t}_finetune")
            ft = job.evaluate()
            job.record.annotate_stage(t, finetuned_acc=ft["acc"], finetuned_loss=ft["loss"])
