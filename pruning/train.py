"""The training loop (`fit`) of dense training, fine-tuning, gradual pruning and the train-time
methods, its training step under the noise hooks (`noisy_backward`), and evaluation.

Masked training keeps pruned weights at exactly zero: the mask is re-applied after every
optimiser step (and the gradients of pruned weights are zeroed so momentum does not regrow them).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm.auto import tqdm

from pruning.data import ImageTensorDataset
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
    noise_hooks: bool = False    # fine-tuning and gradual pruning: every step under the noise model's training
                                 # hooks, as the train-time methods train (`noisy_backward`); dense training never


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
    if not isinstance(tc.noise_hooks, bool):
        raise ConfigError(f"{key}.noise_hooks", tc.noise_hooks, "true, false")
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


def tensor_batches(dataset: Dataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]] | None:
    """The batches a non-shuffling DataLoader would collate, sliced straight from the tensors of an
    in-memory dataset without a transform (`ImageTensorDataset`, `TensorDataset`, or a `Subset` of
    one); None for any other dataset. Same values, in the same batches: no per-example
    __getitem__ and collate (2 s -> 0.1 s for 12,000 MNIST images, and cbs select=loss scores
    dozens of masks so)."""
    indices = None
    if isinstance(dataset, Subset):
        dataset, indices = dataset.dataset, torch.as_tensor(dataset.indices, dtype=torch.long)
    if isinstance(dataset, ImageTensorDataset) and dataset.transform is None:
        get = dataset.decode
    elif isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        xs, ys = dataset.tensors

        def get(sel: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return xs[sel], ys[sel]
    else:
        return None
    n = len(dataset) if indices is None else len(indices)
    return (get(slice(lo, lo + batch_size) if indices is None else indices[lo:lo + batch_size])
            for lo in range(0, n, batch_size))


@torch.no_grad()  # an attack's `transform` re-enables grad for itself
def evaluate(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 512,
             transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             num_workers: int = 0) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy; `transform(x, y)` may perturb inputs (attacks);
    `num_workers` loader processes decode the examples."""
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    batches = tensor_batches(dataset, batch_size)
    if batches is None:
        batches = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for x, y in batches:
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


class LoopCheckpoint(Protocol):
    """Where a training loop saves its state after each whole epoch and resumes from it
    (`pruning.checkpoint.LoopCheckpoint`, also a train-time method's `TrainContext.checkpoint`)."""

    def resume(self, phase: str, loader: Any, *stateful: Any) -> int: ...

    def save(self, phase: str, epoch: int, loader: Any, *stateful: Any) -> None: ...


