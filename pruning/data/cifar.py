"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009): 50,000 training and 10,000 test 32x32 RGB images.

Read by torchvision's `CIFAR10` / `CIFAR100` classes from the python-pickle release:
`<data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}` and
`<data_dir>/cifar-100-python/{train, test, meta}` (fine labels, 100 classes). `dataset.download=true`
lets torchvision fetch and extract the archive there. torchvision checks every file's MD5
against the official release; `dataset.verify_checksums=false` checks only that the files exist
(a re-packed or reduced copy).

Training split: the standard augmentation of the CIFAR ResNet recipe (He et al. 2016) - random
32x32 crop after 4-pixel zero padding and random horizontal flip (`dataset.augment=false` turns
it off). Test and calibration splits: no augmentation. Pixels are in [0, 1]; the model
normalises with `dataset.mean` / `dataset.std`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torchvision import datasets, transforms

from pruning.data import DataBundle, ImageTensorDataset, channel_stats, missing_dataset, require_data_dir
from pruning.errors import ConfigError

_CLASSES = {"cifar10": (datasets.CIFAR10, 10), "cifar100": (datasets.CIFAR100, 100)}
# per-channel statistics of the training images, used when dataset.mean / dataset.std are null
_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _without_checksums(cls: type[datasets.CIFAR10]) -> type[datasets.CIFAR10]:
    """The torchvision class with its per-file MD5s set to None: torchvision's own integrity check
    then only requires the files to exist; reading and decoding are unchanged."""
    return type(cls.__name__, (cls,), {
        "train_list": [[name, None] for name, _ in cls.train_list],
        "test_list": [[name, None] for name, _ in cls.test_list],
        "meta": {**cls.meta, "md5": None},
    })


def load(cfg: Mapping[str, Any], data_dir: Path | None = None) -> DataBundle:
    name = cfg["name"]
    if name not in _CLASSES:
        raise ConfigError("dataset.name", name, ", ".join(_CLASSES))
    root = require_data_dir(data_dir, name)
    mean, std = channel_stats(cfg, *_STATS[name])
    cls, num_classes = _CLASSES[name]
    verify = bool(cfg.get("verify_checksums", True))
    if not verify:
        cls = _without_checksums(cls)
    folder = root / cls.base_folder
    try:
        splits = {train: cls(str(root), train=train, download=bool(cfg.get("download", False)))
                  for train in (True, False)}
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted. ..."
        if folder.is_dir() and verify:
            raise ConfigError("dataset", name, "re-download it with dataset.download=true (after removing "
                              f"{folder}), or set dataset.verify_checksums=false for a re-packed copy",
                              f"is incomplete or does not match the official MD5 checksums ({folder})") from exc
        raise missing_dataset(
            name, folder, f"set dataset.download=true to fetch it with torchvision, or point paths.data_dir "
            f"(env PRUNING_DATA_DIR) at a folder holding {cls.base_folder}/ (python version from "
            "https://www.cs.toronto.edu/~kriz/cifar.html)",
        ) from exc

    def images(ds: datasets.CIFAR10) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)

    x_tr, y_tr = images(splits[True])
    x_te, y_te = images(splits[False])
    augment = None
    if bool(cfg.get("augment", True)):
        augment = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()])
    return DataBundle(
        name=name,
        train=ImageTensorDataset(x_tr, y_tr, augment),
        test=ImageTensorDataset(x_te, y_te),
        calib=ImageTensorDataset(x_tr, y_tr),
        input_shape=(3, 32, 32), num_classes=num_classes,
        mean=mean, std=std,
    )
