"""MobileNets for ImageNet: MobileNetV1 (own definition) and MobileNetV2 (torchvision).

MobileNetV1 - Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
Applications" (2017), width 1.0, 224x224 inputs: a 3x3 stride-2 stem with 32 channels and 13
depthwise-separable blocks (3x3 depthwise + BN + ReLU, 1x1 pointwise + BN + ReLU), global average
pooling and a 1024 -> classes linear layer. This is the network pruned by STR (Kusupati et al.,
ICML 2020; checkpoint `MobileNetV1-Dense-STR.pth`) and by WoodFisher/CBS/SWAP, whose module names
it keeps: `model.0.0` (stem conv), `model.{1..13}.0` (depthwise) and `model.{1..13}.3`
(pointwise) convolutions, `fc` classifier. Prunable by default: all of them (the
`configs/mobilenetv1*.yaml` set of WoodFisher), about 4.2M weights.

MobileNetV2 - Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks" (CVPR
2018), built by torchvision's `MobileNetV2` class (no weights are downloaded; torchvision's
parameter names, so its published state dicts load). Prunable by default: every convolution and
the classifier weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torchvision
from torch import nn

from pruning.data import DataBundle
from pruning.errors import ConfigError
from pruning.layout import default_prunable
from pruning.models import image_channels

# (output channels, stride) of the 13 depthwise-separable blocks
V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
             (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Sequential(*_conv_bn(in_channels, 32, 3, 2))]
        c = 32
        for cout, stride in V1_BLOCKS:
            blocks.append(nn.Sequential(*_conv_bn(c, c, 3, stride, groups=c), *_conv_bn(c, cout, 1, 1)))
            c = cout
        self.model = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(self.model(x), 1).flatten(1)
        return self.fc(x)

    def prunable_names(self) -> list[str]:
        return default_prunable(self)


class MobileNetV2(torchvision.models.MobileNetV2):
    """torchvision's MobileNetV2 (same parameter names) with the project's prunable set."""

    def prunable_names(self) -> list[str]:
        return default_prunable(self)


def build(cfg: Mapping[str, Any], data: DataBundle) -> nn.Module:
    name = cfg["name"]
    channels = image_channels(data, name)
    if name == "mobilenetv1":
        return MobileNetV1(data.num_classes, channels)
    if name == "mobilenetv2":
        if channels != 3:
            raise ConfigError("dataset", data.name, "RGB image data (3 channels)",
                              f"has {channels} channel(s), which torchvision's mobilenetv2 cannot take")
        width, dropout = float(cfg.get("width_mult", 1.0)), float(cfg.get("dropout", 0.2))
        if width <= 0:
            raise ConfigError("model.width_mult", width, "a positive number (1.0 = the standard network)")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError("model.dropout", dropout, "a probability in [0, 1)")
        return MobileNetV2(num_classes=data.num_classes, width_mult=width, dropout=dropout)
    raise ConfigError("model.name", name, "mobilenetv1, mobilenetv2")
