"""Data sets (issue 3): each loader reads tiny files written here in the real on-disk format
(MNIST idx under MNIST/raw/, CIFAR python pickles, ImageFolder PNGs) through torchvision's
classes; missing data is a ConfigError that says where we looked and how to get it."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pruning.data import build_dataset
from pruning.errors import ConfigError


def rng_images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


# ----------------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_balanced_and_in_pixel_range():
    cfg = {"name": "synthetic", "num_train": 60, "num_test": 30, "num_classes": 3, "shape": [3, 8, 8], "seed": 5}
    a, b = build_dataset(cfg), build_dataset(cfg)
    xa, ya = a.train.tensors
    assert torch.equal(xa, b.train.tensors[0]) and torch.equal(ya, b.train.tensors[1])
    assert xa.shape == (60, 3, 8, 8) and a.test.tensors[0].shape == (30, 3, 8, 8)
    assert a.input_shape == (3, 8, 8) and a.num_classes == 3 and len(a.mean) == len(a.std) == 3
    assert 0.0 <= float(xa.min()) and float(xa.max()) <= 1.0
    assert torch.bincount(ya).tolist() == [20, 20, 20]
    other = build_dataset({**cfg, "seed": 6}).train.tensors[0]
    assert not torch.equal(xa, other)
    # the classes are separable: nearest class mean on train classifies the test split well
    means = torch.stack([xa[ya == c].mean(0) for c in range(3)]).flatten(1)
    xt, yt = a.test.tensors
    pred = torch.cdist(xt.flatten(1), means).argmin(1)
    assert (pred == yt).float().mean() > 0.9


def test_synthetic_flat_shape_and_errors():
    d = build_dataset({"name": "synthetic", "num_train": 10, "num_test": 5, "shape": [64]})
    assert d.input_shape == (64,) and d.train.tensors[0].shape == (10, 64) and len(d.mean) == 1
    with pytest.raises(ConfigError, match="dataset.num_train"):
        build_dataset({"name": "synthetic", "num_train": 0})
    with pytest.raises(ConfigError, match="dataset.shape"):
        build_dataset({"name": "synthetic", "shape": [3, 0, 8]})


def test_unknown_dataset_and_unset_data_dir():
    with pytest.raises(ConfigError, match=r"dataset='svhn'.*cifar10.*mnist"):
        build_dataset({"name": "svhn"})
    with pytest.raises(ConfigError, match=r"paths.data_dir=None.*PRUNING_DATA_DIR"):
        build_dataset({"name": "mnist"}, None)


# --------------------------------------------------------------------------------------- MNIST
def write_idx(path: Path, array: np.ndarray) -> None:
    """The idx format: magic (0, 0, 0x08 = ubyte, ndim), big-endian int32 dims, then the bytes."""
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}i", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def write_mnist(root: Path, n_train: int = 12, n_test: int = 6) -> dict[str, np.ndarray]:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {"train-images-idx3-ubyte": rng_images(n_train, (28, 28), 0),
              "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
              "t10k-images-idx3-ubyte": rng_images(n_test, (28, 28), 1),
              "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) * 3) % 10}
    for name, arr in arrays.items():
        write_idx(raw / name, arr)
    return arrays


def test_mnist_reads_idx_files(tmp_path):
    arrays = write_mnist(tmp_path)
    d = build_dataset({"name": "mnist", "download": False}, tmp_path)
    assert (d.name, d.input_shape, d.num_classes) == ("mnist", (1, 28, 28), 10)
    assert (len(d.train), len(d.test), len(d.calib)) == (12, 6, 12)
    assert d.mean == (0.1307,) and d.std == (0.3081,)
    x, y = d.test[4]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"][4]).float() / 255)
    assert int(y) == int(arrays["t10k-labels-idx1-ubyte"][4])
    xs, ys = next(iter(torch.utils.data.DataLoader(d.train, batch_size=12)))
    assert xs.shape == (12, 1, 28, 28) and ys.tolist() == arrays["train-labels-idx1-ubyte"].tolist()


def test_mnist_missing_says_where_and_how(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_dataset({"name": "mnist", "download": False}, tmp_path)
    msg = str(err.value)
    assert "dataset='mnist'" in msg and str(tmp_path / "MNIST" / "raw") in msg
    assert "dataset.download=true" in msg and "PRUNING_DATA_DIR" in msg


# --------------------------------------------------------------------------------------- CIFAR
def cifar_rows(images_chw: np.ndarray) -> np.ndarray:
    """The release stores each image as one row of 3072 bytes: 1024 red, 1024 green, 1024 blue."""
    return images_chw.reshape(len(images_chw), 3 * 32 * 32)


def dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path, per_batch: int = 2, n_test: int = 4) -> tuple[np.ndarray, list[int], np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train = rng_images(5 * per_batch, (3, 32, 32), 2)
    labels = [i % 10 for i in range(5 * per_batch)]
    for b in range(5):
        sl = slice(b * per_batch, (b + 1) * per_batch)
        dump(folder / f"data_batch_{b + 1}", {"batch_label": f"training batch {b + 1} of 5",
                                               "data": cifar_rows(train[sl]), "labels": labels[sl],
                                               "filenames": [f"img{i}.png" for i in range(per_batch)]})
    test = rng_images(n_test, (3, 32, 32), 3)
    dump(folder / "test_batch", {"data": cifar_rows(test), "labels": [9 - i for i in range(n_test)]})
    dump(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072})
    return train, labels, test


def write_cifar100(root: Path, n_train: int = 6, n_test: int = 3) -> np.ndarray:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train = rng_images(n_train, (3, 32, 32), 4)
    dump(folder / "train", {"data": cifar_rows(train), "fine_labels": [99 - i for i in range(n_train)],
                            "coarse_labels": [i % 20 for i in range(n_train)]})
    dump(folder / "test", {"data": cifar_rows(rng_images(n_test, (3, 32, 32), 5)),
                           "fine_labels": list(range(n_test)), "coarse_labels": [0] * n_test})
    dump(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                           "coarse_label_names": [f"c{i}" for i in range(20)]})
    return train


def test_cifar10_reads_python_batches(tmp_path):
    train, labels, test = write_cifar10(tmp_path)
    d = build_dataset({"name": "cifar10", "verify_checksums": False}, tmp_path)
    assert (d.input_shape, d.num_classes, len(d.train), len(d.test)) == ((3, 32, 32), 10, 10, 4)
    assert len(d.mean) == 3 and d.bounds == (0.0, 1.0)
    for i in range(len(d.calib)):  # calib = training split without augmentation, channel order kept
        x, y = d.calib[i]
        assert torch.allclose(x, torch.from_numpy(train[i]).float() / 255) and int(y) == labels[i]
    x, y = d.test[1]
    assert torch.allclose(x, torch.from_numpy(test[1]).float() / 255) and int(y) == 8
    # training split: random crop with 4-pixel zero padding + flip; same size, pixels in [0, 1]
    torch.manual_seed(0)
    augmented = torch.stack([d.train[0][0] for _ in range(8)])
    assert augmented.shape == (8, 3, 32, 32) and 0.0 <= float(augmented.min()) and float(augmented.max()) <= 1.0
    assert not all(torch.equal(a, d.calib[0][0]) for a in augmented)
    no_aug = build_dataset({"name": "cifar10", "verify_checksums": False, "augment": False}, tmp_path)
    assert torch.equal(no_aug.train[0][0], d.calib[0][0])


def test_cifar10_checksums_are_verified_by_default(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(ConfigError, match=r"dataset='cifar10'.*MD5.*verify_checksums=false"):
        build_dataset({"name": "cifar10"}, tmp_path)


def test_cifar100_reads_fine_labels(tmp_path):
    train = write_cifar100(tmp_path)
    d = build_dataset({"name": "cifar100", "verify_checksums": False}, tmp_path)
    assert (d.num_classes, len(d.train), len(d.test)) == (100, 6, 3)
    x, y = d.calib[2]
    assert torch.allclose(x, torch.from_numpy(train[2]).float() / 255) and int(y) == 97


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifar_missing_says_where_and_how(tmp_path, name, folder):
    with pytest.raises(ConfigError) as err:
        build_dataset({"name": name}, tmp_path)
    msg = str(err.value)
    assert f"dataset='{name}'" in msg and str(tmp_path / folder) in msg
    assert "dataset.download=true" in msg and "PRUNING_DATA_DIR" in msg


# ------------------------------------------------------------------------------------ ImageNet
def write_imagefolder(root: Path, classes: dict[str, int], split: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for wnid, n in classes.items():
        (root / "imagenet" / split / wnid).mkdir(parents=True)
        for i in range(n):
            h, w = int(rng.integers(20, 40)), int(rng.integers(20, 40))
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            ext = "png" if i % 2 == 0 else "JPEG"
            Image.fromarray(pixels).save(root / "imagenet" / split / wnid / f"{wnid}_{i}.{ext}",
                                         format="PNG" if ext == "png" else "JPEG")


def test_imagenet_reads_imagefolder_layout(tmp_path):
    write_imagefolder(tmp_path, {"n01440764": 3, "n01443537": 2}, "train", 0)
    write_imagefolder(tmp_path, {"n01440764": 1, "n01443537": 2}, "val", 1)
    cfg = {"name": "imagenet", "image_size": 16, "resize_size": 20}
    d = build_dataset(cfg, tmp_path)
    assert (d.input_shape, d.num_classes, len(d.train), len(d.test), len(d.calib)) == ((3, 16, 16), 2, 5, 3, 5)
    assert d.mean == (0.485, 0.456, 0.406)
    assert [int(d.test[i][1]) for i in range(3)] == [0, 1, 1]
    x, y = d.calib[3]
    assert x.shape == (3, 16, 16) and int(y) == 1 and torch.equal(x, d.calib[3][0])  # eval transform: fixed
    xs, ys = next(iter(torch.utils.data.DataLoader(d.train, batch_size=5)))
    assert xs.shape == (5, 3, 16, 16) and 0.0 <= float(xs.min()) and float(xs.max()) <= 1.0
    assert ys.tolist() == [0, 0, 0, 1, 1]


def test_imagenet_missing_and_inconsistent(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_dataset({"name": "imagenet"}, tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "imagenet" / "train") in msg and "image-net.org" in msg and "PRUNING_DATA_DIR" in msg
    write_imagefolder(tmp_path, {"n01440764": 1, "n01443537": 1}, "train", 0)
    write_imagefolder(tmp_path, {"n01440764": 1}, "val", 1)
    with pytest.raises(ConfigError, match=r"different class folders.*n01443537"):
        build_dataset({"name": "imagenet"}, tmp_path)
    with pytest.raises(ConfigError, match="dataset.image_size"):
        build_dataset({"name": "imagenet", "image_size": 300, "resize_size": 256}, tmp_path)


def test_in_memory_datasets_are_evaluated_in_the_loaders_batches(monkeypatch):
    """`evaluate` slices in-memory tensors instead of collating examples one by one: the same
    batches as the DataLoader (subsets included), so the same accuracy and loss to the bit."""
    import torch.nn as nn
    from torch.utils.data import Subset, TensorDataset

    import pruning.train as train_mod
    from pruning.data import ImageTensorDataset

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (301, 1, 4, 4), dtype=torch.uint8, generator=g)
    targets = torch.randint(0, 3, (301,), generator=g)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    cases = [ImageTensorDataset(images, targets), Subset(ImageTensorDataset(images, targets), [5, 3, 300, 0, 7] * 30),
             TensorDataset(images.float() / 255, targets)]
    for ds in cases:
        fast = train_mod.evaluate(model, ds, torch.device("cpu"), batch_size=64)
        assert train_mod.tensor_batches(ds, 64) is not None
        with monkeypatch.context() as m:
            m.setattr(train_mod, "tensor_batches", lambda d, b: None)  # the DataLoader route
            slow = train_mod.evaluate(model, ds, torch.device("cpu"), batch_size=64)
        assert fast == slow
    augmented = ImageTensorDataset(images, targets, transform=lambda x: x.flip(-1))
    assert train_mod.tensor_batches(augmented, 64) is None  # a transform: per-example route
