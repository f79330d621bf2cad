"""Training and evaluation loops shared by dense training, fine-tuning and gradual pruning.

Masked training keeps pruned weights at exactly zero: the mask is re-applied after every
optimiser step (and the gradients of pruned weights are zeroed so momentum does not regrow them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pruning.errors import ConfigError
from pruning.layout import ParamLayout, apply_mask, get_params


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 64
    optimizer: str = "sgd"       # sgd | adam
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    lr_schedule: str = "none"    # none | cosine (to 0 over `epochs`) | step (x gamma at each milestone)
    milestones: tuple[int, ...] = ()  # epochs at which `step` multiplies the lr by gamma
    gamma: float = 0.1
    warmup_epochs: int = 0       # linear warm-up from lr/warmup_epochs, before the schedule
    label_smoothing: float = 0.0  # cross-entropy target smoothing in [0, 1) (GFS/ImageNet recipes use 0.1)


def train_config(cfg: object, key: str) -> TrainConfig:
    """TrainConfig from a mapping, naming `key.<field>` in the error for unknown fields."""
    data = dict(cfg)  # type: ignore[call-overload]
    data.pop("seed", None)
    allowed = set(TrainConfig.__dataclass_fields__)
    bad = sorted(set(data) - allowed)
    if bad:
        raise ConfigError(f"{key}.{bad[0]}", data[bad[0]], ", ".join(sorted(allowed)), "is not a known key")
    if "milestones" in data:
        data["milestones"] = tuple(int(m) for m in data["milestones"] or ())
    tc = TrainConfig(**data)
    if tc.optimizer not in ("sgd", "adam"):
        raise ConfigError(f"{key}.optimizer", tc.optimizer, "sgd, adam")
    if tc.lr_schedule not in ("none", "cosine", "step"):
        raise ConfigError(f"{key}.lr_schedule", tc.lr_schedule, "none, cosine, step")
    if tc.lr_schedule == "step" and (not tc.milestones or list(tc.milestones) != sorted(set(tc.milestones))):
        raise ConfigError(f"{key}.milestones", list(tc.milestones), "increasing epochs, e.g. [100, 150], "
                          "when lr_schedule=step")
    if tc.gamma <= 0 or not 0 <= tc.warmup_epochs <= max(tc.epochs, 0):
        raise ConfigError(key, {"gamma": tc.gamma, "warmup_epochs": tc.warmup_epochs},
                          "gamma > 0, 0 <= warmup_epochs <= epochs", "has an invalid value")
    if not 0.0 <= tc.label_smoothing < 1.0:
        raise ConfigError(f"{key}.label_smoothing", tc.label_smoothing, "a number in [0, 1)")
    if tc.epochs < 0 or tc.batch_size <= 0 or tc.lr <= 0:
        raise ConfigError(key, {"epochs": tc.epochs, "batch_size": tc.batch_size, "lr": tc.lr},
                          "epochs >= 0, batch_size > 0, lr > 0", "has an invalid value")
    return tc


def make_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    if tc.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum,
                           weight_decay=tc.weight_decay, nesterov=tc.nesterov and tc.momentum > 0)


def make_scheduler(opt: torch.optim.Optimizer, tc: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch learning-rate schedule of `tc` (call `.step()` once after every epoch)."""
    warm = tc.warmup_epochs
    milestones = sorted(tc.milestones)

    def factor(epoch: int) -> float:
        if epoch < warm:
            return (epoch + 1) / warm
        if tc.lr_schedule == "cosine":
            span = max(tc.epochs - warm, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(epoch - warm, span) / span))
        if tc.lr_schedule == "step":
            return tc.gamma ** sum(epoch >= m for m in milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 512,
             transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             num_workers: int = 0) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy; `transform(x, y)` may perturb inputs (attacks);
    `num_workers` loader processes decode the examples."""
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        x, y = x.to(device), y.to(device)
        if transform is not None:
            with torch.enable_grad():
                x = transform(x, y)
        out = model(x)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        n += y.numel()
    model.train(was_training)
    return {"acc": correct / max(n, 1), "loss": loss_sum / max(n, 1)}


def masked_step(opt: torch.optim.Optimizer, model: nn.Module, layout: ParamLayout | None,
                mask: torch.Tensor | None, params: list[nn.Parameter] | None,
                masks: list[torch.Tensor] | None) -> None:
    """opt.step() that keeps pruned weights at exactly zero: their gradients are zeroed first (so
    momentum cannot regrow them) and the mask is re-applied after the step. No mask: a plain step."""
    if masks is not None:
        for p, m in zip(params, masks):
            if p.grad is not None:
                p.grad.mul_(m)
    opt.step()
    if masks is not None:
        apply_mask(model, layout, mask)


def train_epoch(model: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer, device: torch.device,
                layout: ParamLayout | None = None, mask: torch.Tensor | None = None,
                step_hook: Callable[[], None] | None = None, desc: str = "train",
                progress: bool = True, label_smoothing: float = 0.0) -> dict[str, float]:
    """One epoch of (optionally masked) training; returns the mean training loss (with
    `label_smoothing`, the smoothed cross-entropy that is optimised) and accuracy."""
    model.train()
    masks = layout.unflatten(mask.to(device)) if layout is not None and mask is not None else None
    params = get_params(model, layout) if masks is not None else None
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
        x, y = x.to(device), y.to(device)
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
        loss.backward()
        masked_step(opt, model, layout, mask, params, masks)
        if step_hook is not None:
            step_hook()
        loss_sum += loss.item() * y.numel()
        correct += int((out.argmax(1) == y).sum())
        n += y.numel()
    return {"train_loss": loss_sum / max(n, 1), "train_acc": correct / max(n, 1)}


def make_loader(dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True,
                num_workers: int = 0) -> DataLoader:
    """A loader whose order depends only on `seed` (its own generator, not the global one; the
    sampler draws from it in the main process, so the order is the same with `num_workers`
    loader processes, which decode and augment; they are kept alive across epochs)."""
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=False,
                      num_workers=num_workers, persistent_workers=num_workers > 0)
