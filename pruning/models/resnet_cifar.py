"""ResNet-20/32/56 for CIFAR with option-A (parameter-free, zero-padding) shortcuts, and ResNet-20
with option-B (projection) shortcuts.

Source: He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), section 4.2: a
3x3 stem with 16 channels, three stages of n basic blocks with 16/32/64 channels (depth 6n + 2),
global average pooling and a linear classifier. When a block changes width it subsamples by 2
and zero-pads the new channels ("option A"), so shortcuts add no parameters.

Parameter names match the widely used public checkpoints of this family (Yerlan Idelbayev,
github.com/akamaster/pytorch_resnet_cifar10: `conv1`, `bn1`, `layer{1,2,3}.{i}.{conv,bn}{1,2}`,
`linear`), which `load_weights` reads after stripping their DataParallel `module.` prefix. Those
checkpoints were trained on inputs normalised with the ImageNet statistics; conf/model/resnet*.yaml
sets `normalize` accordingly.

Option B (`resnet20b`; He et al. 2016, section 3.3, "projection shortcuts are used for increasing
dimensions"): where a block changes width, its shortcut is a strided 1x1 convolution + BatchNorm
(`layer{2,3}.0.shortcut.{0,1}`). This is the Distiller-style ResNet-20 that WoodFisher, CBS, SWAP and
CHITA prune (their `resnet20_cifar10.pth.tar`, keys `downsample.{0,1}` and classifier `fc`, mapped on
load by pruning/models/checkpoints.py). That checkpoint was trained on inputs normalised with
mean = std = 0.5 per channel (Distiller's CIFAR loader; measured, see conf/model/resnet20b.yaml),
which conf/model/resnet20b.yaml sets.

Prunable by default (WoodFisher/CBS/SWAP convention for ResNet-20, algorithms.md 1.2): the 3x3
convolutions inside the residual blocks, `layer{1,2,3}.{i}.conv{1,2}.weight` - not the stem, not the
classifier and, for option B, not the two 1x1 shortcut convs: the reference scripts leave them
dense (their p = 267,264 is the 18 block convs alone), and they carry the whole residual signal of
a stage change in only 512 + 2,048 weights. CHITA's set (stem and classifier too) is a
`model.prunable` override, see conf/model/resnet20.yaml.
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

# model name: (depth, shortcut option)
ARCHS = {"resnet20": (20, "A"), "resnet32": (32, "A"), "resnet56": (56, "A"), "resnet20b": (20, "B")}


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


def projection_shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """Option-B shortcut: strided 1x1 convolution + BatchNorm (Distiller's `downsample`)."""
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = (ZeroPadShortcut(in_planes, planes, stride) if shortcut == "A"
                                        else projection_shortcut(in_planes, planes, stride))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; any spatial size works (global average pooling)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, shortcut: str = "A"):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth={depth} is not 6n + 2 with n >= 1")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut={shortcut!r} is not 'A' (zero padding) or 'B' (1x1 projection)")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes = 16
        stages = []
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(planes, width, stride if i == 0 else 1, shortcut))
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
        # the block convs only: not the stem, nor option B's 1x1 shortcut convs (module docstring)
        return [f"{name}.weight" for name, m in self.named_modules() if isinstance(m, nn.Conv2d)
                and name.startswith("layer") and name.rsplit(".", 1)[-1] in ("conv1", "conv2")]


def build(cfg: Mapping[str, Any], data: DataBundle) -> nn.Module:
    name = cfg["name"]
    if name not in ARCHS:
        raise ConfigError("model.name", name, ", ".join(ARCHS))
    depth, shortcut = ARCHS[name]
    return CifarResNet(depth, data.num_classes, image_channels(data, name), shortcut)
