"""The shared vocabulary of the pruning core: which tensors are prunable, how they flatten into
one vector w of length p, how that vector splits into blocks, and how masks are chosen.

Every method works on flat vectors (`w`, `mask`, per-weight `scores`) over a `ParamLayout`, so a
method module only states its rule; selection, sparsity bookkeeping and writing weights back
live here.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of the prunable tensors, in module order, and their flat offsets."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for n in self.sizes:
            out.append(acc)
            acc += n
        return tuple(out)

    def slices(self) -> list[slice]:
        """One slice of the flat vector per tensor."""
        return [slice(o, o + n) for o, n in zip(self.offsets, self.sizes)]

    def blocks(self, block_size: int | None = None) -> list[slice]:
        """Contiguous blocks: one per tensor, each cut into chunks of at most `block_size`.

        This is the block-diagonal structure of WoodFisher (`--fisher-split-grads`): a tensor larger
        than B is split into ceil(numel / B) chunks. CHITA's `get_blocklist` cuts the same tensor into
        floor(numel / B) chunks of about B instead (at least B each); both keep blocks within a tensor.
        """
        if block_size is not None and block_size <= 0:
            raise ValueError(f"block_size={block_size} must be a positive integer or None")
        out = []
        for sl in self.slices():
            if block_size is None or sl.stop - sl.start <= block_size:
                out.append(sl)
            else:
                for start in range(sl.start, sl.stop, block_size):
                    out.append(slice(start, min(start + block_size, sl.stop)))
        return out

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vec: torch.Tensor) -> list[torch.Tensor]:
        return [vec[sl].view(shape) for sl, shape in zip(self.slices(), self.shapes)]


def default_prunable(model: nn.Module) -> list[str]:
    """Weights of every Linear and Conv layer (no biases, no normalisation parameters)."""
    names = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            names.append(f"{mod_name}.weight" if mod_name else "weight")
    return names


def make_layout(model: nn.Module, prunable: Iterable[str] | None = None) -> ParamLayout:
    """Layout of the prunable tensors of `model`.

    `prunable` is None (the model's `prunable_names()` if it defines one, else every Linear/Conv
    weight) or a list of glob patterns over parameter names, e.g. ``["net.layer*.conv*.weight"]``.
    """
    params = dict(model.named_parameters())
    if prunable is None:
        chosen = model.prunable_names() if hasattr(model, "prunable_names") else default_prunable(model)
    else:
        patterns = list(prunable)
        chosen = [n for n in params if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if not chosen:
            raise ValueError(
                f"model.prunable={patterns} matches no parameter; parameter names look like "
                f"{list(params)[:4]}"
            )
    order = [n for n in params if n in set(chosen)]  # module order, whatever order was given
    return ParamLayout(tuple(order), tuple(tuple(params[n].shape) for n in order))


def get_params(model: nn.Module, layout: ParamLayout) -> list[nn.Parameter]:
    params = dict(model.named_parameters())
    return [params[n] for n in layout.names]


def get_flat(model: nn.Module, layout: ParamLayout) -> torch.Tensor:
    """The prunable weights as one detached flat vector (a copy)."""
    with torch.no_grad():
        return layout.flatten([p.detach() for p in get_params(model, layout)]).clone()


@torch.no_grad()
def set_flat(model: nn.Module, layout: ParamLayout, vec: torch.Tensor) -> None:
    """Write a flat vector back into the model's prunable tensors."""
    if vec.numel() != layout.numel:
        raise ValueError(f"vector has {vec.numel()} entries, layout has {layout.numel}")
    for p, v in zip(get_params(model, layout), layout.unflatten(vec)):
        p.copy_(v.to(device=p.device, dtype=p.dtype))


def num_kept(p: int, sparsity: float) -> int:
    """k = floor((1 - s) p), the number of weights kept at sparsity s (the CHITA/SWAP convention)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} is outside [0, 1)")
    return int(math.floor((1.0 - sparsity) * p + 1e-9))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask keeping exactly the k highest scores (ties broken by index, deterministically)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    if k >= scores.numel():
        return ~mask
    # topk on a stable sort: equal scores keep the lower index, so results do not depend on the device
    idx = torch.sort(scores, descending=True, stable=True).indices[:k]
    mask[idx] = True
    return mask


def select_mask(scores: torch.Tensor, layout: ParamLayout, sparsity: float, scope: str = "global") -> torch.Tensor:
    """Mask keeping the highest scores at `sparsity`, with one global threshold or per tensor."""
    if scope == "global":
        return topk_mask(scores, num_kept(scores.numel(), sparsity))
    if scope == "layerwise":
        mask = torch.zeros_like(scores, dtype=torch.bool)
        for sl in layout.slices():
            mask[sl] = topk_mask(scores[sl], num_kept(sl.stop - sl.start, sparsity))
        return mask
    raise ValueError(f"scope={scope!r} is not allowed; choose 'global' or 'layerwise'")


@torch.no_grad()
def apply_mask(model: nn.Module, layout: ParamLayout, mask: torch.Tensor) -> None:
    """Zero the pruned weights in place."""
    for p, m in zip(get_params(model, layout), layout.unflatten(mask)):
        p.mul_(m.to(device=p.device, dtype=p.dtype))


@torch.no_grad()
def sparsity_stats(model: nn.Module, layout: ParamLayout) -> dict[str, float | int]:
    """Achieved sparsity over the prunable tensors and over all parameters, with counts."""
    prunable = get_params(model, layout)
    nnz_prunable = int(sum(int((p != 0).sum()) for p in prunable))
    numel_prunable = layout.numel
    all_params = list(model.parameters())
    numel_total = int(sum(p.numel() for p in all_params))
    nnz_total = int(sum(int((p != 0).sum()) for p in all_params))
    return {
        "sparsity_prunable": 1.0 - nnz_prunable / max(numel_prunable, 1),
        "sparsity_total": 1.0 - nnz_total / max(numel_total, 1),
        "nnz_prunable": nnz_prunable,
        "numel_prunable": numel_prunable,
        "nnz_total": nnz_total,
        "numel_total": numel_total,
    }
