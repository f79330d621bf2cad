"""G as a linear operator: what a solver may ask of the gradient matrix, and three operators.

`GradientOperator` is the whole contract between G and the solvers (`pruning.sparse_regression`,
the Fisher/OBS methods): a solver asks for products, column subsets, a cast, and the memory it
may spend on a dense copy of columns, and never looks at how the operator stores G.

* `GradientMatrix`: G (N x p) as column blocks, in memory or read from a `BlockStore` on disk.
* `DenseOperator`: a dense (N, n) tensor (the columns of an active set, and tests).
* `ColumnView`: columns idx of another operator without copying them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from pruning.gradients.storage import BlockStore, owners_by_size
from pruning.layout import ParamLayout

RESIDENT_MB = 2048  # stream mode: largest dense copy of G's columns a solver keeps (lr/swap active sets)
COLUMN_CHUNK = 16384  # columns per chunk when columns are handed out piecewise


@runtime_checkable
class GradientOperator(Protocol):
    """What a solver may ask of G (N rows, p columns).

    Products: `matvec(w)` = G w (length N) and `rmatvec(r)` = G^T r (length p), in `dtype` on
    `device`. `to(device, dtype)` returns the same operator in another precision or on another
    device (for G on disk, a lazy cast: blocks are cast as they are read).

    Column subsets (idx: a sorted, CPU, int64 tensor of column numbers):
      `column_chunks(idx, chunk)`  (positions in idx, dense G[:, idx[positions]]) chunk by chunk,
                                   positions in consecutive ranges; never more than one chunk of
                                   columns resident; the tensors are read-only
      `dense_columns(idx, dtype)`  one dense (N, len(idx)) copy of those columns
      `restrict(idx)`              those columns as an operator: a dense copy when it is small
                                   enough, else a no-copy view
    `max_resident_bytes` is the largest dense copy of columns a solver may keep (None: no bound;
    a G streamed from disk sets one, `calibration.resident_mb`).
    """

    @property
    def num_rows(self) -> int: ...

    @property
    def num_cols(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def max_resident_bytes(self) -> int | None: ...

    def matvec(self, w: torch.Tensor) -> torch.Tensor: ...

    def rmatvec(self, r: torch.Tensor) -> torch.Tensor: ...

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> GradientOperator: ...

    def column_chunks(self, idx: torch.Tensor,
                      chunk: int = COLUMN_CHUNK) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def dense_columns(self, idx: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor: ...

    def restrict(self, idx: torch.Tensor, max_fraction: float = 0.5) -> GradientOperator: ...


class ColumnSubsets:
    """`dense_columns` and `restrict` of the protocol, built on an operator's `column_chunks`."""

    def dense_columns(self: GradientOperator, idx: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense (N, len(idx)) copy of the columns idx (sorted ascending)."""
        out: torch.Tensor | None = None  # filled chunk by chunk: one copy of the columns, never two
        for pos, cols in self.column_chunks(idx):
            if out is None:
                out = torch.empty(self.num_rows, idx.numel(), dtype=dtype or cols.dtype, device=cols.device)
            out[:, int(pos[0]):int(pos[-1]) + 1] = cols  # positions come as consecutive ranges
        if out is None:
            return torch.zeros(self.num_rows, 0, dtype=dtype or self.dtype)
        return out

    def restrict(self: GradientOperator, idx: torch.Tensor, max_fraction: float = 0.5) -> GradientOperator:
        """The columns idx as an operator: a dense copy when they are at most `max_fraction` of the
        columns (products then cost O(N |idx|)) and the copy fits `max_resident_bytes`, else a
        no-copy view."""
        if idx.numel() == self.num_cols:
            return self
        budget = self.max_resident_bytes
        nbytes = self.num_rows * idx.numel() * self.dtype.itemsize
        if idx.numel() <= max_fraction * self.num_cols and (budget is None or nbytes <= budget):
            return DenseOperator(self.dense_columns(idx))
        return ColumnView(self, idx)


class DenseOperator(ColumnSubsets):
    """A dense (N, n) matrix as an operator (the columns of an active set, and tests)."""

    max_resident_bytes: int | None = None

    def __init__(self, A: torch.Tensor):
        self.A = A

    @property
    def num_rows(self) -> int:
        return self.A.shape[0]

    @property
    def num_cols(self) -> int:
        return self.A.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def device(self) -> torch.device:
        return self.A.device

    def matvec(self, w: torch.Tensor) -> torch.Tensor:
        return self.A @ w.to(self.A.dtype)

    def rmatvec(self, r: torch.Tensor) -> torch.Tensor:
        return self.A.T @ r.to(self.A.dtype)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DenseOperator:
        return DenseOperator(self.A.to(device=device, dtype=dtype or self.A.dtype))

    def column_chunks(self, idx: torch.Tensor,
                      chunk: int = COLUMN_CHUNK) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = idx.to("cpu")
        for s in range(0, idx.numel(), chunk):
            pos = torch.arange(s, min(s + chunk, idx.numel()))
            yield pos, self.A[:, idx[pos].to(self.A.device)]


class ColumnView(ColumnSubsets):
    """Columns `idx` of an operator without copying them (O(N p) per product, no extra memory)."""

    def __init__(self, op: GradientOperator, idx: torch.Tensor):
        self.op, self.idx = op, idx

    @property
    def num_rows(self) -> int:
        return self.op.num_rows

    @property
    def num_cols(self) -> int:
        return int(self.idx.numel())

    @property
    def dtype(self) -> torch.dtype:
        return self.op.dtype

    @property
    def device(self) -> torch.device:
        return self.op.device

    @property
    def max_resident_bytes(self) -> int | None:
        return self.op.max_resident_bytes

    def matvec(self, w: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(self.op.num_cols, dtype=w.dtype, device=w.device)
        full[self.idx] = w
        return self.op.matvec(full)

    def rmatvec(self, r: torch.Tensor) -> torch.Tensor:
        return self.op.rmatvec(r)[self.idx]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ColumnView:
        return ColumnView(self.op.to(device, dtype), self.idx)

    def column_chunks(self, idx: torch.Tensor,
                      chunk: int = COLUMN_CHUNK) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from self.op.column_chunks(self.idx.to("cpu")[idx.to("cpu")], chunk)


@dataclass
class GradientMatrix(ColumnSubsets):
    """G (N x p) held as column blocks (`ParamLayout.blocks`); a `GradientOperator`.

    In memory, `data[b]` is the (N, len(blocks[b])) slice of G for `blocks[b]` (a tensor on G's
    device). Backed by a `BlockStore` (`on_disk`), G lives on disk and `data` is empty: `block(b)`,
    `columns`, `rows`, `matvec` and `rmatvec` read what they need and cast it to `dtype` on
    `device` (`lazy_dtype`, `lazy_device`; `to()` only changes these), so every read is a fresh
    tensor the caller owns. `key` is the cache key of the noise-free G (None when it was not
    computed through the cache). `max_resident_bytes` bounds dense copies of columns that
    solvers may keep (None: no bound). `entry` is the directory of G's cache entry when G is
    exactly what that entry holds (None otherwise, e.g. after gradient-row noise):
    `pruning.factor_cache` keeps G's factorisations under it. `nonfinite` counts G's NaN/inf
    entries when they were counted as G was written or read (None: not counted).
    """

    blocks: list[slice]
    data: list[torch.Tensor]     # in memory: data[b] has shape (N, blocks[b].stop - blocks[b].start)
    indices: torch.Tensor        # dataset indices used, shape (N, m)
    key: str | None = None
    store: BlockStore | None = None
    lazy_dtype: torch.dtype | None = None
    lazy_device: torch.device | None = None
    max_resident_bytes: int | None = None
    entry: Path | None = None
    nonfinite: int | None = None

    def __post_init__(self) -> None:
        self._owners = owners_by_size(self.store.sizes, self.blocks) if self.store is not None else None

    @classmethod
    def from_store(cls, store: BlockStore, blocks: list[slice], indices: torch.Tensor, *, key: str | None = None,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   max_resident_bytes: int | None = RESIDENT_MB << 20) -> GradientMatrix:
        """G read from `store` on demand, cut into `blocks`."""
        return cls(blocks, [], indices, key=key, store=store, lazy_dtype=dtype, lazy_device=torch.device(device),
                   max_resident_bytes=max_resident_bytes, nonfinite=store.nonfinite)

    @property
    def on_disk(self) -> bool:
        """True when G lives in a `BlockStore`: reads are fresh tensors, nothing stays resident."""
        return self.store is not None

    @property
    def num_rows(self) -> int:
        return self.store.n_rows if self.store is not None else self.data[0].shape[0]

    @property
    def num_cols(self) -> int:
        return self.blocks[-1].stop

    @property
    def dtype(self) -> torch.dtype:
        return self.lazy_dtype if self.store is not None else self.data[0].dtype

    @property
    def device(self) -> torch.device:
        return self.lazy_device if self.store is not None else self.data[0].device

    def _read(self, t: int, lo: int, hi: int, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        arr = torch.from_numpy(self.store.read(t, lo, hi, r0, r1))
        return arr.to(device=self.device, dtype=self.dtype)

    def block(self, b: int) -> torch.Tensor:
        """Columns of block b, (N, len(blocks[b])): the tensor itself in memory, a fresh read from disk."""
        if self.store is None:
            return self.data[b]
        return self._read(*self._owners[b])

    def dense(self) -> torch.Tensor:
        """The full N x p matrix (small models and tests only)."""
        return torch.cat([self.block(b) for b in range(len(self.blocks))], dim=1)

    def matvec(self, w: torch.Tensor) -> torch.Tensor:
        """G w (length N); one block at a time."""
        out = torch.zeros(self.num_rows, dtype=self.dtype, device=self.device)
        for b, sl in enumerate(self.blocks):
            gb = self.block(b)
            out += gb @ w[sl].to(device=gb.device, dtype=gb.dtype)
            del gb
        return out

    def rmatvec(self, r: torch.Tensor) -> torch.Tensor:
        """G^T r (length p); one block at a time, into one preallocated vector."""
        out = torch.empty(self.num_cols, dtype=self.dtype, device=self.device)
        r = r.to(device=self.device, dtype=self.dtype)
        for b, sl in enumerate(self.blocks):
            gb = self.block(b)
            torch.matmul(gb.T, r, out=out[sl])
            del gb
        return out

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> GradientMatrix:
        if self.store is not None:  # lazy: blocks are cast and moved as they are read
            return replace(self, lazy_device=torch.device(device), lazy_dtype=dtype or self.dtype)
        return replace(self, data=[d.to(device=device, dtype=dtype or d.dtype) for d in self.data])

    def columns(self, sl: slice) -> torch.Tensor:
        """Columns `sl` of G as an (N, len) tensor (in memory: a view when `sl` lies inside one block)."""
        parts = []
        for b, bsl in enumerate(self.blocks):
            lo, hi = max(sl.start, bsl.start), min(sl.stop, bsl.stop)
            if lo < hi:
                if self.store is None:
                    parts.append(self.data[b][:, lo - bsl.start:hi - bsl.start])
                else:
                    t, blo, _ = self._owners[b]
                    parts.append(self._read(t, blo + lo - bsl.start, blo + hi - bsl.start))
        if not parts:
            raise ValueError(f"columns {sl} are outside G's {self.num_cols} columns")
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of G as a dense (stop - start, p) tensor."""
        if self.store is None:
            return torch.cat([gb[start:stop] for gb in self.data], dim=1)
        return torch.cat([self._read(t, lo, hi, start, stop) for t, lo, hi in self._owners], dim=1)

    def column_chunks(self, idx: torch.Tensor,
                      chunk: int = COLUMN_CHUNK) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Chunks never cross a block; on disk only the spanned columns of a chunk are read."""
        idx = idx.to("cpu")
        starts = torch.tensor([sl.start for sl in self.blocks] + [self.num_cols])
        edges = torch.searchsorted(idx, starts)
        for b, sl in enumerate(self.blocks):
            lo, hi = int(edges[b]), int(edges[b + 1])
            whole = self.store is None and hi - lo == sl.stop - sl.start and hi - lo <= chunk
            if whole and self.data[b].is_contiguous():  # the same values and layout a gather gives
                yield torch.arange(lo, hi), self.data[b]
                continue
            for s in range(lo, hi, chunk):
                pos = torch.arange(s, min(s + chunk, hi))
                if self.store is not None:
                    first, last = int(idx[pos[0]]), int(idx[pos[-1]])
                    span = self.columns(slice(first, last + 1))
                    yield pos, span[:, (idx[pos] - first).to(span.device)]
                    continue
                gb = self.data[b]
                yield pos, gb[:, (idx[pos] - sl.start).to(gb.device)]


def split_blocks(G: torch.Tensor, layout: ParamLayout, block_size: int | None,
                 indices: torch.Tensor) -> GradientMatrix:
    """A dense G cut into the column blocks of `layout.blocks(block_size)` (copies)."""
    blocks = layout.blocks(block_size)
    return GradientMatrix(blocks, [G[:, sl].contiguous() for sl in blocks], indices)
