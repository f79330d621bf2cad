"""Gradual pruning inside training (Zhu & Gupta, "To prune, or not to prune: exploring the
efficacy of pruning for model compression", 2017; the WoodFisher protocol, Singh & Alistarh,
NeurIPS 2020). Training runs for `epochs`; at the pruning epochs t = start, start + freq, ..., end
the model is pruned, before that epoch's training, to

  s_t = s_f + (s_i - s_f)(1 - (t - start)/(end - start))^3       (s_i = initial_sparsity)

anchored to the dense weights, and every step keeps the pruned weights at zero. With a G-free
method (`method=magnitude`) this is Zhu & Gupta's gradual magnitude pruning; a Fisher or
regression method computes G at the current weights at each pruning epoch. The optimiser is the
schedule's own (lr, momentum, weight_decay, lr_schedule, milestones, gamma, label_smoothing).

Boundaries: `gradual/<epoch>` after every epoch (optimizer, lr schedule, data order).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pruning import finetune
from pruning.errors import ConfigError
from pruning.schedules.step import cubic_sparsity, timed_step
from pruning.train import TrainConfig, train_config

if TYPE_CHECKING:
    from pruning.context import RunContext


def validate(cfg: Any) -> None:
    sched = cfg.schedule
    start, freq, end, epochs = int(sched.start), int(sched.freq), int(sched.end), int(sched.epochs)
    if freq <= 0 or end < start or epochs <= end:
        raise ConfigError("schedule", {"start": start, "freq": freq, "end": end, "epochs": epochs},
                          "freq > 0, start <= end < epochs", "is inconsistent")
    recipe(cfg)


def recipe(cfg: Any) -> TrainConfig:
    sched = cfg.schedule
    return train_config({"epochs": int(sched.epochs), "batch_size": int(cfg.dataset.get("batch_size", 64)),
                         "lr": float(sched.lr), "momentum": float(sched.momentum),
                         "weight_decay": float(sched.weight_decay),
                         "lr_schedule": str(sched.get("lr_schedule", "none")),
                         "milestones": tuple(int(m) for m in sched.get("milestones", ())),
                         "gamma": float(sched.get("gamma", 0.1)),
                         "label_smoothing": float(sched.get("label_smoothing", 0.0)),
                         "noise_hooks": sched.get("noise_hooks", False)}, "schedule")


def run(job: RunContext, target: float) -> None:
    sched = job.cfg.schedule
    prune_epochs = list(range(int(sched.start), int(sched.end) + 1, int(sched.freq)))

    def prune_before(epoch: int) -> None:
        if epoch in prune_epochs:
            s_t = cubic_sparsity(epoch, prune_epochs[0], prune_epochs[-1], float(sched.initial_sparsity), target)
            stage = len(job.record.stages) + 1
            timed_step(job, s_t, stage, len(prune_epochs), job.state.w_dense, epoch=epoch)

    finetune.train_masked(job, recipe(job.cfg), "gradual-order", "gradual", on_epoch_start=prune_before)
