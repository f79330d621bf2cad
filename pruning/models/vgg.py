"""VGG-16 with batch normalisation for CIFAR (32x32 inputs).

Source: Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition" (ICLR 2015), configuration D, with BatchNorm after every convolution (Ioffe &
Szegedy 2015) and the single linear classifier used by the CIFAR adaptations in the pruning
literature (e.g. kuangliu/pytorch-cifar, SNIP/GraSP-style VGG): 13 3x3 convolutions
(64-64-M-128-128-M-256x3-M-512x3-M-512x3-M), then global average pooling and Linear(512, classes).
Module names (`features.<i>`, `classifier`) follow that layout and torchvision's `vgg16_bn`
feature indices, so such state dicts load.

Prunable by default: every convolution weight and the classifier weight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pruning.data import DataBundle
from pruning.layout import default_prunable
from pruning.models import image_channels

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, plan: Sequence[int | str] = VGG16, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in plan:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))

    def prunable_names(self) -> list[str]:
        return default_prunable(self)


def build(cfg: Mapping[str, Any], data: DataBundle) -> nn.Module:
    return VGG(VGG16, data.num_classes, image_channels(data, cfg["name"]))
