"""The gradient matrix G of the Fisher/OBS family (algorithms.md section 1).

Row i is g_i = grad_w of the mean loss over a "fisher mini-batch" B_i of m examples, over the
prunable weights only, at the current weights, with the model in eval mode (BatchNorm uses its
running statistics, dropout is off, rows are independent). Rows are computed with torch.func
(vmap of grad of functional_call) over `chunk_size` rows at a time, never with a Python loop over
samples. With m > 1 the vmap runs over the N groups and each row is one ordinary mini-batch mean
(optionally accumulated over sub-batches of `calibration.sub_batch` examples). The examples come
from a `RowSource` (`pruning.calibration`), read chunk by chunk: the N x m calibration inputs are
never all in memory.

Storage and the memory bound
----------------------------
G is held as column blocks (`ParamLayout.blocks(B)`: one per prunable tensor, tensors larger than
B cut into chunks of at most B) in a `GradientMatrix`; no dense N x p matrix is ever formed by the
builder. Two modes (`calibration.stream`):

* ``stream: false`` (default, in memory): one pass over the data differentiates w.r.t. all
  prunable tensors; each chunk's rows are written straight into the per-block tensors. Peak
  memory: G itself (N p floats, in blocks) + one chunk of rows (chunk_size x p).
* ``stream: true`` (large models): ONE pass over the data (vmap over all prunable tensors), each
  chunk of rows written with positioned writes into per-tensor (N, p_t) ``.npy`` files on disk
  (a `BlockStore`). Rows per vmap call are capped so that one chunk of rows takes at most
  `stream_chunk_mb` (default 1024 MiB: 10 rows for ResNet-50). The returned matrix is backed by
  the store: every consumer (matvec, rmatvec, columns, rows, blocks) reads what it needs with
  explicit reads into fresh tensors and drops them, so no page of G stays resident (touched pages
  of a memory map would count in the resident set). Peak process memory: one chunk of rows +
  activations while building; one block (N x B_b) while consuming. G itself lives on disk and in
  the reclaimable page cache. `stream_cols` (an integer) restores the older multi-pass variant
  (one pass per group of at most that many columns), which bounds the chunk to
  chunk_size x stream_cols floats at the price of one pass per group. Files live in the cache
  when ``calibration.cache`` is on, else in a scratch directory that is unlinked at once (the
  store keeps its files open, so they stay readable until the matrix is dropped). Blocks are
  cast to the matrix's dtype and moved to its device (the model's) as they are read, so a GPU
  run streams blocks host -> device and never holds G on the GPU.

Disk cache
----------
`build_gradient_matrix` caches G under ``<cache_dir>/<key>/`` (one ``.npy`` per prunable tensor,
the sampled indices, and ``meta.json``). The key hashes everything that changes G before the
row noise: the layout, every parameter and buffer of the model as it is while G is computed
(so weight noise applied by the noise model's ``calibration_weights`` hook is covered), the
calibration data's fingerprint (`pruning.calibration`: for tensors, a hash of the inputs after
``calibration_inputs`` noise and of the labels; for rows read from a dataset, the caller's data
key, which names the input noise and its seed, and a hash of the first row), the sampled indices, N, m,
the run seed, the loss and optionally a noise-model key. The cached files do not depend on the
block size or the mode, so every method of a comparison (and both modes) shares one entry.
Gradient-row noise (the ``gradients`` hook) is applied after the cache (`apply_row_noise`).

Integrity: ``meta.json`` holds the sha256 of every tensor file's data bytes and of
``indices.npy`` (`CACHE_VERSION` 2). The tensor digests are computed while the rows are written
(rows of a tensor arrive in order, so no extra pass); an entry is verified when it is opened, one
sequential read of each file (the same bytes an in-memory load reads anyway; in stream mode one
extra read of G at the disk's speed, a few seconds per GB on one core), and its row count and
stored indices must equal the requested ones. A missing, short or garbled entry is a miss: it is
removed, G is recomputed and stored again, and `warn` (the run record's warnings) names it.
``indices.npy`` is read with ``allow_pickle=False``: no code runs from a cache file.
Block factorisations of G (`pruning.factor_cache`) live in ``<entry>/factors/`` and go with it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from pruning.calibration import RowSource, TensorRows, tensor_hash
from pruning.errors import ConfigError, flag, megabytes
from pruning.layout import ParamLayout
from pruning.record import sha256_file

CACHE_VERSION = 2  # 2: sha256 of every file in meta.json, checked when an entry is opened
STREAM_COLS = 1 << 20  # columns per pass of the multi-pass stream variant (stream_cols=STREAM_COLS)
STREAM_CHUNK_MB = 1024  # stream mode: at most this many MiB of gradient rows per vmap call
RESIDENT_MB = 2048  # stream mode: largest dense copy of G's columns a solver keeps (lr/swap active sets)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_IO_MAX = 1 << 30  # bytes per positioned read/write call (Linux caps one call near 2 GiB)
_HASH_CHUNK = 16 << 20  # bytes per read while verifying a stored tensor
INDICES_FILE = "indices.npy"


class CorruptCache(ValueError):
    """A gradient cache entry that exists but fails its checks (digest, size, rows, indices)."""


def _tensor_file(t: int) -> str:
    return f"tensor{t:04d}.npy"


class BlockStore:
    """G on disk: one row-major (N, p_t) float32 ``.npy`` file per prunable tensor.

    Rows s:e of a tensor are one contiguous byte range, so a chunk of rows is one positioned write
    per tensor; a block (columns lo:hi of a tensor, all rows) is one read when it spans the tensor,
    else one read per row. Nothing is memory-mapped: a read copies exactly what was asked for into
    a fresh array that the caller drops, so the process never keeps pages of G resident. The files
    stay open, so a store outlives the unlinking of its directory (scratch stores).
    """

    def __init__(self, root: Path, sizes: tuple[int, ...], n_rows: int, files: list[Any], offsets: list[int]):
        self.root, self.sizes, self.n_rows = Path(root), tuple(int(v) for v in sizes), int(n_rows)
        self.files, self.offsets = files, offsets
        # running sha256 of each tensor's rows while they are written in order (None: out of order)
        self._hashers: list[Any] = [hashlib.sha256() for _ in self.sizes]
        self._hashed_rows = [0] * len(self.sizes)

    @classmethod
    def create(cls, root: str | Path, sizes: tuple[int, ...], n_rows: int, digest: bool = True) -> BlockStore:
        """Empty (sparse) files of the right shape under `root`, opened for writing; digest=True
        keeps a sha256 of each tensor's rows as they are written (for a cache entry's meta.json)."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        files, offsets = [], []
        for t, size in enumerate(sizes):
            f = open(root / _tensor_file(t), "w+b")  # noqa: SIM115 (kept open with the store)
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                    "shape": (int(n_rows), int(size))})
            offsets.append(f.tell())
            f.truncate(f.tell() + int(n_rows) * int(size) * 4)
            files.append(f)
        store = cls(root, tuple(sizes), n_rows, files, offsets)
        if not digest:  # scratch stores: no hashing cost
            store._hashers = [None] * len(store.sizes)
        return store

    @classmethod
    def open(cls, root: str | Path, sizes: tuple[int, ...]) -> BlockStore:
        """The files written by `create` (or `save_gradient_matrix`), checked against `sizes`."""
        root = Path(root)
        files, offsets, n_rows = [], [], None
        try:
            for t, size in enumerate(sizes):
                f = open(root / _tensor_file(t), "rb")  # noqa: SIM115
                files.append(f)
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)
                n_rows = shape[0] if n_rows is None else n_rows
                if len(shape) != 2 or shape != (n_rows, size) or fortran or dtype != np.float32:
                    raise ValueError(f"stored gradients {root / _tensor_file(t)} have shape {shape} and dtype "
                                     f"{dtype}, expected ({n_rows}, {size}) float32")
                offsets.append(f.tell())
                if os.fstat(f.fileno()).st_size < f.tell() + shape[0] * size * 4:
                    raise ValueError(f"stored gradients {root / _tensor_file(t)} are truncated")
        except BaseException:
            for f in files:
                f.close()
            raise
        store = cls(root, tuple(sizes), n_rows or 0, files, offsets)
        store._hashers = [None] * len(store.sizes)  # opened, not written: `digests` reads the files
        return store

    def close(self) -> None:
        for f in self.files:
            f.close()

    def write_rows(self, t: int, start: int, rows: np.ndarray) -> None:
        """Rows start:start+len(rows) of tensor t (rows: (n, p_t) float32)."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.sizes[t] or start + rows.shape[0] > self.n_rows:
            raise ValueError(f"rows of shape {rows.shape} at {start} do not fit tensor {t} "
                             f"({self.n_rows}, {self.sizes[t]})")
        buf = memoryview(rows).cast("B")
        pos, fd = self.offsets[t] + start * self.sizes[t] * 4, self.files[t].fileno()
        done = 0
        while done < len(buf):
            done += os.pwrite(fd, buf[done:done + _IO_MAX], pos + done)
        if self._hashers[t] is not None and start == self._hashed_rows[t]:
            self._hashers[t].update(buf)
            self._hashed_rows[t] += rows.shape[0]
        else:  # rewritten or out of order: `digests` reads the file back instead
            self._hashers[t] = None

    def _sha256(self, t: int) -> str:
        """sha256 of tensor t's data bytes, read back from the file."""
        h, fd = hashlib.sha256(), self.files[t].fileno()
        pos, left = self.offsets[t], self.n_rows * self.sizes[t] * 4
        while left > 0:
            piece = os.pread(fd, min(_HASH_CHUNK, left), pos)
            if not piece:
                raise OSError(errno.EIO, f"{self.root / _tensor_file(t)} ends {left} bytes early")
            h.update(piece)
            pos, left = pos + len(piece), left - len(piece)
        return h.hexdigest()

    def digests(self) -> dict[str, str]:
        """{file name: sha256 of its data bytes}: from the hashes kept while the rows were written
        in order (no extra pass), else read back."""
        out = {}
        for t in range(len(self.sizes)):
            done = self._hashers[t] is not None and self._hashed_rows[t] == self.n_rows
            out[_tensor_file(t)] = self._hashers[t].hexdigest() if done else self._sha256(t)
        return out

    def verify(self, digests: Mapping[str, str]) -> str | None:
        """None when every tensor file matches `digests`, else what is wrong. One read of each file,
        several files at once (hashlib releases the GIL), so it runs at disk or hashing speed."""
        names = [_tensor_file(t) for t in range(len(self.sizes))]
        missing = [n for n in names if n not in digests]
        if missing:
            return f"{self.root / missing[0]} has no digest in meta.json"
        with ThreadPoolExecutor(max_workers=max(1, min(len(names), os.cpu_count() or 1, 8))) as pool:
            have = list(pool.map(self._sha256, range(len(names))))
        bad = [n for n, h in zip(names, have) if h != digests[n]]
        return f"{self.root / bad[0]} does not match its sha256 in meta.json" if bad else None

    def _read_into(self, t: int, out: np.ndarray, pos: int) -> None:
        buf = memoryview(out).cast("B")
        fd, done = self.files[t].fileno(), 0
        while done < len(buf):
            n = os.preadv(fd, [buf[done:done + _IO_MAX]], pos + done)
            if n <= 0:
                raise OSError(f"unexpected end of {self.root / _tensor_file(t)}")
            done += n

    def read(self, t: int, lo: int = 0, hi: int | None = None, r0: int = 0, r1: int | None = None) -> np.ndarray:
        """A fresh (r1 - r0, hi - lo) float32 copy of rows r0:r1, columns lo:hi of tensor t."""
        size = self.sizes[t]
        hi = size if hi is None else hi
        r1 = self.n_rows if r1 is None else r1
        out = np.empty((r1 - r0, hi - lo), dtype=np.float32)
        base = self.offsets[t]
        if lo == 0 and hi == size:
            self._read_into(t, out, base + r0 * size * 4)
        else:
            for i in range(r1 - r0):
                self._read_into(t, out[i], base + ((r0 + i) * size + lo) * 4)
        return out

    def views(self) -> list[np.ndarray]:
        """Lazy copy-on-write memory maps of the files (compatibility views; touching their pages
        makes them resident, so the hot paths use `read`)."""
        return [np.memmap(f, dtype=np.float32, mode="c", offset=off, shape=(self.n_rows, size))
                for f, off, size in zip(self.files, self.offsets, self.sizes)]


