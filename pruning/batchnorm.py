"""BatchNorm re-estimation ("BN recalibration") of a pruned network, without training.

Pruning changes the distribution of every later layer's inputs, but a BatchNorm layer in eval mode
keeps normalising with the running mean and variance of the *dense* network. Re-estimating them
at the pruned weights is a forward-only repair (no parameter changes; the mask is untouched):
every BatchNorm layer's running statistics are reset and recomputed as the plain average of the
batch statistics over a sample of training examples (PyTorch's cumulative average, `momentum =
None`; the procedure of `torch.optim.swa_utils.update_bn`, and CHITA's `recompute_bn_stats`,
which it applies to the dense ResNet-20 before pruning).

Only the BatchNorm layers run in train mode during the passes; dropout and everything else stay in
eval mode, so the statistics are those of the network that is evaluated.

The examples come from the training split *with* its augmentation (the run passes `data.train`),
as the network was trained: its layers learned under batch statistics of augmented images, and
statistics of un-augmented images cost accuracy. The augmentation draws are seeded, so a run is
repeatable.

Measured on the published option-B ResNet-20 (dev data: 3,728 CIFAR-10 training images, 932
others as the test split; `oneshot_resnet20_cifar10`, 5 seeds): one-shot magnitude pruning at
40 / 70 / 90 % sparsity scored 96.89 / 82.40 / 11.48 % as pruned and 98.39 / 93.58 / 54.44 % after
re-estimation on augmented images (on un-augmented ones: 94.53 % at 40 %). It reorders the
methods (README "Where the ResNet-20 reproduction stands").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from pruning.errors import integer


def examples_setting(value: Any, key: str) -> int:
    """A `bn_recalibrate` setting: 0 or null (off) or a positive number of training examples."""
    return integer(0 if value is None else value, key, lo=0,
                   allowed="0 (off) or a positive number of training examples")


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of `model` that keep running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate(model: nn.Module, dataset: Dataset, examples: int, *, batch_size: int, device: torch.device,
                seed: int, num_workers: int = 0, progress: bool = False) -> int:
    """Reset the running mean and variance of every BatchNorm layer of `model` and re-estimate them
    as the average of the batch statistics over `examples` examples of `dataset` (a random subset
    drawn with `seed`; the whole dataset when `examples` is at least its size), in batches of
    `batch_size`; random transforms of `dataset` (augmentation) draw from `seed` too, not from the
    global generator. Returns the number of examples used (0, and nothing changed, when the model has
    no BatchNorm layer). The model is left in eval mode, its parameters unchanged."""
    layers = batchnorm_layers(model)
    if not layers or examples <= 0:
        return 0
    n = len(dataset)  # type: ignore[arg-type]
    g = torch.Generator()
    g.manual_seed(seed)
    chosen = torch.randperm(n, generator=g)[:min(examples, n)].sort().values
    loader = DataLoader(Subset(dataset, chosen.tolist()), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, generator=g)  # g seeds the worker processes
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average of the batch statistics, not an exponential one
        m.train()
    try:
        with torch.random.fork_rng(devices=[]):  # in-process augmentation: seeded, global stream untouched
            torch.manual_seed(seed)
            for x, _ in tqdm(loader, desc="BN statistics", disable=not progress, leave=False):
                model(x.to(device))
    finally:
        for m, mom in zip(layers, momenta):
            m.momentum = mom
        model.eval()
    return len(chosen)
