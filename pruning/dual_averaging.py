"""Settings and helpers shared by the dual-averaging methods gRDA and sDprun
(pruning/methods/grda.py and pruning/methods/sdprun.py cite the papers).

Both train with regularised dual averaging (`pruning.optim.GRDA`):

  a_0 = w_0,   a_n = a_{n-1} - gamma_n grad f(w_{n-1}; Z_n)                 (dual averaging)
  g(n, gamma) = c gamma^(1/2) (n gamma)^mu                                    (threshold)

gRDA soft-thresholds each weight by g, sDprun each channel group; `lr` is gamma, `c` and `mu` the
threshold's scale and growth. `init: scratch` starts from a fresh initialisation (`reinit`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pruning.errors import choice, integer, number, require

INITS = ("pretrained", "scratch")


@dataclass(frozen=True)
class DualAveragingSettings:
    """The gRDA settings shared by grda and sdprun (sdprun is gRDA with a group threshold)."""

    lr: float = 0.1              # gamma, as for SGD without momentum
    c: float = 0.005             # threshold scale (gRDA README: 0 < c < 0.005; c = 0 is plain SGD)
    mu: float = 0.55             # threshold growth in (0.5, 1); larger = sparser (0.501, 0.51, 0.55)
    epochs: float = 10           # training epochs from the dense model (fractions allowed)
    batch_size: int = 64
    lr_milestones: Any = ()      # epochs at which lr is multiplied by lr_gamma (the threshold stays consistent)
    lr_gamma: float = 0.1
    init: str = "pretrained"     # pretrained (continue from the dense model) | scratch
    noise_hooks: bool = True     # every training step under the run's noise hooks


def validate_settings(cfg: DualAveragingSettings) -> None:
    """Checks of the keys grda and sdprun share."""
    number(cfg.lr, "method.lr", lo=0.0, lo_open=True, allowed="a number > 0", fractions=False)
    number(cfg.c, "method.c", lo=0.0, allowed="a number >= 0", fractions=False)
    number(cfg.mu, "method.mu", lo=0.0, hi=1.0, hi_open=True,
           allowed="a number in [0, 1) (0.5 < mu < 1 in the paper)", fractions=False)
    number(cfg.epochs, "method.epochs", lo=0.0, allowed="a number >= 0 (fractions run part of an epoch)",
           fractions=False)
    integer(cfg.batch_size, "method.batch_size", lo=1, allowed="a positive integer")
    number(cfg.lr_gamma, "method.lr_gamma", lo=0.0, lo_open=True, allowed="a number > 0", fractions=False)
    ms = list(cfg.lr_milestones or [])
    require(all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in ms),
            "method.lr_milestones", ms, "a list of epoch numbers (integers >= 0)")
    choice(cfg.init, "method.init", INITS)


def reinit(model: nn.Module, gen: torch.Generator) -> None:
    """Fresh initialisation of every module with `reset_parameters`, seeded from `gen` (`init: scratch`)."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen).item())
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    finally:
        torch.random.set_rng_state(state)