def release_heap() -> None:
    """Hand freed heap memory back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    The vmap pass frees gigabytes of activations and gradient rows in pieces that glibc keeps in
    its arenas; without this they stay in the resident set of a process that no longer uses them.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _owners_by_size(sizes: tuple[int, ...], blocks: list[slice]) -> list[tuple[int, int, int]]:
    """For each block: (tensor index, local start, local stop) inside that tensor."""
    starts = np.cumsum((0,) + tuple(sizes))
    out = []
    for sl in blocks:
        t = int(np.searchsorted(starts, sl.start, side="right")) - 1
        if t < 0 or t >= len(sizes) or sl.stop > starts[t + 1]:
            raise ValueError(f"block {sl} crosses a tensor boundary of the stored gradients")
        out.append((t, sl.start - int(starts[t]), sl.stop - int(starts[t])))
    return out


@dataclass
class GradientMatrix:
    """G (N x p) held as column blocks; behaves as a linear operator for IHT-style solvers.

    In memory, `data[b]` is the (N, len(blocks[b])) slice of G for `blocks[b]` (a tensor on
    G's device). Backed by a `BlockStore` (stream mode, `mmap` true), G lives on disk: `block(b)`,
    `columns`, `rows`, `matvec` and `rmatvec` read what they need and cast it to `dtype` on
    `device` (`lazy_dtype`, `lazy_device`; `to()` only changes these), and `data` holds lazy
    memory-map views for compatibility only. `key` is the cache key of the noise-free G (None
    when it was not computed through the cache). `max_resident_bytes` bounds dense copies of
    columns that solvers may keep (None: no bound). `entry` is the directory of G's cache entry
    when G is exactly what that entry holds (None otherwise, e.g. after gradient-row noise):
    `pruning.factor_cache` keeps G's factorisations under it.
    """

    blocks: list[slice]
    data: list[torch.Tensor]     # data[b] has shape (N, blocks[b].stop - blocks[b].start)
    indices: torch.Tensor        # dataset indices used, shape (N, m)
    key: str | None = None
    mmap: bool = False
    store: BlockStore | None = None
    lazy_dtype: torch.dtype | None = None
    lazy_device: torch.device | None = None
    max_resident_bytes: int | None = None
    entry: Path | None = None

    def __post_init__(self) -> None:
        self._owners = _owners_by_size(self.store.sizes, self.blocks) if self.store is not None else None

    @classmethod
    def from_store(cls, store: BlockStore, blocks: list[slice], indices: torch.Tensor, *, key: str | None = None,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   max_resident_bytes: int | None = RESIDENT_MB << 20) -> GradientMatrix:
        views = store.views()
        owners = _owners_by_size(store.sizes, blocks)
        data = [torch.from_numpy(views[t][:, lo:hi]) for t, lo, hi in owners]
        return cls(blocks, data, indices, key=key, mmap=True, store=store, lazy_dtype=dtype,
                   lazy_device=torch.device(device), max_resident_bytes=max_resident_bytes)

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
        data = [d.to(device=device, dtype=dtype or d.dtype) for d in self.data]
        return replace(self, data=data, mmap=self.mmap and all(a is b for a, b in zip(data, self.data)))

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

    def iter_blocks(self, blocks: list[slice] | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
        """(slice, columns) for each of `blocks` (default: G's own), gathering across G's blocks;
        one block resident at a time when G is on disk."""
        for sl in blocks if blocks is not None else self.blocks:
            yield sl, self.columns(sl)


# --------------------------------------------------------------------------------- computation
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _batchnorm_affine(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode BatchNorm written as what it is: y = x * scale + shift, per channel."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    shape = (-1,) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.view(shape), x, scale.view(shape))


@contextmanager
def affine_batchnorm(model: nn.Module) -> Iterator[list[nn.Module]]:
    """While inside, every eval-mode BatchNorm of `model` (with running statistics) runs as its
    per-channel affine map; yields the patched modules.

    Why: under vmap, `batch_norm` is batched by folding the vmapped rows into the channel axis,
    so each layer runs a full normalisation over rows x channels (and its backward) where one
    multiply-add suffices. On ResNet-20 (N = 1000, 2 CPU threads) this cuts G's time by ~10-15%.
    The result equals eval-mode BatchNorm up to float rounding (~1e-7 relative). Only the exact
    torch classes are patched (a subclass may change forward), and only for this call: the
    instance attribute is removed on exit.
    """
    patched = []
    try:
        for m in model.modules():
            if type(m) in _BATCHNORMS and not m.training and m.running_mean is not None \
                    and m.running_var is not None and "forward" not in m.__dict__:
                m.forward = partial(_batchnorm_affine, m)
                patched.append(m)
        yield patched
    finally:
        for m in patched:
            del m.forward


def _row_gradients(
    model: nn.Module,
    layout: ParamLayout,
    source: RowSource,
    names: tuple[str, ...],
    sink: Callable[[int, int, dict[str, torch.Tensor]], None],
    *,
    chunk_size: int,
    loss_fn: LossFn,
    progress: bool,
    sub_batch: int | None = None,
    desc: str = "gradients",
) -> int:
    """Compute rows of G for the tensors `names`, `chunk_size` rows per vmap call, handing each
    chunk's gradients ({name: (rows, *shape)}) to `sink(start, stop, grads)`. Returns N.

    With `sub_batch` < m, a row's m examples go through the vmap `sub_batch` at a time and the
    row is the weighted sum of the parts' mean gradients (size/m each): the same mean-loss
    gradient, with at most chunk_size x sub_batch examples' activations alive at once.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    n_rows, m = source.num_rows, source.mini_batch
    step = m if sub_batch is None else int(sub_batch)
    if step <= 0:
        raise ValueError(f"sub_batch={sub_batch} must be positive (or None for the whole mini-batch)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.detach() for k, v in model.named_buffers()}
        diff = {k: params[k] for k in names}
        frozen = {k: v for k, v in params.items() if k not in diff}

        def row_loss(pr: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = functional_call(model, ({**frozen, **pr}, buffers), (x,))
            return loss_fn(out, y)

        per_row = vmap(grad(row_loss), in_dims=(None, 0, 0))
        with affine_batchnorm(model):
            for s in tqdm(range(0, n_rows, chunk_size), desc=desc, leave=False, disable=not progress):
                xs, ys = source.rows(s, min(s + chunk_size, n_rows))
                xs, ys = xs.to(device), ys.to(device)
                if step >= m:
                    sink(s, s + xs.shape[0], per_row(diff, xs, ys))
                    continue
                acc: dict[str, torch.Tensor] = {}
                for j in range(0, m, step):
                    part = per_row(diff, xs[:, j:j + step], ys[:, j:j + step])
                    w = min(step, m - j) / m
                    for k, v in part.items():
                        acc[k] = v.mul_(w) if k not in acc else acc[k].add_(v, alpha=w)
                sink(s, s + xs.shape[0], acc)
    finally:
        model.train(was_training)
    return n_rows


def as_rows(inputs: torch.Tensor | RowSource, targets: torch.Tensor | None, mini_batch: int) -> RowSource:
    """A RowSource for tensors (consecutive groups of `mini_batch` examples) or the source itself."""
    if isinstance(inputs, torch.Tensor):
        if targets is None:
            raise ValueError("targets are required with tensor inputs")
        return TensorRows(inputs, targets, mini_batch)
    if inputs.mini_batch != mini_batch:
        raise ValueError(f"the row source has mini_batch={inputs.mini_batch}, the calibration asks for {mini_batch}")
    return inputs


def compute_gradients(
    model: nn.Module,
    layout: ParamLayout,
    inputs: torch.Tensor | RowSource,
    targets: torch.Tensor | None = None,
    *,
    mini_batch: int = 1,
    chunk_size: int = 128,
    block_size: int | None = None,
    sub_batch: int | None = None,
    loss_fn: LossFn = F.cross_entropy,
    progress: bool = False,
) -> torch.Tensor:
    """Dense G of shape (N, p) for N = len(inputs) // mini_batch rows (small models and tests).

    Each row is the gradient of the mean loss over `mini_batch` consecutive examples. Computed
    with vmap over rows, `chunk_size` rows at a time; BatchNorm and dropout run in eval mode.
    `block_size` is accepted for backward compatibility and ignored (see `compute_gradient_matrix`).
    """
    device = next(model.parameters()).device
    source = as_rows(inputs, targets, mini_batch)
    G = torch.empty(source.num_rows, layout.numel, device=device, dtype=torch.float32)

    def sink(s: int, e: int, grads: dict[str, torch.Tensor]) -> None:
        G[s:e] = torch.cat([grads[k].reshape(e - s, -1) for k in layout.names], dim=1)

    _row_gradients(model, layout, source, layout.names, sink, chunk_size=chunk_size, sub_batch=sub_batch,
                   loss_fn=loss_fn, progress=progress)
    return G


def compute_gradient_matrix(
    model: nn.Module,
    layout: ParamLayout,
    inputs: torch.Tensor | RowSource,
    targets: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
    *,
    mini_batch: int = 1,
    chunk_size: int = 128,
    block_size: int | None = None,
    sub_batch: int | None = None,
    stream: bool = False,
    store_dir: str | Path | None = None,
    stream_cols: int | None = None,
    stream_chunk_mb: float = STREAM_CHUNK_MB,
    resident_mb: float | None = RESIDENT_MB,
    loss_fn: LossFn = F.cross_entropy,
    progress: bool = False,
    digest: bool = False,
) -> GradientMatrix:
    """G as column blocks, without ever holding a dense N x p matrix (see the module docstring).

    stream=False: one pass, rows written into per-block tensors on the model's device.
    stream=True: one pass (or, with `stream_cols`, one per group of consecutive tensors of at most
    that many columns) writing row chunks into a `BlockStore` under `store_dir` (a scratch
    directory next to the system temp files when None; it is unlinked at once, the open files
    stay readable). Rows per vmap call: min(chunk_size, stream_chunk_mb MiB / (4 x columns)).
    The returned matrix reads its blocks from disk onto the model's device, float32.
    `inputs` is a tensor (with `targets`) or a `RowSource` that loads rows chunk by chunk;
    `sub_batch` bounds the examples of one row per vmap call (see `_row_gradients`).
    """
    source = as_rows(inputs, targets, mini_batch)
    n_rows = source.num_rows
    if indices is None:
        indices = getattr(source, "indices", None)
        if indices is None:
            indices = torch.arange(n_rows * mini_batch).view(n_rows, mini_batch)
    kw = {"sub_batch": sub_batch, "loss_fn": loss_fn, "progress": progress}
    device = next(model.parameters()).device
    if not stream:
        blocks = layout.blocks(block_size)
        owners = _block_owners(layout, blocks)
        single = n_rows <= chunk_size  # one vmap call: its output becomes the storage, no copy
        data = [torch.empty(0)] * len(blocks) if single else [
            torch.empty(n_rows, sl.stop - sl.start, device=device, dtype=torch.float32) for sl in blocks]

        def sink(s: int, e: int, grads: dict[str, torch.Tensor]) -> None:
            flat = {k: grads[k].reshape(e - s, -1) for k in layout.names}
            for b, (name, lo, hi) in enumerate(owners):
                if single:
                    whole = hi - lo == flat[name].shape[1]
                    data[b] = flat[name].float() if whole else flat[name][:, lo:hi].float().contiguous()
                else:
                    data[b][s:e] = flat[name][:, lo:hi]

        _row_gradients(model, layout, source, layout.names, sink, chunk_size=chunk_size, **kw)
        return GradientMatrix(blocks, data, indices.cpu())

    if stream_chunk_mb is None or not stream_chunk_mb > 0:
        raise ValueError(f"stream_chunk_mb={stream_chunk_mb} must be a positive number of MiB")
    scratch = store_dir is None
    root = Path(tempfile.mkdtemp(prefix="grads-")) if scratch else Path(store_dir)
    try:
        store = BlockStore.create(root, layout.sizes, n_rows, digest=digest)  # digest: a cache entry
        groups = stream_groups(layout, stream_cols) if stream_cols else [list(range(len(layout.names)))]
        index = {name: t for t, name in enumerate(layout.names)}
        for gi, group in enumerate(groups):
            names = tuple(layout.names[t] for t in group)
            cols = sum(layout.sizes[t] for t in group)
            rows = max(1, min(chunk_size, int(stream_chunk_mb * 2**20) // (4 * max(cols, 1))))

            def sink(s: int, e: int, grads: dict[str, torch.Tensor], names: tuple[str, ...] = names) -> None:
                for name in names:
                    store.write_rows(index[name], s, grads[name].reshape(e - s, -1).detach().float().cpu().numpy())

            desc = "gradients (stream)" if len(groups) == 1 else f"gradients pass {gi + 1}/{len(groups)}"
            _row_gradients(model, layout, source, names, sink, chunk_size=rows, desc=desc, **kw)
            release_heap()
        return GradientMatrix.from_store(store, layout.blocks(block_size), indices.cpu(), device=device,
                                         max_resident_bytes=None if resident_mb is None else int(resident_mb * 2**20))
    finally:
        if scratch:
            shutil.rmtree(root, ignore_errors=True)


def stream_groups(layout: ParamLayout, max_cols: int = STREAM_COLS) -> list[list[int]]:
    """Consecutive tensors grouped into passes of at most `max_cols` columns (a larger tensor alone)."""
    groups: list[list[int]] = []
    cols = 0
    for t, size in enumerate(layout.sizes):
        if groups and cols + size <= max_cols:
            groups[-1].append(t)
            cols += size
        else:
            groups.append([t])
            cols = size
    return groups


def split_blocks(G: torch.Tensor, layout: ParamLayout, block_size: int | None,
                 indices: torch.Tensor) -> GradientMatrix:
    """A dense G cut into the column blocks of `layout.blocks(block_size)` (copies)."""
    blocks = layout.blocks(block_size)
    return GradientMatrix(blocks, [G[:, sl].contiguous() for sl in blocks], indices)


def _block_owners(layout: ParamLayout, blocks: list[slice]) -> list[tuple[str, int, int]]:
    """For each block: (tensor name, local start, local stop) inside that tensor's flat view."""
    out = []
    for sl in blocks:
        for name, tsl in zip(layout.names, layout.slices()):
            if tsl.start <= sl.start and sl.stop <= tsl.stop:
                out.append((name, sl.start - tsl.start, sl.stop - tsl.start))
                break
        else:
            raise ValueError(f"block {sl} crosses a tensor boundary of the layout")
    return out


# ---------------------------------------------------------------------------------- disk store
def _write_entry_files(tmp: Path, store: BlockStore, layout: ParamLayout, indices: torch.Tensor,
                       meta: Mapping[str, Any] | None) -> None:
    """indices.npy and meta.json (with the sha256 of every file) beside the tensor files of `store`."""
    np.save(tmp / INDICES_FILE, indices.cpu().numpy(), allow_pickle=False)
    digests = {**store.digests(), INDICES_FILE: sha256_file(tmp / INDICES_FILE)}
    info = {"version": CACHE_VERSION, "names": list(layout.names), "shapes": [list(s) for s in layout.shapes],
            "num_rows": store.n_rows, "digests": digests, **dict(meta or {})}
    (tmp / "meta.json").write_text(json.dumps(info, indent=1, sort_keys=True, default=str))


def save_gradient_matrix(G: GradientMatrix, layout: ParamLayout, path: str | Path,
                         meta: Mapping[str, Any] | None = None) -> Path:
    """Write G as one (N, p_t) ``.npy`` per prunable tensor plus indices and meta (with the sha256
    of every file), atomically.

    Holds at most one tensor's columns in extra memory. If `path` already exists (another job
    won the race) it is left as is.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        store = BlockStore.create(tmp, layout.sizes, G.num_rows)
        try:
            for t, tsl in enumerate(layout.slices()):
                store.write_rows(t, 0, G.columns(tsl).detach().float().cpu().contiguous().numpy())
            _write_entry_files(tmp, store, layout, G.indices, meta)
        finally:
            store.close()
        try:
            os.rename(tmp, path)
        except OSError:  # the destination exists: someone else cached the same G first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_gradient_matrix(path: str | Path, layout: ParamLayout, block_size: int | None = None, *,
                         mmap: bool = False, device: torch.device | str = "cpu",
                         resident_mb: float | None = RESIDENT_MB,
                         indices: torch.Tensor | None = None) -> GradientMatrix | None:
    """G from a store written by `save_gradient_matrix`, or None if absent or for another layout
    or cache version. mmap=True keeps G on disk (stream mode): blocks are read on demand onto `device`.

    Every file is checked against its sha256 in meta.json before use, and the rows and stored
    indices against `indices` (the requested ones) when given; an entry that fails raises
    `CorruptCache` naming the file and the problem.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise CorruptCache(f"{path / 'meta.json'} cannot be read ({type(exc).__name__})") from None
    if not isinstance(meta, dict):
        raise CorruptCache(f"{path / 'meta.json'} is not a JSON object")
    if (meta.get("version") != CACHE_VERSION or meta.get("names") != list(layout.names)
            or meta.get("shapes") != [list(s) for s in layout.shapes]):
        return None
    digests = meta.get("digests")
    if not isinstance(digests, dict):
        raise CorruptCache(f"{path / 'meta.json'} has no digests")
    try:
        if sha256_file(path / INDICES_FILE) != digests.get(INDICES_FILE):
            raise CorruptCache(f"{path / INDICES_FILE} does not match its sha256 in meta.json")
        try:
            stored = torch.from_numpy(np.load(path / INDICES_FILE, allow_pickle=False))
        except ValueError as exc:  # e.g. a pickled object array: never unpickled
            raise CorruptCache(f"{path / INDICES_FILE} cannot be read ({exc})") from None
        if indices is not None and (stored.shape != indices.shape or not torch.equal(stored, indices.cpu())):
            raise CorruptCache(f"{path / INDICES_FILE} holds indices of shape {tuple(stored.shape)} that differ "
                               f"from the requested {tuple(indices.shape)}")
        store = BlockStore.open(path, layout.sizes)
    except (OSError, ValueError) as exc:
        if isinstance(exc, CorruptCache):
            raise
        where = getattr(exc, "filename", None) or path
        raise CorruptCache(f"{where} cannot be read ({type(exc).__name__}: {exc})") from None
    try:
        if store.n_rows != meta.get("num_rows") or store.n_rows != stored.shape[0]:
            raise CorruptCache(f"{path} holds {store.n_rows} rows, its meta.json says {meta.get('num_rows')} "
                               f"and its indices {stored.shape[0]}")
        problem = store.verify(digests)
        if problem is not None:
            raise CorruptCache(problem)
    except BaseException as exc:
        store.close()
        if isinstance(exc, OSError):
            raise CorruptCache(f"{path} cannot be read ({exc})") from None
        raise
    blocks = layout.blocks(block_size)
    if mmap:
        return GradientMatrix.from_store(store, blocks, stored, key=meta.get("key"), device=device,
                                         max_resident_bytes=None if resident_mb is None else int(resident_mb * 2**20))
    try:
        data = [torch.from_numpy(store.read(t, lo, hi)).to(device)
                for t, lo, hi in _owners_by_size(store.sizes, blocks)]
    finally:
        store.close()
    return GradientMatrix(blocks, data, stored, key=meta.get("key"))


def _discard(path: Path) -> None:
    """Remove a bad cache entry (renamed first, so no reader sees it half removed)."""
    trash = path.parent / f".{path.name}.bad-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, trash)
    except OSError:  # already gone (another job discarded it)
        return
    shutil.rmtree(trash, ignore_errors=True)


# ------------------------------------------------------------------------------------- caching
def weights_hash(model: nn.Module) -> str:
    """sha256 over every parameter and buffer of the model (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor_hash(t).encode())
    return h.hexdigest()


def cache_key(model: nn.Module, layout: ParamLayout, source: RowSource, indices: torch.Tensor, *,
              seed: int | None = None, loss_fn: LossFn = F.cross_entropy, extra: Any = None) -> str:
    """Key of a gradient matrix: everything that changes G before the gradient-row noise."""
    parts = {
        "version": CACHE_VERSION,
        "names": list(layout.names),
        "shapes": [list(s) for s in layout.shapes],
        "weights": weights_hash(model),
        "data": source.fingerprint(),
        "indices": tensor_hash(indices),
        "num_rows": int(source.num_rows),
        "mini_batch": int(source.mini_batch),
        "seed": seed,
        "loss": getattr(loss_fn, "__module__", "") + "." + getattr(loss_fn, "__qualname__", repr(loss_fn)),
        "extra": extra,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def build_gradient_matrix(
    model: nn.Module,
    layout: ParamLayout,
    inputs: torch.Tensor | RowSource,
    targets: torch.Tensor | None,
    indices: torch.Tensor,
    calibration: Mapping[str, Any],
    *,
    cache_dir: str | Path | None = None,
    seed: int | None = None,
    key_extra: Any = None,
    loss_fn: LossFn = F.cross_entropy,
    progress: bool = False,
    warn: Callable[[str], None] | None = None,
) -> GradientMatrix:
    """G for one pruning step, through the disk cache when `calibration.cache` is on.

    `calibration` holds mini_batch, chunk_size, block_size, stream (default false), cache
    (default true) and, optionally for stream mode, stream_chunk_mb (MiB of gradient rows per
    vmap call, default STREAM_CHUNK_MB), stream_cols (null = one pass; an integer = one pass per
    group of at most that many columns) and resident_mb (largest dense copy of G's columns a
    solver keeps, default RESIDENT_MB; null = no bound) and sub_batch (examples of one row per
    vmap call when mini_batch is large; null = all m); `cache_dir` is the cache root (required
    for caching; stream mode also uses it for scratch files). `inputs` is a tensor (with
    `targets`) or a `RowSource` (`targets` None) whose rows are loaded chunk by chunk. Call it
    inside the noise model's `calibration_weights` context, with inputs that carry the
    calibration-input noise (a source's fingerprint must name it), so that the key covers them.
    A cache entry that fails its checks (`load_gradient_matrix`) is replaced by a recomputed G and
    reported through `warn(message)` (default: printed).
    """
    mini_batch = int(calibration.get("mini_batch", 1))
    chunk_size = int(calibration.get("chunk_size", 128))
    block_size = calibration.get("block_size")
    block_size = None if block_size is None else int(block_size)
    stream = flag(calibration.get("stream"), "calibration.stream", False)
    use_cache = flag(calibration.get("cache"), "calibration.cache", True) and cache_dir is not None
    device = next(model.parameters()).device
    resident_mb = megabytes(calibration.get("resident_mb", RESIDENT_MB), "calibration.resident_mb", allow_none=True)
    stream_cols = calibration.get("stream_cols")
    if stream_cols is not None and (isinstance(stream_cols, bool) or not isinstance(stream_cols, int)
                                    or stream_cols <= 0):
        raise ConfigError("calibration.stream_cols", stream_cols, "null (one pass) or a positive integer")
    sub_batch = calibration.get("sub_batch")
    if sub_batch is not None and (isinstance(sub_batch, bool) or not isinstance(sub_batch, int) or sub_batch <= 0):
        raise ConfigError("calibration.sub_batch", sub_batch, "null (the whole mini-batch) or a positive integer")
    source = as_rows(inputs, targets, mini_batch)
    kw = {"mini_batch": mini_batch, "chunk_size": chunk_size, "block_size": block_size, "sub_batch": sub_batch,
          "loss_fn": loss_fn, "progress": progress,
          "stream_chunk_mb": megabytes(calibration.get("stream_chunk_mb", STREAM_CHUNK_MB),
                                       "calibration.stream_chunk_mb"),
          "stream_cols": stream_cols, "resident_mb": resident_mb}
    if not use_cache:
        scratch = None
        if stream and cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=".scratch-", dir=cache_dir))
        try:
            return compute_gradient_matrix(model, layout, source, None, indices, stream=stream,
                                           store_dir=scratch, **kw)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
    key = cache_key(model, layout, source, indices, seed=seed, loss_fn=loss_fn, extra=key_extra)
    path = Path(cache_dir) / key
    try:
        hit = load_gradient_matrix(path, layout, block_size, mmap=stream, device=device, resident_mb=resident_mb,
                                   indices=indices)
    except CorruptCache as exc:
        (warn or _print_warning)(f"gradient cache entry not used: {exc}; recomputing G and replacing it")
        _discard(path)
        hit = None
    if hit is not None:
        hit.entry = path
        return hit
    meta = {"key": key, "mini_batch": mini_batch, "seed": seed, "extra": key_extra}
    if stream:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            G = compute_gradient_matrix(model, layout, source, None, indices, stream=True, store_dir=tmp,
                                        digest=True, **kw)
            _write_entry_files(tmp, G.store, layout, G.indices, meta)
            try:
                os.rename(tmp, path)
                G.store.root = path
                G.entry = path
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)  # our open files stay readable after the unlink
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        G.key = key
        return G
    G = compute_gradient_matrix(model, layout, source, None, indices, stream=False, **kw)
    save_gradient_matrix(G, layout, path, meta)
    G.key, G.entry = key, path
    return G


def _print_warning(message: str) -> None:
    print(f"warning: {message}", flush=True)


def noise_cache_key(noise: Any, stream_seed: int) -> Any:
    """The part of the cache key owed to the noise model's calibration-time hooks.

    Input noise is covered by hashing the inputs and in-place weight noise by hashing the weights;
    a model that overrides `calibration_weights` may perturb the forward pass some other way
    (hooks), so its parameters and the draw's seed join the key. None for every other model,
    so that e.g. all gradient-noise levels share one cached G.
    """
    from pruning.noise import NoiseModel

    if noise is None or type(noise).calibration_weights is NoiseModel.calibration_weights:
        return None
    return {"noise": noise.record(), "draw": int(stream_seed)}


def apply_row_noise(G: GradientMatrix, noise: Any, gen: torch.Generator,
                    chunk_rows: int | None = None) -> GradientMatrix:
    """Apply the noise model's gradient-row hook after the cache.

    A model with a block-aware `gradient_matrix(G, gen) -> GradientMatrix` hook gets G as is.
    Otherwise `gradients(rows, gen)` sees dense rows: all N rows at once in memory mode (the same
    draws as on a dense G); in stream mode (G on disk) chunks of `chunk_rows` rows, written
    to a fresh scratch store, so the memory bound holds (rows are independent in every row-noise
    model; the draws then differ from the in-memory mode).
    """
    from pruning.noise import NoiseModel

    if noise is None:
        return G
    if hasattr(noise, "gradient_matrix"):
        return replace(noise.gradient_matrix(G, gen), entry=None)  # G's cached factorisations do not apply
    if type(noise).gradients is NoiseModel.gradients:
        return G
    if not G.mmap:
        noisy = noise.gradients(G.dense(), gen)
        return replace(G, data=[noisy[:, sl].contiguous() for sl in G.blocks], entry=None)
    p, n = G.num_cols, G.num_rows
    step = chunk_rows or max(1, (1 << 24) // max(p, 1))
    root = Path(tempfile.mkdtemp(prefix="grads-noise-"))
    try:
        store = BlockStore.create(root, G.store.sizes, n, digest=False)
        starts = np.cumsum((0,) + G.store.sizes)
        for s in range(0, n, step):
            rows = noise.gradients(G.rows(s, min(s + step, n)).float(), gen).detach().float().cpu().numpy()
            for t in range(len(store.sizes)):
                store.write_rows(t, s, rows[:, starts[t]:starts[t + 1]])
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the store keeps its files open
    return GradientMatrix.from_store(store, G.blocks, G.indices, key=G.key, device=G.device, dtype=G.dtype,
                                     max_resident_bytes=G.max_resident_bytes)
