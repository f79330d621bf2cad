"""Datasets. Every loader returns a `DataBundle` whose images are in pixel space [0, 1]
(normalisation lives inside the model, so attacks and clipping work on real pixels).

Keys (config group `dataset`, conf/dataset/<key>.yaml): `pruning.registry.DATASETS`, each a module's
`load(cfg, data_dir) -> DataBundle`.

On-disk datasets live under `paths.data_dir` (env PRUNING_DATA_DIR); `dataset.download=true`
lets torchvision fetch MNIST/CIFAR there. A missing dataset is a `ConfigError` that says where
it looked and how to obtain the data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from pruning.errors import ConfigError
from pruning.registry import DATASETS


@dataclass
class DataBundle:
    """Train/test splits and what models and attacks need to know about them."""

    name: str
    train: Dataset           # with training augmentation, if any
    test: Dataset
    calib: Dataset           # the training split without augmentation (G, GFS scoring)
    input_shape: tuple[int, ...]
    num_classes: int
    mean: tuple[float, ...]  # per-channel (or single) normalisation applied inside the model
    std: tuple[float, ...]
    bounds: tuple[float, float] = (0.0, 1.0)  # valid input range (pixel space)


def available() -> list[str]:
    return sorted(DATASETS)


def build_dataset(cfg: Mapping[str, Any], data_dir: str | Path | None = None) -> DataBundle:
    """Build the dataset named by `cfg["name"]`; the module's `load(cfg, data_dir)` does the work."""
    name = cfg["name"]
    if name not in DATASETS:
        raise ConfigError("dataset", name, ", ".join(available()))
    return DATASETS[name].load()(cfg, Path(data_dir) if data_dir is not None else None)


class ImageTensorDataset(Dataset):
    """uint8 images (N, C, H, W) served as float tensors in [0, 1], with an optional tensor transform.

    The decoded arrays of torchvision's MNIST/CIFAR classes are kept once in memory as uint8 and
    shared by the train, calib and test views; augmentation runs on tensors (no PIL round trip).
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform: Any = None):
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(targets):
            raise ValueError(f"expected uint8 images (N, C, H, W) and N targets, got {tuple(images.shape)} "
                             f"{images.dtype} and {len(targets)} targets")
        self.images, self.targets, self.transform = images, targets.long(), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.decode(i)
        if self.transform is not None:
            x = self.transform(x)
        return x, y

    def decode(self, sel: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Images `sel` (an index, a slice or an index tensor) as floats in [0, 1], and their targets;
        no transform (`pruning.train.tensor_batches` serves whole batches so)."""
        return self.images[sel].float().div_(255.0), self.targets[sel]


def require_data_dir(data_dir: str | Path | None, dataset: str) -> Path:
    """`paths.data_dir` as a Path; a ConfigError naming the key when it is unset."""
    if data_dir is None or str(data_dir) in ("", "None"):
        raise ConfigError("paths.data_dir", data_dir, "a directory holding the datasets (set paths.data_dir= "
                          "or the environment variable PRUNING_DATA_DIR)", f"is unset, so dataset={dataset} "
                          "cannot be found")
    return Path(data_dir).expanduser()


def missing_dataset(dataset: str, looked: Path, how: str) -> ConfigError:
    """The error for a dataset that is not on disk: what, where we looked, how to get it."""
    return ConfigError("dataset", dataset, how, f"was not found (looked for {looked})")


def channel_stats(cfg: Mapping[str, Any], default_mean: tuple[float, ...], default_std: tuple[float, ...]
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`dataset.mean` / `dataset.std` (one value per channel, std > 0), or the given defaults."""
    raw_mean, raw_std = cfg.get("mean"), cfg.get("std")
    n = len(default_mean)
    try:
        mean = default_mean if raw_mean is None else tuple(float(v) for v in raw_mean)
        std = default_std if raw_std is None else tuple(float(v) for v in raw_std)
    except (TypeError, ValueError):
        raise ConfigError("dataset.mean/std", [raw_mean, raw_std], f"lists of {n} numbers") from None
    if len(mean) != n or len(std) != n or min(std) <= 0:
        raise ConfigError("dataset.mean/std", [list(mean), list(std)], f"lists of {n} numbers, std > 0")
    return mean, std
