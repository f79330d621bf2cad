"""ImageNet (ILSVRC-2012; Russakovsky et al. 2015) in torchvision's ImageFolder layout.

`<data_dir>/imagenet/train/<wnid>/*.JPEG` and `<data_dir>/imagenet/val/<wnid>/*.JPEG` (any image
extension torchvision's `ImageFolder` accepts: jpeg, jpg, png, ...); classes are the sorted folder
names, and the val split must have the same class folders (use the usual script that moves the
50,000 validation images into wnid folders). ImageNet cannot be downloaded automatically: obtain
ILSVRC2012 from image-net.org.

Transforms (the standard torchvision / STR recipe): training split - RandomResizedCrop to
`image_size` and random horizontal flip (`dataset.augment=false`: the eval transform instead);
test and calibration splits - resize the short side to `resize_size` and centre-crop
`image_size`. Pixels are in [0, 1]; the model normalises with the ImageNet mean/std.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from pruning.data import DataBundle, channel_stats, missing_dataset, require_data_dir
from pruning.errors import ConfigError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class FolderView(Dataset):
    """An ImageFolder's samples, decoded by its loader and passed through `transform`.

    The train folder is scanned once and shared by the augmented train view and the
    non-augmented calibration view."""

    def __init__(self, folder: datasets.ImageFolder, transform: Callable[[Any], torch.Tensor]):
        self.folder, self.transform = folder, transform

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, target = self.folder.samples[i]
        return self.transform(self.folder.loader(path)), target


def _folder(path: Path, how: str) -> datasets.ImageFolder:
    if not path.is_dir():
        raise missing_dataset("imagenet", path, how)
    try:
        return datasets.ImageFolder(str(path))
    except FileNotFoundError as exc:  # no class folders, or no image files in them
        raise ConfigError("dataset", "imagenet", how, f"has no images under {path} ({exc})") from None


def load(cfg: Mapping[str, Any], data_dir: Path | None = None) -> DataBundle:
    root = require_data_dir(data_dir, "imagenet") / "imagenet"
    size, resize = cfg.get("image_size", 224), cfg.get("resize_size", 256)
    if not isinstance(size, int) or not isinstance(resize, int) or not 0 < size <= resize:
        raise ConfigError("dataset.image_size/resize_size", [size, resize], "integers with 0 < image_size <= "
                          "resize_size (224 and 256 as standard)")
    mean, std = channel_stats(cfg, IMAGENET_MEAN, IMAGENET_STD)
    how = ("download ILSVRC2012 from image-net.org (it cannot be downloaded automatically), arrange it as "
           "imagenet/{train,val}/<wnid>/<image> and point paths.data_dir (env PRUNING_DATA_DIR) at the "
           "folder holding imagenet/")
    train_folder = _folder(root / "train", how)
    val_folder = _folder(root / "val", how)
    if val_folder.classes != train_folder.classes:
        only = sorted(set(train_folder.classes) ^ set(val_folder.classes))[:5]
        raise ConfigError("dataset", "imagenet", "val/ with the same <wnid> class folders as train/",
                          f"has different class folders in {root}/train and {root}/val (e.g. {only})")
    evaluation = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size), transforms.ToTensor()])
    if bool(cfg.get("augment", True)):
        training = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                       transforms.ToTensor()])
    else:
        training = evaluation
    return DataBundle(
        name="imagenet",
        train=FolderView(train_folder, training),
        test=FolderView(val_folder, evaluation),
        calib=FolderView(train_folder, evaluation),
        input_shape=(3, size, size), num_classes=len(train_folder.classes), mean=mean, std=std,
    )
