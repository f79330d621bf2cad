"""scikit-learn's bundled handwritten digits (UCI optdigits test set: 1797 8x8 images, 10 classes).

Real data that needs no download, used by the embedded default. Pixels (0..16) are scaled to
[0, 1]; the split is fixed (stratified, random_state 0) so every run sees the same test set.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from pruning.data import DataBundle
from pruning.errors import ConfigError


def load(cfg: Mapping[str, Any], data_dir: Path | None = None) -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    frac = float(cfg.get("test_fraction", 0.2))
    if not 0.0 < frac < 1.0:
        raise ConfigError("dataset.test_fraction", frac, "a number in (0, 1)")
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=frac, random_state=0, stratify=y)
    train = TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr).long())
    test = TensorDataset(torch.from_numpy(x_te), torch.from_numpy(y_te).long())
    mean, std = float(x_tr.mean()), float(x_tr.std())
    return DataBundle(
        name="digits", train=train, test=test, calib=train, input_shape=(64,), num_classes=10,
        mean=(mean,), std=(std,),
    )
