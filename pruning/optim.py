"""Optimisers and the training step of the train-time methods (gfs, grda, sdprun).

GRDA: generalised regularised dual averaging (Chao, Wang, Xing, Cheng, "Directional Pruning of
Deep Neural Networks", NeurIPS 2020), optionally with group soft-thresholding (the structured
variant used by `sdprun`). Per parameter, with accumulator a and step n = 1, 2, ...:

  a_0 = w_0                                             (the weights when training starts)
  a_n = a_{n-1} - gamma_n grad f(w_{n-1}; Z_n)          (dual averaging of the gradients)
  g_n = g_{n-1} + c gamma_n^(1/2 + mu) (n^mu - (n-1)^mu),   g_0 = 0
      = c gamma^(1/2) (n gamma)^mu                      when gamma is constant
  w_n = sign(a_n) max(|a_n| - g_n, 0)                   (l1: soft threshold, every entry)
  w_G = a_G max(0, 1 - g_n sqrt(|G|) / ||a_G||_2)       (group: a channel group G, sdprun)

The threshold is accumulated step by step with the learning rate of that step, so a learning
rate change moves the threshold consistently (the reference `grda_pytorch.py` does the same).
With c = 0 every iterate equals plain SGD without momentum or weight decay (w_n = a_n).

`train_loop` runs a train-time method's training through the one loop, `pruning.train.fit`,
whose step (`pruning.train.noisy_backward`) applies the hooks of `pruning.noise` to training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from pruning.train import fit, make_loader

PENALTIES = ("l1", "none")


def threshold_increment(c: float, mu: float, lr: float, n: int) -> float:
    """g_n - g_{n-1} = c lr^(1/2 + mu) (n^mu - (n-1)^mu)."""
    return c * lr ** (0.5 + mu) * (n ** mu - (n - 1) ** mu)


class GRDA(torch.optim.Optimizer):
    """gRDA with an l1 soft threshold per entry and/or a group soft threshold per channel group.

    Param-group options: lr, c, mu, penalty ("l1": soft threshold per entry; "none": plain dual
    averaging, i.e. SGD). `channel_groups` lists groups of (parameter, channel dim) slices that are
    thresholded together channel by channel (w_G above); their parameters must be in this
    optimiser, and their elementwise penalty is replaced by the group one. A group's threshold
    is that of the param group of its first member. `group_weight` is "sqrt_size" (sqrt(|G|),
    the group-lasso convention) or "one".
    """

    def __init__(self, params: Iterable[Any], lr: float, c: float = 0.0, mu: float = 0.51,
                 penalty: str = "l1", channel_groups: Sequence[Sequence[tuple[nn.Parameter, int]]] = (),
                 group_weight: str = "sqrt_size"):
        if lr <= 0:
            raise ValueError(f"lr={lr} must be > 0")
        if c < 0:
            raise ValueError(f"c={c} must be >= 0")
        if penalty not in PENALTIES:
            raise ValueError(f"penalty={penalty!r} is not one of {PENALTIES}")
        if group_weight not in ("sqrt_size", "one"):
            raise ValueError(f"group_weight={group_weight!r} is not one of ('sqrt_size', 'one')")
        super().__init__(params, dict(lr=lr, c=c, mu=mu, penalty=penalty))
        self.channel_groups = [list(g) for g in channel_groups]
        self.group_weight = group_weight
        self.step_count = 0
        owner = {}
        for i, pg in enumerate(self.param_groups):
            pg.setdefault("threshold", 0.0)
            for p in pg["params"]:
                owner[p] = i
        self._owner = owner
        self._grouped: set[nn.Parameter] = set()
        for g in self.channel_groups:
            for p, _dim in g:
                if p not in owner:
                    raise ValueError("a channel-group parameter is not among the optimiser's parameters")
                self._grouped.add(p)

    def threshold(self, group_index: int = 0) -> float:
        return float(self.param_groups[group_index]["threshold"])

    def state_dict(self) -> dict[str, Any]:
        # the step count drives the threshold schedule, so a resumed run must continue it
        return {**super().state_dict(), "step_count": self.step_count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.step_count = int(state_dict.pop("step_count", 0))
        super().load_state_dict(state_dict)

    def accumulator(self, p: torch.Tensor) -> torch.Tensor:
        st = self.state[p]
        return st["a"] if "a" in st else p.detach()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D401 - torch API
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.step_count += 1
        n = self.step_count
        for pg in self.param_groups:
            lr, c, mu = float(pg["lr"]), float(pg["c"]), float(pg["mu"])
            pg["threshold"] = float(pg["threshold"]) + threshold_increment(c, mu, lr, n)
            thr = pg["threshold"]
            for p in pg["params"]:
                st = self.state[p]
                if "a" not in st:
                    st["a"] = p.detach().clone()  # a_0 = w_0
                a = st["a"]
                if p in self._grouped:
                    if p.grad is not None:
                        a.add_(p.grad, alpha=-lr)
                    continue
                if p.grad is None:  # as the reference: a parameter without gradient is left alone
                    continue
                a.add_(p.grad, alpha=-lr)
                if pg["penalty"] == "l1" and thr > 0:
                    p.copy_(torch.sign(a) * (a.abs() - thr).clamp_min(0))
                else:
                    p.copy_(a)
        for g in self.channel_groups:
            self._group_threshold(g)
        return loss

    def _group_threshold(self, members: Sequence[tuple[nn.Parameter, int]]) -> None:
        thr = self.threshold(self._owner[members[0][0]])
        accs = [(p, self.state[p]["a"], dim) for p, dim in members]
        moved = [a.movedim(dim, 0) for _p, a, dim in accs]
        n_ch = moved[0].shape[0]
        sq = torch.zeros(n_ch, dtype=moved[0].dtype, device=moved[0].device)
        size = 0
        for m in moved:
            sq += m.reshape(n_ch, -1).pow(2).sum(dim=1)
            size += m[0].numel()
        norm = sq.sqrt()
        weight = math.sqrt(size) if self.group_weight == "sqrt_size" else 1.0
        factor = (1.0 - thr * weight / norm.clamp_min(torch.finfo(norm.dtype).tiny)).clamp_min(0.0)
        factor = torch.where(norm > 0, factor, torch.zeros_like(factor))
        for (p, a, dim), _m in zip(accs, moved):
            shape = [1] * a.dim()
            shape[dim] = n_ch
            p.copy_(a * factor.view(shape))


def stream_generators(gen: torch.Generator) -> dict[str, torch.Generator]:
    """Independent generators for the noise hooks and the method's own draws, seeded from `gen`."""
    out = {}
    for name in ("inputs", "weights", "gradients", "method"):
        g = torch.Generator(device="cpu")
        g.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=gen).item()))
        out[name] = g
    return out


