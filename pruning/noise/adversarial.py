"""Adversarial inputs (`noise=adversarial`): FGSM (Goodfellow, Shlens & Szegedy, "Explaining and
harnessing adversarial examples", ICLR 2015) and PGD (Madry et al., "Towards deep learning models
resistant to adversarial attacks", ICLR 2018), under the L-infinity or L2 norm, written in-house
with torchattacks' conventions (ecosystem.md section 5.2; torchattacks is not a dependency).

Inputs live in pixel space, inside the data's valid range [lo, hi] (`DataBundle.bounds`;
normalisation is inside the model), so every iterate is clipped to [lo, hi] directly. With
L(x) the summed cross-entropy of the batch and g = grad_x L:

  FGSM  linf  x' = clip(x + eps sign(g))
        l2    x' = clip(x + eps g / ||g||_2)                     (per example)
  PGD   x_0 = x, or with random_start x_0 = clip(x + delta), delta ~ U(-eps, eps)^n (linf) or
        uniform in the L2 ball of radius eps (l2); then `steps` times
        linf  x_{k+1} = clip(x + clamp(x_k + alpha sign(g_k) - x, -eps, eps))
        l2    x_{k+1} = clip(x + P_eps(x_k + alpha g_k / ||g_k||_2 - x)),  P_eps scales a delta
              of norm > eps back to norm eps
  alpha: null = 2.5 eps / steps (Madry et al.), which is torchattacks' 2/255 at eps = 8/255,
  steps = 10. Clipping to the box after the projection keeps the iterate in the eps-ball (x is
  inside the box).

The model is put in eval mode during the attack (BatchNorm statistics frozen, dropout off) and
its mode is restored afterwards; only the input gradient is computed (parameter .grad untouched).
The random start draws from the generator passed in (never the global RNG).

Hook points (`apply_to`):
  calibration  a share `fraction` of the calibration examples (floor(fraction n), uniform without
               replacement) is replaced by attacked copies at `eps`, so G sees the gradients of
               adversarial inputs (the SWAP abstract's "noisy gradients from adversarial attacks")
  eval         robust accuracy and loss of the final model at each eps in `eval_eps` (eps = 0 is
               the clean test set): flat keys `robust_acc@eps=<eps>`, `robust_loss@eps=<eps>`
`level` is eps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from pruning.errors import choice, flag, integer, number, numbers
from pruning.noise import (
    NoiseModel,
    apply_to,
    draw_normal,
    draw_uniform,
    metric_number,
    parse_config,
)
from pruning.train import evaluate as evaluate_model

ATTACKS = ("fgsm", "pgd")
NORMS = ("linf", "l2")


def _per_example_norm(v: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example, shaped to broadcast against v."""
    return v.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, *([1] * (v.dim() - 1)))


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = _per_example_norm(delta)
    return delta * torch.clamp(eps / n, max=1.0)


def _step(grad: torch.Tensor, size: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return size * grad.sign()
    return size * grad / _per_example_norm(grad)


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    return g.detach()


def random_start(x: torch.Tensor, eps: float, norm: str, gen: torch.Generator) -> torch.Tensor:
    """A random point of the eps-ball around x (before clipping to the valid range)."""
    if norm == "linf":
        return x + (2.0 * draw_uniform(x.shape, gen, x) - 1.0) * eps
    direction = draw_normal(x.shape, gen, x)
    direction = direction / _per_example_norm(direction)
    n = x[0].numel()
    radius = draw_uniform((x.shape[0],), gen, x).pow(1.0 / n).view(-1, *([1] * (x.dim() - 1)))
    return x + eps * radius * direction


def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, method: str = "pgd", norm: str = "linf",
           eps: float = 8 / 255, alpha: float | None = None, steps: int = 10, random_init: bool = True,
           bounds: tuple[float, float] = (0.0, 1.0), gen: torch.Generator | None = None) -> torch.Tensor:
    """Adversarial copies of x (detached) by FGSM or PGD; see the module docstring.

    `gen` is needed for PGD's random start (method="pgd", random_init=True).
    """
    if method not in ATTACKS:
        raise ValueError(f"method={method!r} is not one of {ATTACKS}")
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not one of {NORMS}")
    lo, hi = bounds
    x = x.detach()
    if eps <= 0 or x.shape[0] == 0:
        return x.clone()
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            if method == "fgsm":
                return (x + _step(_input_grad(model, x, y), eps, norm)).clamp(lo, hi).detach()
            size = alpha if alpha is not None else 2.5 * eps / max(steps, 1)
            if random_init:
                if gen is None:
                    raise ValueError("PGD with a random start needs a generator (paired draws)")
                x_adv = random_start(x, eps, norm, gen).clamp(lo, hi)
            else:
                x_adv = x.clone()
            for _ in range(steps):
                x_adv = x_adv + _step(_input_grad(model, x_adv, y), size, norm)
                x_adv = (x + _project(x_adv - x, eps, norm)).clamp(lo, hi).detach()
            return x_adv
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------- noise model
@dataclass(frozen=True)
class Config:
    attack: str = "pgd"                      # fgsm | pgd
    norm: str = "linf"                       # linf | l2
    eps: Any = 8 / 255                       # radius of the attack on calibration inputs (level; torchattacks default)
    alpha: Any = None                        # PGD step; null = 2.5 eps / steps (= 2/255 at eps 8/255, 10 steps)
    steps: int = 10                          # PGD iterations
    random_start: bool = True                # PGD starts at a uniform point of the eps-ball (own generator)
    apply_to: Any = ("calibration", "eval")  # calibration and/or eval
    fraction: Any = 0.5                      # share of calibration examples replaced by adversarial ones
    eval_eps: Any = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255)  # robust accuracy grid: 0, 1, 2, 4, 8 /255
    chunk_size: int = 256                    # examples attacked at once (memory)

    def validate(self) -> Config:
        return dataclasses.replace(
            self,
            random_start=flag(self.random_start, "noise.random_start"),
            attack=choice(self.attack, "noise.attack", ATTACKS),
            norm=choice(self.norm, "noise.norm", NORMS),
            eps=number(self.eps, "noise.eps", lo=0.0),
            alpha=None if self.alpha is None else number(self.alpha, "noise.alpha", lo=0.0, lo_open=True),
            steps=integer(self.steps, "noise.steps", lo=1),
            apply_to=apply_to(self.apply_to, "noise.apply_to"),
            fraction=number(self.fraction, "noise.fraction", lo=0.0, hi=1.0),
            eval_eps=numbers(self.eval_eps, "noise.eval_eps", lo=0.0),
            chunk_size=integer(self.chunk_size, "noise.chunk_size", lo=1),
        )


