"""Synthetic classification data: generated images around one random prototype per class.

For tests, CI and timing work where no real data set is at hand (no files, no download). Each class
c has a prototype mu_c = 0.5 + separation * (u - 0.5) with u uniform in [0, 1] per pixel; an example
is clip(mu_c + noise * eps, 0, 1) with Gaussian eps, so inputs live in pixel space [0, 1] like the
real loaders'. Everything is drawn from one generator seeded with `dataset.seed`, so the data are
identical across runs and machines. `separation` and `noise` set the difficulty; the shape can be
flat (`[64]`) or an image (`[3, 32, 32]`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from pruning.data import DataBundle
from pruning.errors import ConfigError


def _positive_int(cfg: Mapping[str, Any], key: str, default: int) -> int:
    v = cfg.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"dataset.{key}", v, "a positive integer")
    return v


def load(cfg: Mapping[str, Any], data_dir: Path | None = None) -> DataBundle:
    n_train = _positive_int(cfg, "num_train", 512)
    n_test = _positive_int(cfg, "num_test", 256)
    classes = _positive_int(cfg, "num_classes", 10)
    seed = cfg.get("seed", 0)
    if not isinstance(seed, int):
        raise ConfigError("dataset.seed", seed, "an integer")
    shape = tuple(cfg.get("shape", [3, 32, 32]))
    if not shape or len(shape) > 3 or any(not isinstance(d, int) or d <= 0 for d in shape):
        raise ConfigError("dataset.shape", list(shape), "1 to 3 positive integers: [features] or [C, H, W]")
    sigma = float(cfg.get("noise", 0.3))
    if sigma < 0:
        raise ConfigError("dataset.noise", sigma, "a non-negative number")
    separation = float(cfg.get("separation", 0.6))
    if not 0.0 < separation <= 1.0:
        raise ConfigError("dataset.separation", separation, "a number in (0, 1]")

    g = torch.Generator().manual_seed(seed)
    protos = 0.5 + separation * (torch.rand((classes, *shape), generator=g) - 0.5)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % classes  # balanced classes
        y = y[torch.randperm(n, generator=g)]
        x = (protos[y] + sigma * torch.randn((n, *shape), generator=g)).clamp_(0.0, 1.0)
        return x, y

    x_tr, y_tr = draw(n_train)
    x_te, y_te = draw(n_test)
    if len(shape) == 3:  # per-channel statistics for image-shaped data
        mean = tuple(float(v) for v in x_tr.mean(dim=(0, 2, 3)))
        std = tuple(float(v) for v in x_tr.std(dim=(0, 2, 3)))
    else:
        mean, std = (float(x_tr.mean()),), (float(x_tr.std()),)
    train = TensorDataset(x_tr, y_tr)
    return DataBundle(name="synthetic", train=train, test=TensorDataset(x_te, y_te), calib=train,
                      input_shape=shape, num_classes=classes, mean=mean, std=std)