def generators_state(gens: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """The states of stream generators (`stream_generators`), for a checkpoint."""
    return {k: g.get_state() for k, g in gens.items()}


def load_generators_state(gens: dict[str, torch.Generator], states: dict[str, torch.Tensor]) -> None:
    """Set stream generators back to states saved by `generators_state`."""
    for k, st in states.items():
        gens[k].set_state(st)


def milestone_decay(opt: torch.optim.Optimizer, milestones: Sequence[int], gamma: float) -> Callable[[int], None]:
    """An epoch-start hook for `pruning.train.fit`: at each epoch listed in `milestones` every
    param group's lr is multiplied by `gamma` (the lr itself is saved with the optimizer)."""
    at = {int(m) for m in milestones}

    def hook(epoch: int) -> None:
        if epoch in at:
            for pg in opt.param_groups:
                pg["lr"] = float(pg["lr"]) * gamma

    return hook


def train_loop(ctx: Any, opt: torch.optim.Optimizer, *, epochs: float, batch_size: int, phase: str,
               gens: dict[str, torch.Generator], noise_hooks: bool = True, lr_milestones: Sequence[int] = (),
               lr_gamma: float = 0.1, mask: torch.Tensor | None = None, log_every_epoch: bool = True,
               extra: Any = None, resumable: bool = False) -> dict[str, float]:
    """`pruning.train.fit` for a train-time method: train `ctx.model` with `opt` on
    `ctx.data.train` for `epochs` (a fraction runs that share of one epoch's steps), under the
    noise hooks unless `noise_hooks=False`. At each epoch listed in `lr_milestones` every param
    group's lr is multiplied by `lr_gamma`. `mask` (over ctx.layout) keeps pruned prunable weights
    at zero. Logs one row per epoch (with ctx.evaluate(), `extra()` fields) and returns the last
    epoch's mean training loss and accuracy. The data order is drawn from `gens["method"]`.

    `resumable=True` (a loop that is the whole of a long method, e.g. gRDA's 600 epochs) saves the
    loop's state after every whole epoch through `ctx.checkpoint` (when the task provides one):
    model, optimizer, data order, stream generators. An attempt restarted after preemption picks
    up after the last saved epoch and ends where an uninterrupted run would.
    """
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=gens["method"]).item())
    log = ctx.log if log_every_epoch else None
    return fit(ctx.model, make_loader(ctx.data.train, batch_size, seed), opt, ctx.device, epochs=epochs,
               phase=phase, layout=ctx.layout, mask=mask, noise=ctx.noise if noise_hooks else None, gens=gens,
               on_epoch_start=milestone_decay(opt, lr_milestones, lr_gamma), log=log,
               evaluate=ctx.evaluate if log is not None else None, extra=extra,
               checkpoint=getattr(ctx, "checkpoint", None) if resumable else None, stateful=(ctx.model,),
               progress=ctx.progress, bars="steps")
