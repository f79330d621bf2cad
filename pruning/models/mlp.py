"""Fully connected ReLU network: input -> hidden... -> classes (the embedded digits default)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from pruning.data import DataBundle


def build(cfg: Mapping[str, Any], data: DataBundle) -> nn.Module:
    dims = [math.prod(data.input_shape), *list(cfg.get("hidden", [128, 64]))]
    bias = bool(cfg.get("bias", True))
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b, bias=bias), nn.ReLU()]
    layers.append(nn.Linear(dims[-1], data.num_classes, bias=bias))
    return nn.Sequential(*layers)
