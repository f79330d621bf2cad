"""Wide ResNet WRN-28-10 for CIFAR.

Source: Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016): pre-activation basic blocks
(BN-ReLU-conv3x3, twice, optional dropout between), three groups of (depth - 4) / 6 blocks with
16k/32k/64k channels (k = widen factor; 160/320/640 for WRN-28-10), a 1x1 projection shortcut
where the width or stride changes, a final BN-ReLU, global average pooling and a linear layer.
Module names follow the common PyTorch port (xternalz/WideResNet-pytorch): `conv1`,
`block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2,convShortcut}`, `bn1`, `fc`.

Prunable by default: every convolution weight (shortcuts included) and the `fc` weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pruning.data import DataBundle
from pruning.errors import ConfigError
from pruning.layout import default_prunable
from pruning.models import image_channels


class WideBasic(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.equal = in_planes == planes and stride == 1
        self.convShortcut = None if self.equal else nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv1(act)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        # the projection shortcut sees the pre-activated input, as in the paper's reference code
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class NetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBasic(in_planes if i == 0 else planes, planes, stride if i == 0 else 1, dropout) for i in range(n)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, dropout: float = 0.0,
                 in_channels: int = 3):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth={depth} is not 6n + 4 with n >= 1")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, dropout)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, dropout)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))

    def prunable_names(self) -> list[str]:
        return default_prunable(self)


def build(cfg: Mapping[str, Any], data: DataBundle) -> nn.Module:
    depth, k, p = cfg.get("depth", 28), cfg.get("widen_factor", 10), float(cfg.get("dropout", 0.0))
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ConfigError("model.depth", depth, "6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...)")
    if not isinstance(k, int) or k < 1:
        raise ConfigError("model.widen_factor", k, "a positive integer")
    if not 0.0 <= p < 1.0:
        raise ConfigError("model.dropout", p, "a probability in [0, 1)")
    return WideResNet(depth, k, data.num_classes, p, image_channels(data, cfg["name"]))
