"""gRDA directional pruning (Chao, Wang, Xing, Cheng, "Directional Pruning of Deep Neural
Networks", NeurIPS 2020; algorithms.md section 8.1).

Training (here: continued training of the dense model, or training from scratch with
`init: scratch`) with the generalised regularised dual averaging optimiser `pruning.optim.GRDA`:

  a_0 = w_0,   a_n = a_{n-1} - gamma_n grad f(w_{n-1}; Z_n)                 (dual averaging)
  g(n, gamma) = c gamma^(1/2) (n gamma)^mu, accumulated as increments
                c gamma_n^(1/2 + mu) (n^mu - (n-1)^mu) so a learning-rate change is consistent
  w_n = sign(a_n) max(|a_n| - g(n, gamma), 0)                              (soft threshold)

the closed form of w_{n+1} = argmin_w { w^T(-w_0 + gamma sum grad f) + g(n, gamma)||w||_1 + ||w||^2/2 }.
Sparsity emerges from the threshold: there is no pruning step, and the run's `sparsity` target
is recorded but not imposed (the achieved sparsity is reported). With c = 0 the iterates are
those of SGD without momentum or weight decay. The reference applies the threshold to every
parameter, biases and BN included (`scope: all`); `scope: prunable` thresholds only the
prunable tensors (the others follow the plain dual-averaging step, i.e. SGD).

Hyperparameters (README of donlan2710/gRDA-Optimizer): lr as for plain SGD; mu in (0.5, 1),
{0.501, 0.51, 0.55} recommended (larger mu, more sparsity); small c (0 < c < 0.005), the largest
that keeps test accuracy over the first epochs.

Noise: each mini-batch step runs under the run's noise hooks (`pruning.optim.noisy_backward`):
perturbed inputs, perturbed weights for the forward/backward, and the mini-batch gradient of the
prunable tensors passed to the gradient-noise hook as one row of G.

Reported (PruneResult.info): the final threshold, steps, achieved sparsity, and `structured/...`
metrics: channels that became exactly zero (whole groups, see pruning/structured.py) and the
MACs and parameters that remain when zero kernel slices are skipped.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pruning import structured
from pruning.dual_averaging import DualAveragingSettings, reinit, validate_settings
from pruning.errors import choice
from pruning.layout import get_flat
from pruning.methods.base import PruneResult, TrainContext
from pruning.optim import GRDA, stream_generators, train_loop
from pruning.structured import example_input

SCOPES = ("all", "prunable")


@dataclass(frozen=True)
class Config(DualAveragingSettings):
    scope: str = "all"           # all (reference: every parameter, BN and bias) | prunable

    def validate(self) -> None:
        validate_settings(self)
        choice(self.scope, "method.scope", SCOPES)


def channel_groups_or_none(model: nn.Module, example: torch.Tensor) -> list[structured.ChannelGroup]:
    """Channel groups when the model can be traced by torch.fx, else [] with a warning."""
    try:
        return structured.find_channel_groups(model, example)
    except Exception as exc:  # untraceable model: structured metrics fall back to the layers only
        warnings.warn(f"torch.fx could not trace the model ({type(exc).__name__}: {exc}); "
                      "no channel groups are reported", stacklevel=2)
        return []


def run(ctx: TrainContext, cfg: Config) -> PruneResult:
    model = ctx.model
    gens = stream_generators(ctx.generator)
    if cfg.init == "scratch":
        reinit(model, gens["method"])
    prunable = set(ctx.layout.names)
    named = list(model.named_parameters())
    if cfg.scope == "all":
        param_groups = [{"params": [p for _n, p in named]}]
    else:
        param_groups = [{"params": [p for n, p in named if n in prunable]},
                        {"params": [p for n, p in named if n not in prunable], "penalty": "none"}]
        param_groups = [pg for pg in param_groups if pg["params"]]
    opt = GRDA(param_groups, lr=cfg.lr, c=cfg.c, mu=cfg.mu)

    def extra() -> dict[str, float]:
        w = get_flat(model, ctx.layout)
        return {"threshold": opt.threshold(0), "sparsity": float((w == 0).float().mean())}

    stats = train_loop(ctx, opt, epochs=cfg.epochs, batch_size=cfg.batch_size, phase="grda", gens=gens,
                       noise_hooks=cfg.noise_hooks, lr_milestones=list(cfg.lr_milestones or []),
                       lr_gamma=cfg.lr_gamma, extra=extra, resumable=True)
    w = get_flat(model, ctx.layout)
    mask = w != 0
    example = example_input(ctx)
    groups = channel_groups_or_none(model, example)
    report, _keep = structured.zeros_report(model, example, groups)
    info: dict[str, Any] = {
        "threshold": opt.threshold(0),
        "steps": opt.step_count,
        "achieved_sparsity": float(1.0 - mask.float().mean()),
        "target_sparsity_not_imposed": float(ctx.sparsity),
        **{f"train/{k}": v for k, v in stats.items()},
        **report,
    }
    return PruneResult(w=w, mask=mask, info=info)
