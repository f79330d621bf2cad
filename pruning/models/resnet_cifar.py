"""ResNet-20/32/56 for CIFAR with option-A (parameter-free, zero-padding) shortcuts.

Source: He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), section 4.2: a
3x3 stem with 16 channels, three stages of n basic blocks with 16/32/64 channels (depth 6n + 2),
global average pooling and a linear classifier. When a block changes width it subsamples by 2
and zero-pads the new channels ("option A"), so shortcuts add no parameters.

Parameter names match the widely used public checkpoints of this family (Yerlan Idelbayev,
github.com/akamaster/pytorch_resnet_cifar10: `conv1`, `bn1`, `layer{1,2,3}.{i}.{conv,bn}{1,2}`,
`linear`), which `load_weights` reads after stripping their DataParallel `module.` prefix. Those
checkpoints were trained on inputs normalised with the ImageNet statistics; conf/model/resnet*.yaml
sets `normalize` accordingly.

Prunable by default (WoodFisher/CBS/SWAP convention for ResNet-20): the 3x3 convolutions inside
the residual blocks, `layer{1,2,3}.{i}.conv{1,2}.weight` - not the stem, not the classifier.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pruning.data import DataBundle
from pruning.errors import ConfigError
from pruning.models import image_channels

DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet56": 56}


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially by `stride`, zero-pad channels to `out_planes`."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.stride = stride
        extra = out_planes - in_planes
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = ZeroPadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; any spatial size works (global average pooling)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth={depth} is not 6n + 2 with n >= 1")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes = 16
        stages = []
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(planes, width, stride if i == 0 else 1))
                planes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)

    def prunable_names(self) -> list[str]:
        return [f"{name}.weight" for name, m in self.named_modules()
                if isinstance(m, nn.Conv2d) and name.startswith("layer")]


def build(cfg: Mapping[str, Any], data: DataBundle) -> nn.Module:
    name = cfg["name"]
    if name not in DEPTHS:
        raise ConfigError("model.name", name, ", ".join(DEPTHS))
    return CifarResNet(DEPTHS[name], data.num_classes, image_channels(data, name))
