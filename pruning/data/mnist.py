"""MNIST (LeCun et al. 1998): 60,000 training and 10,000 test 28x28 grey-scale digits, 10 classes.

Read by torchvision's `MNIST` class from its on-disk layout, `<data_dir>/MNIST/raw/` holding the
four decompressed idx files (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
`t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`); `dataset.download=true` lets torchvision
fetch them. Pixels are scaled to [0, 1]; no augmentation (the standard MNIST recipe, also
WoodFisher's for MLPNet). The model normalises with mean 0.1307 and std 0.3081 by default.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torchvision.datasets import MNIST

from pruning.data import DataBundle, ImageTensorDataset, channel_stats, missing_dataset, require_data_dir


def load(cfg: Mapping[str, Any], data_dir: Path | None = None) -> DataBundle:
    root = require_data_dir(data_dir, "mnist")
    mean, std = channel_stats(cfg, (0.1307,), (0.3081,))
    download = bool(cfg.get("download", False))
    try:
        splits = {train: MNIST(str(root), train=train, download=download) for train in (True, False)}
    except RuntimeError as exc:  # torchvision: "Dataset not found. You can use download=True ..."
        raise missing_dataset(
            "mnist", root / "MNIST" / "raw",
            "set dataset.download=true to fetch it with torchvision, or point paths.data_dir (env "
            "PRUNING_DATA_DIR) at a folder holding MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
        ) from exc

    def view(ds: MNIST) -> ImageTensorDataset:
        return ImageTensorDataset(ds.data.unsqueeze(1), ds.targets)

    train = view(splits[True])
    return DataBundle(
        name="mnist", train=train, test=view(splits[False]), calib=train, input_shape=(1, 28, 28),
        num_classes=10, mean=mean, std=std,
    )
