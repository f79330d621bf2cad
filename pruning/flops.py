"""Multiply-accumulate (MAC) and parameter counts of Linear and Conv2d layers.

`count(model, example)` runs one forward pass with hooks and counts, per call of a Linear or
Conv2d module and per example:

  Conv2d  MACs = H_out W_out * C_out * (C_in / groups) * k_h k_w      (grouped and depthwise convs
                                                                       included: groups = C_in)
  Linear  MACs = prod(leading dims except batch) * out_features * in_features
  params  weight entries + bias entries of the counted layers

With `structured=True` the count skips what is structurally zero: a kernel slice W[o, j] (one
output channel o, one input channel j of its group) contributes only if it has a non-zero entry,
its output channel is kept and its input channel is kept. `out_masks` / `in_masks` map module
names to boolean channel masks (True = kept) for pruning expressed as masks rather than zeros;
a bias entry counts when its output channel is kept and it or its row is non-zero. A zeroed
filter (sDprun) or a zeroed input column (a channel removed from the consumer) therefore
removes exactly the MACs and parameters a physically smaller layer would not have.

`total_params` is every parameter of the model (normalisation included), for the dense count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class LayerCount:
    name: str
    kind: str                   # "linear" | "conv"
    macs: int                   # per example
    params: int                 # weights + bias entries counted
    in_channels: int
    out_channels: int
    groups: int
    kernel: tuple[int, ...]
    positions: int              # output positions per example (H_out W_out for a conv)


@dataclass
class FlopsReport:
    layers: list[LayerCount] = field(default_factory=list)
    total_params: int = 0       # all parameters of the model

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    def by_name(self) -> dict[str, LayerCount]:
        return {layer.name: layer for layer in self.layers}


def _active_pairs(weight: torch.Tensor, groups: int, in_mask: torch.Tensor | None,
                  out_mask: torch.Tensor | None, structured: bool) -> tuple[int, torch.Tensor]:
    """Number of active (output, input-of-group) kernel slices, and which outputs have one."""
    c_out, c_in_g = weight.shape[0], weight.shape[1]
    nz = weight.reshape(c_out, c_in_g, -1).ne(0).any(dim=2) if structured else torch.ones(
        c_out, c_in_g, dtype=torch.bool, device=weight.device)
    if out_mask is not None:
        nz = nz & out_mask.to(nz.device).view(-1, 1).bool()
    if in_mask is not None:
        im = in_mask.to(nz.device).bool()
        # output o belongs to group o // (c_out / groups); its inputs are that group's slice
        per_group = im.view(groups, c_in_g)
        out_group = torch.arange(c_out, device=nz.device) // (c_out // groups)
        nz = nz & per_group[out_group]
    return int(nz.sum()), nz.any(dim=1)


@torch.no_grad()
def count(model: nn.Module, example: torch.Tensor, structured: bool = False,
          in_masks: Mapping[str, torch.Tensor] | None = None,
          out_masks: Mapping[str, torch.Tensor] | None = None) -> FlopsReport:
    """MACs and parameters per example of every Linear/Conv2d call in `model(example)`."""
    in_masks = dict(in_masks or {})
    out_masks = dict(out_masks or {})
    names = {mod: name for name, mod in model.named_modules()}
    layers: list[LayerCount] = []
    batch = int(example.shape[0])

    def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        name = names[mod]
        w = mod.weight
        bias = getattr(mod, "bias", None)
        if isinstance(mod, nn.Conv2d):
            kind, groups = "conv", int(mod.groups)
            positions = int(math.prod(output.shape[2:]))
            kernel = tuple(int(k) for k in mod.kernel_size)
            c_in, c_out = int(mod.in_channels), int(mod.out_channels)
        else:
            kind, groups, kernel = "linear", 1, ()
            positions = int(output.numel() // (batch * output.shape[-1]))
            c_in, c_out = int(mod.in_features), int(mod.out_features)
        ksize = int(math.prod(kernel)) if kernel else 1
        pairs, rows = _active_pairs(w, groups, in_masks.get(name), out_masks.get(name), structured)
        macs = positions * pairs * ksize
        params = pairs * ksize
        if bias is not None:
            keep = (rows | bias.ne(0)) if structured else torch.ones_like(bias, dtype=torch.bool)
            if name in out_masks:
                keep = keep & out_masks[name].to(keep.device).bool()
            params += int(keep.sum())
        layers.append(LayerCount(name, kind, macs, params, c_in, c_out, groups, kernel, positions))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return FlopsReport(layers, int(sum(p.numel() for p in model.parameters())))
