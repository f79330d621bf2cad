"""Models. `build_model` returns a `Classifier`: input normalisation (buffers) + the network.

Registry keys (config group `model`, one module each, each with `build(cfg, data) -> nn.Module`):
  mlp        small MLP for the embedded digits default

Prunable tensors: a network may define `prunable_names()` (names inside the network); the
default is every Linear/Conv weight. `model.prunable` in the config overrides it with glob
patterns over the Classifier's parameter names (e.g. "net.layer*.conv*.weight").
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruning.data import DataBundle
from pruning.errors import ConfigError
from pruning.layout import default_prunable

_MODULES = {
    "mlp": "pruning.models.mlp",
}


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
    return sorted(_MODULES)


def build_model(cfg: Mapping[str, Any], data: DataBundle) -> Classifier:
    name = cfg["name"]
    if name not in _MODULES:
        raise ConfigError("model", name, ", ".join(available()))
    module = importlib.import_module(_MODULES[name])
    return Classifier(module.build(cfg, data), data)


def load_weights(model: Classifier, path: str | Path) -> dict[str, Any]:
    """Load a state dict saved by this project (Classifier keys) or a bare network state dict.

    Uses `torch.load(weights_only=True)`: no arbitrary objects are unpickled. Accepts
    `{"state_dict": ...}` wrappers and DataParallel's `module.` prefix. Returns the other
    entries of the file (e.g. `best_prec1`).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError("model.checkpoint", str(path), "a path to an existing state-dict file, or null "
                          "to train the dense model and cache it", "does not exist")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    extra: dict[str, Any] = {}
    state = blob
    if isinstance(blob, Mapping) and "state_dict" in blob:
        state = blob["state_dict"]
        extra = {k: v for k, v in blob.items() if k != "state_dict"}
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    if any(k.startswith("net.") for k in state):
        model.load_state_dict(state)
    else:
        model.net.load_state_dict(state)
    return extra
