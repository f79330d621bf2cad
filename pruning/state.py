"""The state of one run: what the setup stage builds and the later stages change.

  model, layout   the network and its prunable tensors (a structured method may swap both for a
                  physically smaller model)
  data            the dataset splits (rebuilt by setup, never saved)
  device          where the model lives
  noise           the noise model; its running measurements are saved
  mask            (p,) bool over the prunable weights; all True until pruning
  w_dense         (p,) the dense prunable weights, the anchor of the regression targets
  step            metrics rows logged so far (the `step` of the next row is step + 1)

`state_dict()` / `load_state_dict()` save and restore it as a whole, together with the global
random streams (torch, Python, numpy, CUDA) that draw inside its stages; `pruning.checkpoint`
writes that at every stage boundary. Named per-purpose streams (`pruning.seeds`) are derived from
the run seed and need no saving.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pruning.layout import ParamLayout, make_layout
from pruning.noise import NoiseModel


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@dataclass
class RunState:
    """See the module docstring. Setup fills model, layout, data, mask and w_dense."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    noise: NoiseModel = field(default_factory=NoiseModel)
    model: nn.Module | None = None
    layout: ParamLayout | None = None
    data: Any = None                     # pruning.data.DataBundle
    mask: torch.Tensor | None = None
    w_dense: torch.Tensor | None = None
    step: int = 0
    built_shapes: dict[str, tuple[int, ...]] | None = None  # the model's shapes as setup built it

    def built(self) -> None:
        """Setup is done: remember the shapes it built, so a later change of architecture
        (structured pruning) is saved as such."""
        self.built_shapes = shapes(self.model)

    def state_dict(self) -> dict[str, Any]:
        """Model (its state dict; with `arch` when its shapes differ from setup's), mask, step, the
        global random streams and the noise model's running state."""
        arch = None
        if self.built_shapes is not None and shapes(self.model) != self.built_shapes:
            # the state dict's shapes rebuild the shrunk model (`reshape_like`); no module is pickled
            arch = {"layout": list(self.layout.names)}
        return {
            "model": self.model.state_dict(),
            "arch": arch,
            "mask": self.mask.detach().cpu() if self.mask is not None else None,
            "step": int(self.step),
            "rng": global_streams(),
            "noise": self.noise.state_dict(),
        }

    def load_state_dict(self, st: Mapping[str, Any]) -> None:
        """Continue from `state_dict()` of an earlier attempt (after this attempt's setup)."""
        if st.get("arch") is not None:  # the architecture changed during pruning (structured methods)
            reshape_like(self.model, st["model"])
            self.model.load_state_dict(st["model"])
            self.model.to(self.device)
            self.layout = make_layout(self.model, list(st["arch"]["layout"]))
        else:
            self.model.load_state_dict(st["model"])
        self.mask = st["mask"].to(self.device)
        self.step = int(st["step"])
        set_global_streams(st["rng"])
        if st.get("noise"):
            self.noise.load_state_dict(st["noise"])


def global_streams() -> dict[str, Any]:
    """The states of the global generators (torch, Python, numpy, CUDA when in use)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        # a tensor, not an ndarray: the state file is read with weights_only=True
        state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_streams(state: Mapping[str, Any]) -> None:
    """Set the global generators back to `global_streams()`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def reshape_like(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Give `model`'s Linear / Conv2d / BatchNorm layers the shapes of `state` (a state dict of a
    structurally shrunk copy of the same architecture, `pruning.structured.shrink`), in place, so
    that `load_state_dict(state)` fits; the layers' size attributes follow their weights."""
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        local = {k[len(prefix):]: v for k, v in state.items()
                 if k.startswith(prefix) and "." not in k[len(prefix):]}
        changed = False
        for key, value in local.items():
            old = getattr(mod, key, None)
            if not isinstance(old, torch.Tensor) or old.shape == value.shape:
                continue
            changed = True
            if isinstance(old, nn.Parameter):
                setattr(mod, key, nn.Parameter(torch.empty_like(value, device=old.device, dtype=old.dtype),
                                               requires_grad=old.requires_grad))
            else:
                setattr(mod, key, torch.empty_like(value, device=old.device, dtype=old.dtype))
        if not changed:
            continue
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, nn.Conv2d):
            depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
            mod.out_channels = mod.weight.shape[0]
            if depthwise:
                mod.in_channels = mod.groups = mod.out_channels
            else:
                mod.in_channels = mod.weight.shape[1] * mod.groups
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            ref = mod.weight if mod.weight is not None else mod.running_mean
            mod.num_features = ref.shape[0]
