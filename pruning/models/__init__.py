"""Models. `build_model` returns a `Classifier`: input normalisation (buffers) + the network.

Keys (config group `model`, conf/model/<key>.yaml): `pruning.registry.MODELS`, each a module's
`build(cfg, data) -> nn.Module`.

Prunable tensors: each network defines `prunable_names()` (names inside the network; the
fallback is every Linear/Conv weight). `model.prunable` in the config overrides it with glob
patterns over the Classifier's parameter names (e.g. "net.layer*.conv*.weight").

Normalisation: the dataset's mean/std, unless `model.normalize` gives `{mean: [...], std: [...]}`
(a checkpoint trained with other statistics, e.g. the public CIFAR ResNets).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruning.data import DataBundle
from pruning.errors import ConfigError
from pruning.layout import default_prunable
from pruning.models.checkpoints import find_state, network_state, safe_torch_load
from pruning.registry import MODELS


class Normalize(nn.Module):
    """(x - mean) / std with per-channel statistics stored as buffers."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], channel_dim_shape: tuple[int, ...]):
        super().__init__()
        shape = (1, len(mean)) + (1,) * (len(channel_dim_shape) - 1) if len(mean) > 1 else (1,)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """Normalisation followed by the network; attacks and noise act on pixel-space inputs."""

    def __init__(self, net: nn.Module, data: DataBundle):
        super().__init__()
        self.normalize = Normalize(data.mean, data.std, data.input_shape)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def prunable_names(self) -> list[str]:
        inner = self.net.prunable_names() if hasattr(self.net, "prunable_names") else default_prunable(self.net)
        return [f"net.{n}" for n in inner]


def available() -> list[str]:
    return sorted(MODELS)


def image_channels(data: DataBundle, model_name: str) -> int:
    """Number of input channels of image data shaped (C, H, W); ConfigError for other data."""
    if len(data.input_shape) != 3:
        raise ConfigError("dataset", data.name, "image data shaped (channels, height, width)",
                          f"has input shape {tuple(data.input_shape)}, which model={model_name} cannot take")
    return int(data.input_shape[0])


def _normalization(cfg: Mapping[str, Any], data: DataBundle) -> DataBundle:
    """`data` with `model.normalize` (if given) replacing the dataset's mean and std."""
    norm = cfg.get("normalize")
    if norm is None:
        return data
    allowed = (f"null (the dataset's statistics) or {{mean: [...], std: [...]}} with one positive std per "
               f"channel ({len(data.mean)} for dataset={data.name})")
    try:
        mean, std = tuple(float(v) for v in norm["mean"]), tuple(float(v) for v in norm["std"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError("model.normalize", norm, allowed) from None
    if len(mean) != len(data.mean) or len(std) != len(data.std) or min(std) <= 0:
        raise ConfigError("model.normalize", {"mean": list(mean), "std": list(std)}, allowed)
    return dataclasses.replace(data, mean=mean, std=std)


def build_model(cfg: Mapping[str, Any], data: DataBundle) -> Classifier:
    name = cfg["name"]
    if name not in MODELS:
        raise ConfigError("model", name, ", ".join(available()))
    return Classifier(MODELS[name].load()(cfg, data), _normalization(cfg, data))


def load_weights(model: Classifier, path: str | Path) -> dict[str, Any]:
    """Load a state dict saved by this project (Classifier keys), a bare network state dict, or a
    published training checkpoint (pruning/models/checkpoints.py: read without running anything
    from the file, reference key layouts mapped, masks applied). Matching is strict.

    Returns the other entries of the file (e.g. `best_prec1`, `epoch`).
    """
    path = Path(path)
    state, extra = find_state(safe_torch_load(path))
    if state is None or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError("model.checkpoint", str(path), "a file holding a state dict (name -> tensor), "
                          "optionally wrapped as {'state_dict': ...}", "holds something else")
    target = model if any(k.startswith(("net.", "module.net.")) for k in state) else model.net
    state = network_state(state, target.state_dict())
    problems = _mismatch(target.state_dict(), state)
    if problems:
        raise ConfigError("model.checkpoint", str(path), f"a state dict of {type(model.net).__name__} (the "
                          "configured model; check model=...)", "does not fit the model: " + "; ".join(problems))
    target.load_state_dict(state)
    return extra


def _mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> list[str]:
    """Short description of missing, unexpected and wrongly shaped keys (first few of each)."""

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")

    # BatchNorm fills a missing num_batches_tracked itself (older checkpoints lack it)
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}" for k in given
              if k in expected and given[k].shape != expected[k].shape]
    out = []
    if missing:
        out.append(f"missing {few(missing)}")
    if unexpected:
        out.append(f"unexpected {few(unexpected)}")
    if shapes:
        out.append(f"shape mismatch {few(shapes)}")
    return out