class AdversarialNoise(NoiseModel):
    """FGSM/PGD at `calibration_inputs` and/or `evaluate`."""

    kind = "adversarial"
    ACTS_ON = frozenset({"inputs", "evaluation"})

    def __init__(self, cfg: Config, bounds: tuple[float, float] = (0.0, 1.0)):
        self.cfg = cfg.validate()
        self.bounds = bounds

    @property
    def level(self) -> float:
        return float(self.cfg.eps)

    def bind(self, data: Any) -> None:
        self.bounds = tuple(float(b) for b in getattr(data, "bounds", self.bounds))

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                gen: torch.Generator, bounds: tuple[float, float] | None = None) -> torch.Tensor:
        """The configured attack at radius eps, chunk by chunk."""
        c = self.cfg
        parts = [attack(model, x[s:s + c.chunk_size], y[s:s + c.chunk_size], method=c.attack, norm=c.norm,
                        eps=eps, alpha=c.alpha, steps=c.steps, random_init=c.random_start,
                        bounds=bounds or self.bounds, gen=gen)
                 for s in range(0, x.shape[0], c.chunk_size)]
        return torch.cat(parts) if parts else x.detach().clone()

    def calibration_inputs(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                           gen: torch.Generator) -> torch.Tensor:
        c = self.cfg
        if "calibration" not in c.apply_to:
            return x
        k = int(math.floor(c.fraction * x.shape[0] + 1e-9))
        if k == 0 or c.eps == 0:
            return x
        idx = torch.randperm(x.shape[0], generator=gen, device=gen.device)[:k].sort().values.to(x.device)
        out = x.detach().clone()
        out[idx] = self.perturb(model, x[idx], y[idx], c.eps, gen)
        return out

    def evaluate(self, model: nn.Module, data: Any, layout: Any, mask: torch.Tensor, device: torch.device,
                 gen: torch.Generator, batch_size: int = 512,
                 num_workers: int = 0) -> dict[str, Any]:
        c = self.cfg
        if "eval" not in c.apply_to:
            return {}
        bounds = tuple(float(b) for b in getattr(data, "bounds", self.bounds))
        out: dict[str, Any] = {}
        for eps in c.eval_eps:
            def transform(x: torch.Tensor, y: torch.Tensor, eps: float = eps) -> torch.Tensor:
                return self.perturb(model, x, y, eps, gen, bounds)

            ev = evaluate_model(model, data.test, device, batch_size, transform=transform if eps > 0 else None,
                                num_workers=num_workers)
            out[f"robust_acc@eps={metric_number(eps)}"] = ev["acc"]
            out[f"robust_loss@eps={metric_number(eps)}"] = ev["loss"]
        return out

    def record(self) -> dict[str, Any]:
        c = self.cfg
        steps = 1 if c.attack == "fgsm" else c.steps
        alpha = None if c.attack == "fgsm" else (c.alpha if c.alpha is not None else 2.5 * c.eps / c.steps)
        return {"kind": self.kind, "attack": c.attack, "norm": c.norm, "eps": c.eps, "alpha": alpha,
                "steps": steps, "random_start": c.random_start and c.attack == "pgd",
                "apply_to": list(c.apply_to), "fraction": c.fraction, "eval_eps": list(c.eval_eps)}


def build(cfg: DictConfig | dict[str, Any]) -> AdversarialNoise:
    return AdversarialNoise(parse_config(Config, cfg))
