"""The calibration examples behind the rows of G, loaded a chunk of rows at a time.

Row i of G averages the loss gradient over m examples (`indices[i]`, algorithms.md section 1). The
reference settings make N x m large (WoodFisher on ResNet-50: N = 400, m = 400, i.e. 160,000
ImageNet images, ~96 GB as float32 tensors), so the gradient builder never asks for all of them:
it asks a `RowSource` for rows s:e and gets (e - s, m, ...) inputs and (e - s, m) labels.

* `TensorRows`: rows cut from tensors already in memory (small data, tests, benchmarks).
* `DatasetRows`: rows read from a dataset in order through a DataLoader (optionally with worker
  processes), `block_rows` rows per read; at most one block of examples is held at a time. A
  `prepare(x, y, block)` hook may transform each block (the noise model's calibration-input
  hook, e.g. adversarial examples); it is called with the block's number, so its random draws
  can be seeded per block and G does not depend on `chunk_size` or on how many passes a
  streamed build makes.

Both give a `fingerprint()` for the gradient cache key: the tensors' hash, or the caller's data
key plus a hash of the first row's clean examples (cheap, and it catches a changed dataset).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Subset

PrepareFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
BLOCK_EXAMPLES = 256  # DatasetRows default: examples per read (and per noise draw)


def tensor_hash(*tensors: torch.Tensor) -> str:
    """sha256 over dtype, shape and raw bytes of the tensors."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


class RowSource(Protocol):
    """What the gradient builder reads: N rows of m examples each."""

    num_rows: int
    mini_batch: int

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (stop - start, m, ...) and labels (stop - start, m) of rows start:stop."""
        ...

    def fingerprint(self) -> Any:
        """What identifies these examples in the gradient cache key."""
        ...


class TensorRows:
    """Rows i = examples i*m .. (i+1)*m - 1 of in-memory `inputs` / `targets` (a tail that cannot
    fill a row is dropped)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, mini_batch: int = 1):
        if mini_batch <= 0:
            raise ValueError(f"mini_batch={mini_batch} must be positive")
        self.mini_batch = int(mini_batch)
        self.num_rows = inputs.shape[0] // self.mini_batch
        if self.num_rows == 0:
            raise ValueError(f"{inputs.shape[0]} examples cannot fill one mini-batch of {mini_batch}")
        n = self.num_rows * self.mini_batch
        self.inputs = inputs[:n].reshape(self.num_rows, self.mini_batch, *inputs.shape[1:])
        self.targets = targets[:n].reshape(self.num_rows, self.mini_batch)

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[start:stop], self.targets[start:stop]

    def fingerprint(self) -> Any:
        return {"inputs": tensor_hash(self.inputs), "targets": tensor_hash(self.targets)}


class DatasetRows:
    """Rows of `dataset` examples `indices` (N, m), read in order, `block_rows` rows at a time.

    `prepare(x, y, block)` (on `device`) may replace the inputs of block number `block` (rows
    block*block_rows .. +block_rows). Reads go forward through one DataLoader iterator; asking
    for an earlier block (a second pass) starts a new one. With `num_workers` > 0 each worker
    decodes whole blocks and the loader prefetches up to 2 x num_workers of them (its default
    prefetch factor), which bounds the examples in flight. `key` identifies the dataset and
    whatever `prepare` does in the cache key.
    """

    def __init__(self, dataset: Dataset, indices: torch.Tensor, *, key: Any, prepare: PrepareFn | None = None,
                 device: torch.device | str = "cpu", block_rows: int | None = None, num_workers: int = 0):
        if indices.dim() != 2 or indices.shape[0] == 0 or indices.shape[1] == 0:
            raise ValueError(f"indices must have shape (N, m) with N, m > 0, got {tuple(indices.shape)}")
        self.dataset, self.indices, self.key = dataset, indices.long().cpu(), key
        self.num_rows, self.mini_batch = int(indices.shape[0]), int(indices.shape[1])
        self.block_rows = int(block_rows or max(1, BLOCK_EXAMPLES // self.mini_batch))
        if self.block_rows <= 0:
            raise ValueError(f"block_rows={block_rows} must be positive")
        self.prepare, self.device, self.num_workers = prepare, torch.device(device), int(num_workers)
        self._it: Iterator[Any] | None = None
        self._next = 0  # number of the block the iterator yields next
        self._cached: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self.blocks_read = 0  # reads so far (a test and progress aid)

    def _loader(self, first_block: int) -> Iterator[Any]:
        ids = self.indices[first_block * self.block_rows:].reshape(-1).tolist()
        return iter(DataLoader(Subset(self.dataset, ids), batch_size=self.block_rows * self.mini_batch,
                               shuffle=False, num_workers=self.num_workers))

    def block(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (rows, m, ...) and labels (rows, m) of block b, prepared."""
        if self._cached is not None and self._cached[0] == b:
            return self._cached[1], self._cached[2]
        if self._it is None or b < self._next:
            self._it, self._next = self._loader(b), b
        self._cached = None  # drop the previous block before reading the next one
        while True:
            x, y = next(self._it)
            self._next += 1
            if self._next - 1 == b:
                break
        x, y = x.to(self.device), y.to(self.device)
        if self.prepare is not None:
            x = self.prepare(x, y, b)
        rows = y.shape[0] // self.mini_batch
        x, y = x.reshape(rows, self.mini_batch, *x.shape[1:]), y.reshape(rows, self.mini_batch)
        self.blocks_read += 1
        self._cached = (b, x, y)
        return x, y

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        stop = min(stop, self.num_rows)
        xs, ys = [], []
        for b in range(start // self.block_rows, (stop - 1) // self.block_rows + 1):
            x, y = self.block(b)
            lo = max(start - b * self.block_rows, 0)
            hi = min(stop - b * self.block_rows, x.shape[0])
            xs.append(x[lo:hi])
            ys.append(y[lo:hi])
        if len(xs) == 1:
            return xs[0], ys[0]
        return torch.cat(xs), torch.cat(ys)

    def close(self) -> None:
        """Drop the iterator (its worker processes) and the held block."""
        self._it, self._cached, self._next = None, None, 0

    def fingerprint(self) -> Any:
        first = [self.dataset[int(i)] for i in self.indices[0]]
        x = torch.stack([torch.as_tensor(f[0]) for f in first])
        y = torch.as_tensor([int(f[1]) for f in first])
        return {"key": self.key, "num_rows": self.num_rows, "mini_batch": self.mini_batch,
                "first_row": tensor_hash(x, y)}
