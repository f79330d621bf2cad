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
from pruning.errors import ConfigError
from pruning.layout import get_flat
from pruning.methods.base import PruneResult, TrainContext
from pruning.optim import GRDA, stream_generators, train_loop

KIND = "train"
NEEDS_GRADIENTS = False


def _positive(value: Any, key: str, strict: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > 0 if strict else value >= 0)
    if not ok:
        raise ConfigError(key, value, "a number > 0" if strict else "a number >= 0")


def validate_common(cfg: Any, prefix: str = "method") -> None:
    """Checks shared by grda and sdprun."""
    _positive(cfg.lr, f"{prefix}.lr")
    _positive(cfg.c, f"{prefix}.c", strict=False)
    if not isinstance(cfg.mu, (int, float)) or isinstance(cfg.mu, bool) or not 0.0 <= cfg.mu < 1.0:
        raise ConfigError(f"{prefix}.mu", cfg.mu, "a number in [0, 1) (0.5 < mu < 1 in the paper)")
    if not isinstance(cfg.epochs, (int, float)) or isinstance(cfg.epochs, bool) or cfg.epochs < 0:
        raise ConfigError(f"{prefix}.epochs", cfg.epochs, "a number >= 0 (fractions run part of an epoch)")
    if not isinstance(cfg.batch_size, int) or isinstance(cfg.batch_size, bool) or cfg.batch_size <= 0:
        raise ConfigError(f"{prefix}.batch_size", cfg.batch_size, "a positive integer")
    _positive(cfg.lr_gamma, f"{prefix}.lr_gamma")
    ms = list(cfg.lr_milestones or [])
    if any(not isinstance(m, int) or isinstance(m, bool) or m < 0 for m in ms):
        raise ConfigError(f"{prefix}.lr_milestones", ms, "a list of epoch numbers (integers >= 0)")
    if cfg.init not in ("pretrained", "scratch"):
        raise ConfigError(f"{prefix}.init", cfg.init, "pretrained, scratch")


@dataclass(frozen=True)
class DualAveragingSettings:
    """The gRDA settings shared by grda and sdprun (sdprun is gRDA with a group threshold)."""

    lr: float = 0.1
    c: float = 0.005
    mu: float = 0.55
    epochs: float = 10
    batch_size: int = 64
    lr_milestones: Any = ()      # epochs at which lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    init: str = "pretrained"     # pretrained (continue from the dense model) | scratch
    noise_hooks: bool = True     # apply the run's noise hooks to every training step


@dataclass(frozen=True)
class Config(DualAveragingSettings):
    scope: str = "all"           # all (reference: every parameter) | prunable

    def validate(self) -> None:
        validate_common(self)
        if self.scope not in ("all", "prunable"):
            raise ConfigError("method.scope", self.scope, "all, prunable")


def example_input(ctx: TrainContext) -> torch.Tensor:
    """One calibration example, batch of 1, on the run's device (for tracing and FLOPs)."""
    x = ctx.data.calib[0][0]
    return torch.as_tensor(x).unsqueeze(0).to(ctx.device)


def reinit(model: nn.Module, gen: torch.Generator) -> None:
    """Fresh initialisation of every module with `reset_parameters`, seeded from `gen`."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen).item())
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    finally:
        torch.random.set_rng_state(state)


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
