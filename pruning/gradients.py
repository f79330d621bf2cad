"""The gradient matrix G of the Fisher/OBS family (algorithms.md section 1).

Row i is g_i = grad_w of the mean loss over a "fisher mini-batch" B_i of m examples, over the
prunable weights only, at the current weights, with the model in eval mode. With m = 1 these are
per-sample gradients, computed with torch.func (vmap of grad of functional_call) in chunks, never
with a Python loop over samples. G is stored by blocks (`ParamLayout.blocks`) so that methods can
work block by block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from pruning.layout import ParamLayout


@dataclass
class GradientMatrix:
    """G (N x p) held as column blocks; behaves as a linear operator for IHT-style solvers."""

    blocks: list[slice]
    data: list[torch.Tensor]     # data[b] has shape (N, blocks[b].stop - blocks[b].start)
    indices: torch.Tensor        # dataset indices used, shape (N, m)

    @property
    def num_rows(self) -> int:
        return self.data[0].shape[0]

    @property
    def num_cols(self) -> int:
        return self.blocks[-1].stop

    def dense(self) -> torch.Tensor:
        return torch.cat(self.data, dim=1)

    def matvec(self, w: torch.Tensor) -> torch.Tensor:
        """G w (length N)."""
        out = torch.zeros(self.num_rows, dtype=self.data[0].dtype, device=self.data[0].device)
        for sl, gb in zip(self.blocks, self.data):
            out += gb @ w[sl].to(gb.dtype)
        return out

    def rmatvec(self, r: torch.Tensor) -> torch.Tensor:
        """G^T r (length p)."""
        return torch.cat([gb.T @ r.to(gb.dtype) for gb in self.data])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> GradientMatrix:
        return GradientMatrix(self.blocks, [d.to(device=device, dtype=dtype or d.dtype) for d in self.data],
                              self.indices)


def compute_gradients(
    model: nn.Module,
    layout: ParamLayout,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    mini_batch: int = 1,
    chunk_size: int = 128,
    block_size: int | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    progress: bool = False,
) -> torch.Tensor:
    """Dense G of shape (N, p) for N = len(inputs) // mini_batch rows.

    Each row is the gradient of the mean loss over `mini_batch` consecutive examples. Computed
    with vmap over rows, `chunk_size` rows at a time; BatchNorm and dropout run in eval mode.
    """
    device = next(model.parameters()).device
    n_rows = inputs.shape[0] // mini_batch
    if n_rows == 0:
        raise ValueError(f"{inputs.shape[0]} examples cannot fill one mini-batch of {mini_batch}")
    was_training = model.training
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    prunable = {k: params[k] for k in layout.names}
    frozen = {k: v for k, v in params.items() if k not in prunable}

    def row_loss(pr: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, ({**frozen, **pr}, buffers), (x,))
        return loss_fn(out, y)

    per_row = vmap(grad(row_loss), in_dims=(None, 0, 0))
    x = inputs[: n_rows * mini_batch].reshape(n_rows, mini_batch, *inputs.shape[1:])
    y = targets[: n_rows * mini_batch].reshape(n_rows, mini_batch)
    G = torch.empty(n_rows, layout.numel, device=device, dtype=torch.float32)
    starts = range(0, n_rows, chunk_size)
    for s in tqdm(starts, desc="gradients", leave=False, disable=not progress):
        xs, ys = x[s:s + chunk_size].to(device), y[s:s + chunk_size].to(device)
        grads = per_row(prunable, xs, ys)
        G[s:s + xs.shape[0]] = torch.cat([grads[k].reshape(xs.shape[0], -1) for k in layout.names], dim=1)
    model.train(was_training)
    return G


def split_blocks(G: torch.Tensor, layout: ParamLayout, block_size: int | None,
                 indices: torch.Tensor) -> GradientMatrix:
    blocks = layout.blocks(block_size)
    return GradientMatrix(blocks, [G[:, sl].contiguous() for sl in blocks], indices)
