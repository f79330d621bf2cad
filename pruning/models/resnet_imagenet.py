"""ResNet-50 for ImageNet, built by torchvision's `ResNet` class (no weights are downloaded).

Source: He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), bottleneck blocks
[3, 4, 6, 3]; torchvision's definition (stride on the 3x3 convolution, "ResNet v1.5"), which is
also the layout of the STR dense checkpoint `ResNet50-STR-Dense.pth` pruned by WoodFisher, CBS
and SWAP. Parameter names are torchvision's, so its published state dicts load.

Prunable by default (WoodFisher `configs/resnet50.yaml`): every convolution, the downsample
projections included, and the `fc` weight - about 25.5M weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck

from pruning.data import DataBundle
from pruning.errors import ConfigError
from pruning.layout import default_prunable
from pruning.models import image_channels


class ResNet50(torchvision.models.ResNet):
    """torchvision's ResNet-50 (identical to `torchvision.models.resnet50(weights=None)`)."""

    def __init__(self, num_classes: int = 1000, zero_init_residual: bool = False):
        super().__init__(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, zero_init_residual=zero_init_residual)

    def prunable_names(self) -> list[str]:
        return default_prunable(self)


def build(cfg: Mapping[str, Any], data: DataBundle) -> nn.Module:
    channels = image_channels(data, cfg["name"])
    if channels != 3:
        raise ConfigError("dataset", data.name, "RGB image data (3 channels)",
                          f"has {channels} channel(s), which torchvision's resnet50 cannot take")
    return ResNet50(data.num_classes, zero_init_residual=bool(cfg.get("zero_init_residual", False)))