class _LoopState:
    """The parts of a loop that a resumed attempt needs besides the optimizer and the model: the
    noise stream generators (draws continue where they stopped) and the last epoch's stats."""

    def __init__(self, gens: dict[str, torch.Generator] | None, stats: dict[str, float]):
        self.gens, self.stats = gens, stats

    def state_dict(self) -> dict[str, Any]:
        gens = {k: g.get_state() for k, g in self.gens.items()} if self.gens else {}
        return {"gens": gens, "stats": dict(self.stats)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for k, st in sd["gens"].items():
            self.gens[k].set_state(st)
        self.stats.update(sd["stats"])


def fit(model: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer, device: torch.device, *,
        epochs: float, phase: str, layout: ParamLayout | None = None,
        mask: torch.Tensor | Callable[[], torch.Tensor | None] | None = None,
        scheduler: Any = None, loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
        noise: Any = None, gens: dict[str, torch.Generator] | None = None,
        on_epoch_start: Callable[[int], None] | None = None,
        log: Callable[[dict[str, Any]], None] | None = None, evaluate: Callable[[], dict[str, float]] | None = None,
        extra: Callable[[], dict[str, Any]] | None = None, checkpoint: LoopCheckpoint | None = None,
        stateful: Sequence[Any] = (), progress: bool = False, desc: str | None = None,
        bars: str = "epoch") -> dict[str, float]:
    """The training loop of every phase (dense training, fine-tuning, gradual pruning, the
    train-time methods); returns the last epoch's mean training loss (of `loss_fn`, e.g. the
    smoothed cross-entropy that is optimised) and accuracy. Options:

      epochs          a fraction runs that share of one epoch's steps (train-time methods)
      mask, layout    keep pruned prunable weights at exactly zero (`masked_step`); `mask` may be a
                      callable, read at each epoch start (gradual pruning changes it)
      scheduler       `.step()` after every epoch (`make_scheduler`)
      noise, gens     each step under the noise model's training hooks (`noisy_backward`), drawing
                      from `gens` (`pruning.optim.stream_generators`); None = no hooks
      on_epoch_start  `on_epoch_start(epoch)` (0-based) before the epoch: gradual pruning's prune
                      steps, the train-time methods' lr milestones
      log             one row per epoch {phase, epoch, lr, train_loss, train_acc, **extra(),
                      **evaluate()}
      checkpoint      resume after the last saved epoch, and save after each whole epoch the
                      optimizer, `scheduler`, `stateful` objects, data order and noise streams
      progress, bars  "epoch": a bar per epoch over the loader; "steps": one bar over all steps
                      (desc: `desc` or `phase`)

    Data order: with bars="epoch" each epoch iterates the loader wrapped in `tqdm.auto.tqdm`,
    whose constructor opens (and drops) one iterator of the loader, drawing once from the loader's
    generator; that draw has always been part of the data order of dense training, fine-tuning and
    gradual pruning (and so of the cached dense models), while the train-time methods' loops
    (bars="steps") iterate the loader directly. Both are kept so results stay bit-identical.
    """
    steps_per_epoch = len(loader)
    total = int(math.ceil(epochs * steps_per_epoch))
    stats = {"train_loss": float("nan"), "train_acc": float("nan")}
    saved = (opt, *([scheduler] if scheduler is not None else []), *stateful, _LoopState(gens, stats))
    start = checkpoint.resume(phase, loader, *saved) if checkpoint is not None else 0
    step = min(start * steps_per_epoch, total)
    n_epochs = int(math.ceil(epochs))
    bar = tqdm(total=total, initial=step, desc=desc or phase, leave=False, disable=not progress or bars != "steps")
    for epoch in range(start, n_epochs):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        m = mask() if callable(mask) else mask
        masks = layout.unflatten(m.to(device)) if layout is not None and m is not None else None
        params = get_params(model, layout) if masks is not None else None
        lr = float(opt.param_groups[0]["lr"])
        model.train()
        loss_sum, correct, n = 0.0, 0, 0
        batches = loader if bars == "steps" else tqdm(loader, desc=f"{desc or phase} {epoch + 1}/{n_epochs}",
                                                      leave=False, disable=not progress)
        for x, y in batches:
            if step >= total:
                break
            x, y = x.to(device), y.to(device)
            loss, out = noisy_backward(model, x, y, noise, layout, m, gens, loss_fn)
            masked_step(opt, model, layout, m, params, masks)
            loss_sum += float(loss) * y.numel()
            correct += int((out.argmax(1) == y).sum())
            n += y.numel()
            step += 1
            bar.update(1)
        stats.update(train_loss=loss_sum / max(n, 1), train_acc=correct / max(n, 1))
        if log is not None:
            log({"phase": phase, "epoch": epoch + 1, "lr": lr, **stats, **(extra() if extra else {}),
                 **(evaluate() if evaluate else {})})
        if scheduler is not None:
            scheduler.step()
        if checkpoint is not None and (epoch + 1) * steps_per_epoch <= total:
            checkpoint.save(phase, epoch + 1, loader, *saved)
    bar.close()
    return dict(stats)


def noisy_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise: Any, layout: ParamLayout | None,
                   mask: torch.Tensor | None, gens: dict[str, torch.Generator] | None,
                   loss_fn: Callable[..., torch.Tensor] = F.cross_entropy) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the gradients, then one forward/backward on (x, y) under the noise model's hooks.

    The hooks that the calibration step (`pruning.calibrate`) applies when computing G apply here
    to each training step (`gens` is None, or noise=none: a plain step):
      calibration_inputs   perturbs the mini-batch inputs (e.g. adversarial training inputs)
      calibration_weights  perturbs the weights for this forward/backward only (noise-aware
                           training, e.g. analog programming noise), restored after
      gradients            perturbs the mini-batch gradient of the prunable tensors, passed as
                           one row of G (1 x p), e.g. SWAP's entry noise
    Returns (loss, logits), detached.
    """
    active = gens is not None and noise is not None and getattr(noise, "kind", "none") != "none"
    if active:
        x = noise.calibration_inputs(model, x, y, gens["inputs"])
    for p in model.parameters():
        p.grad = None
    if active:
        m = mask if mask is not None else torch.ones(layout.numel, dtype=torch.bool, device=x.device)
        with noise.calibration_weights(model, layout, m, gens["weights"]):
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
        params = get_params(model, layout)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        noisy = noise.gradients(flat.unsqueeze(0).clone(), gens["gradients"]).reshape(-1)
        offset = 0
        for p in params:
            k = p.numel()
            if p.grad is not None:
                p.grad.copy_(noisy[offset:offset + k].view_as(p))
            offset += k
    else:
        out = model(x)
        loss = loss_fn(out, y)
        loss.backward()
    return loss.detach(), out.detach()


def loop_parts(model: nn.Module, dataset: Dataset, tc: TrainConfig, seed: int, num_workers: int = 0,
           ) -> tuple[DataLoader, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The loader (order from `seed`), optimizer and per-epoch lr schedule of a TrainConfig."""
    opt = make_optimizer(model, tc)
    return make_loader(dataset, tc.batch_size, seed, num_workers=num_workers), opt, make_scheduler(opt, tc)


def smoothed_loss(label_smoothing: float) -> Callable[..., torch.Tensor]:
    """The training loss: cross-entropy with `label_smoothing` (0: the plain one)."""
    return functools.partial(F.cross_entropy, label_smoothing=label_smoothing)


def make_loader(dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True,
                num_workers: int = 0) -> DataLoader:
    """A loader whose order depends only on `seed` (its own generator, not the global one; the
    sampler draws from it in the main process, so the order is the same with `num_workers`
    loader processes, which decode and augment; they are kept alive across epochs)."""
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=False,
                      num_workers=num_workers, persistent_workers=num_workers > 0)
