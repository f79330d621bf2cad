"""The gradient matrix G of the Fisher/OBS family (algorithms.md section 1).

Row i is g_i = grad_w of the mean loss over a "fisher mini-batch" B_i of m examples, over the
prunable weights only, at the current weights, with the model in eval mode (BatchNorm uses its
running statistics, dropout is off, rows are independent). Rows are computed with torch.func
(vmap of grad of functional_call) over `chunk_size` rows at a time, never with a Python loop over
samples. With m > 1 the vmap runs over the N groups and each row is one ordinary mini-batch mean.

Storage and the memory bound
----------------------------
G is held as column blocks (`ParamLayout.blocks(B)`: one per prunable tensor, tensors larger than
B cut into chunks of at most B) in a `GradientMatrix`; no dense N x p matrix is ever formed by the
builder. Two modes (`calibration.stream`):

* ``stream: false`` (default, in memory): one pass over the data differentiates w.r.t. all
  prunable tensors; each chunk's rows are written straight into the per-block tensors. Peak
  memory: G itself (N p floats, in blocks) + one chunk of rows (chunk_size x p).
* ``stream: true`` (large models): one pass per group of consecutive prunable tensors holding at
  most STREAM_COLS = 2^20 columns (a larger tensor gets a pass of its own), each pass
  differentiating only w.r.t. its tensors (the others are frozen constants) and writing their
  columns row-chunk by row-chunk into memory-mapped ``.npy`` files on disk. The blocks of the
  returned matrix are copy-on-write memory maps, so G lives in the page cache, not in process
  memory. Peak process memory: chunk_size x max(2^20, largest p_t) floats + activations,
  independent of p. The price is one forward/backward pass per group (a single pass for
  ResNet-20, about 25 for ResNet-50). Files live in the cache when
  ``calibration.cache`` is on, else in a scratch directory that is unlinked at once (the maps
  stay valid until the matrix is dropped).

Disk cache
----------
`build_gradient_matrix` caches G under ``<cache_dir>/<key>/`` (one ``.npy`` per prunable tensor,
the sampled indices, and ``meta.json``). The key hashes everything that changes G before the
row noise: the layout, every parameter and buffer of the model as it is while G is computed
(so weight noise applied by the noise model's ``calibration_weights`` hook is covered), the
calibration inputs after ``calibration_inputs`` noise and the labels, the sampled indices, N, m,
the run seed, the loss and optionally a noise-model key. The cached files do not depend on the
block size or the mode, so every method of a comparison (and both modes) shares one entry.
Gradient-row noise (the ``gradients`` hook) is applied after the cache (`apply_row_noise`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from pruning.errors import ConfigError
from pruning.layout import ParamLayout

CACHE_VERSION = 1
STREAM_COLS = 1 << 20  # columns differentiated per pass in stream mode (chunk_size x this floats in memory)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class GradientMatrix:
    """G (N x p) held as column blocks; behaves as a linear operator for IHT-style solvers.

    `data[b]` is the (N, len(blocks[b])) slice of G for `blocks[b]`: a contiguous tensor in
    memory mode, or a strided view of a memory-mapped file when `mmap` is true (stream mode).
    `key` is the cache key of the noise-free G (None when it was not computed through the cache).
    """

    blocks: list[slice]
    data: list[torch.Tensor]     # data[b] has shape (N, blocks[b].stop - blocks[b].start)
    indices: torch.Tensor        # dataset indices used, shape (N, m)
    key: str | None = None
    mmap: bool = False

    @property
    def num_rows(self) -> int:
        return self.data[0].shape[0]

    @property
    def num_cols(self) -> int:
        return self.blocks[-1].stop

    @property
    def dtype(self) -> torch.dtype:
        return self.data[0].dtype

    @property
    def device(self) -> torch.device:
        return self.data[0].device

    def dense(self) -> torch.Tensor:
        """The full N x p matrix (small models and tests only)."""
        return torch.cat(self.data, dim=1)

    def matvec(self, w: torch.Tensor) -> torch.Tensor:
        """G w (length N)."""
        out = torch.zeros(self.num_rows, dtype=self.data[0].dtype, device=self.data[0].device)
        for sl, gb in zip(self.blocks, self.data):
            out += gb @ w[sl].to(device=gb.device, dtype=gb.dtype)
        return out

    def rmatvec(self, r: torch.Tensor) -> torch.Tensor:
        """G^T r (length p)."""
        return torch.cat([gb.T @ r.to(device=gb.device, dtype=gb.dtype) for gb in self.data])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> GradientMatrix:
        data = [d.to(device=device, dtype=dtype or d.dtype) for d in self.data]
        return replace(self, data=data, mmap=self.mmap and all(a is b for a, b in zip(data, self.data)))

    def columns(self, sl: slice) -> torch.Tensor:
        """Columns `sl` of G as an (N, len) tensor (a view when `sl` lies inside one block)."""
        parts = []
        for bsl, gb in zip(self.blocks, self.data):
            lo, hi = max(sl.start, bsl.start), min(sl.stop, bsl.stop)
            if lo < hi:
                parts.append(gb[:, lo - bsl.start:hi - bsl.start])
        if not parts:
            raise ValueError(f"columns {sl} are outside G's {self.num_cols} columns")
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of G as a dense (stop - start, p) tensor."""
        return torch.cat([gb[start:stop] for gb in self.data], dim=1)

    def iter_blocks(self, blocks: list[slice] | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
        """(slice, columns) for each of `blocks` (default: G's own), gathering across G's blocks."""
        for sl in blocks if blocks is not None else self.blocks:
            yield sl, self.columns(sl)


# --------------------------------------------------------------------------------- computation
def _row_gradients(
    model: nn.Module,
    layout: ParamLayout,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    names: tuple[str, ...],
    sink: Callable[[int, int, dict[str, torch.Tensor]], None],
    *,
    mini_batch: int,
    chunk_size: int,
    loss_fn: LossFn,
    progress: bool,
    desc: str = "gradients",
) -> int:
    """Compute rows of G for the tensors `names`, `chunk_size` rows per vmap call, handing each
    chunk's gradients ({name: (rows, *shape)}) to `sink(start, stop, grads)`. Returns N."""
    if mini_batch <= 0 or chunk_size <= 0:
        raise ValueError(f"mini_batch={mini_batch} and chunk_size={chunk_size} must be positive")
    n_rows = inputs.shape[0] // mini_batch
    if n_rows == 0:
        raise ValueError(f"{inputs.shape[0]} examples cannot fill one mini-batch of {mini_batch}")
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
        x = inputs[: n_rows * mini_batch].reshape(n_rows, mini_batch, *inputs.shape[1:])
        y = targets[: n_rows * mini_batch].reshape(n_rows, mini_batch)
        for s in tqdm(range(0, n_rows, chunk_size), desc=desc, leave=False, disable=not progress):
            xs, ys = x[s:s + chunk_size].to(device), y[s:s + chunk_size].to(device)
            sink(s, s + xs.shape[0], per_row(diff, xs, ys))
    finally:
        model.train(was_training)
    return n_rows


def compute_gradients(
    model: nn.Module,
    layout: ParamLayout,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    mini_batch: int = 1,
    chunk_size: int = 128,
    block_size: int | None = None,
    loss_fn: LossFn = F.cross_entropy,
    progress: bool = False,
) -> torch.Tensor:
    """Dense G of shape (N, p) for N = len(inputs) // mini_batch rows (small models and tests).

    Each row is the gradient of the mean loss over `mini_batch` consecutive examples. Computed
    with vmap over rows, `chunk_size` rows at a time; BatchNorm and dropout run in eval mode.
    `block_size` is accepted for backward compatibility and ignored (see `compute_gradient_matrix`).
    """
    device = next(model.parameters()).device
    n_rows = inputs.shape[0] // mini_batch
    G = torch.empty(max(n_rows, 0), layout.numel, device=device, dtype=torch.float32)

    def sink(s: int, e: int, grads: dict[str, torch.Tensor]) -> None:
        G[s:e] = torch.cat([grads[k].reshape(e - s, -1) for k in layout.names], dim=1)

    _row_gradients(model, layout, inputs, targets, layout.names, sink, mini_batch=mini_batch,
                   chunk_size=chunk_size, loss_fn=loss_fn, progress=progress)
    return G


def compute_gradient_matrix(
    model: nn.Module,
    layout: ParamLayout,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    indices: torch.Tensor | None = None,
    *,
    mini_batch: int = 1,
    chunk_size: int = 128,
    block_size: int | None = None,
    stream: bool = False,
    store_dir: str | Path | None = None,
    stream_cols: int = STREAM_COLS,
    loss_fn: LossFn = F.cross_entropy,
    progress: bool = False,
) -> GradientMatrix:
    """G as column blocks, without ever holding a dense N x p matrix (see the module docstring).

    stream=False: one pass, rows written into per-block tensors on the model's device.
    stream=True: one pass per group of consecutive prunable tensors (at most `stream_cols` columns,
    or one tensor if larger) into memory-mapped per-tensor files under
    `store_dir` (a scratch directory next to the system temp files when None; it is unlinked
    at once and the maps stay valid). The blocks are then CPU views of those maps.
    """
    n_rows = inputs.shape[0] // mini_batch
    if indices is None:
        indices = torch.arange(n_rows * mini_batch).view(n_rows, mini_batch)
    kw = {"mini_batch": mini_batch, "chunk_size": chunk_size, "loss_fn": loss_fn, "progress": progress}
    if not stream:
        device = next(model.parameters()).device
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

        _row_gradients(model, layout, inputs, targets, layout.names, sink, **kw)
        return GradientMatrix(blocks, data, indices.cpu())

    scratch = store_dir is None
    root = Path(tempfile.mkdtemp(prefix="grads-")) if scratch else Path(store_dir)
    root.mkdir(parents=True, exist_ok=True)
    try:
        groups = stream_groups(layout, stream_cols)
        for gi, group in enumerate(groups):
            arrays = {layout.names[t]: np.lib.format.open_memmap(root / _tensor_file(t), mode="w+", dtype=np.float32,
                                                                  shape=(n_rows, layout.sizes[t])) for t in group}

            def sink(s: int, e: int, grads: dict[str, torch.Tensor], arrays: dict = arrays) -> None:
                for name, arr in arrays.items():
                    arr[s:e] = grads[name].reshape(e - s, -1).detach().cpu().numpy()

            _row_gradients(model, layout, inputs, targets, tuple(arrays), sink,
                           desc=f"gradients pass {gi + 1}/{len(groups)}", **kw)
            for arr in arrays.values():
                arr.flush()
            del arrays
        return _open_tensor_files(root, layout, block_size, indices.cpu(), mmap=True, device="cpu")
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
def _tensor_file(t: int) -> str:
    return f"tensor{t:04d}.npy"


def _open_tensor_files(root: Path, layout: ParamLayout, block_size: int | None, indices: torch.Tensor,
                       *, mmap: bool, device: torch.device | str, key: str | None = None) -> GradientMatrix:
    """Blocks of G from per-tensor (N, p_t) files: memory-mapped views, or copies on `device`."""
    blocks = layout.blocks(block_size)
    arrays = [np.load(root / _tensor_file(t), mmap_mode="c") for t in range(len(layout.names))]
    for arr, size, name in zip(arrays, layout.sizes, layout.names):
        if arr.ndim != 2 or arr.shape[1] != size or arr.shape[0] != arrays[0].shape[0]:
            raise ValueError(f"stored gradients of {name} have shape {arr.shape}, expected (N, {size})")
    index = {name: t for t, name in enumerate(layout.names)}
    data = []
    for name, lo, hi in _block_owners(layout, blocks):
        view = torch.from_numpy(arrays[index[name]][:, lo:hi])
        data.append(view if mmap else view.to(device=device, copy=True).contiguous())
    return GradientMatrix(blocks, data, indices, key=key, mmap=mmap)


def save_gradient_matrix(G: GradientMatrix, layout: ParamLayout, path: str | Path,
                         meta: Mapping[str, Any] | None = None) -> Path:
    """Write G as one (N, p_t) ``.npy`` per prunable tensor plus indices and meta, atomically.

    Holds at most one tensor's columns in extra memory. If `path` already exists (another job
    won the race) it is left as is.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for t, tsl in enumerate(layout.slices()):
            arr = np.lib.format.open_memmap(tmp / _tensor_file(t), mode="w+", dtype=np.float32,
                                            shape=(G.num_rows, tsl.stop - tsl.start))
            for b, bsl in enumerate(G.blocks):
                lo, hi = max(tsl.start, bsl.start), min(tsl.stop, bsl.stop)
                if lo < hi:
                    arr[:, lo - tsl.start:hi - tsl.start] = (
                        G.data[b][:, lo - bsl.start:hi - bsl.start].detach().float().cpu().numpy())
            arr.flush()
            del arr
        np.save(tmp / "indices.npy", G.indices.cpu().numpy())
        info = {"version": CACHE_VERSION, "names": list(layout.names), "shapes": [list(s) for s in layout.shapes],
                "num_rows": G.num_rows, **dict(meta or {})}
        (tmp / "meta.json").write_text(json.dumps(info, indent=1, sort_keys=True, default=str))
        try:
            os.rename(tmp, path)
        except OSError:  # the destination exists: someone else cached the same G first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_gradient_matrix(path: str | Path, layout: ParamLayout, block_size: int | None = None, *,
                         mmap: bool = False, device: torch.device | str = "cpu") -> GradientMatrix | None:
    """G from a store written by `save_gradient_matrix`, or None if absent, unreadable or for
    another layout. mmap=True keeps the blocks as memory maps (stream mode)."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        if (meta.get("version") != CACHE_VERSION or meta.get("names") != list(layout.names)
                or meta.get("shapes") != [list(s) for s in layout.shapes]):
            return None
        indices = torch.from_numpy(np.load(path / "indices.npy"))
        return _open_tensor_files(path, layout, block_size, indices, mmap=mmap, device=device,
                                  key=meta.get("key"))
    except (OSError, ValueError, json.JSONDecodeError):
        return None


# ------------------------------------------------------------------------------------- caching
def tensor_hash(*tensors: torch.Tensor) -> str:
    """sha256 over dtype, shape and raw bytes of the tensors."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def weights_hash(model: nn.Module) -> str:
    """sha256 over every parameter and buffer of the model (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor_hash(t).encode())
    return h.hexdigest()


def cache_key(model: nn.Module, layout: ParamLayout, inputs: torch.Tensor, targets: torch.Tensor,
              indices: torch.Tensor, *, mini_batch: int, seed: int | None = None,
              loss_fn: LossFn = F.cross_entropy, extra: Any = None) -> str:
    """Key of a gradient matrix: everything that changes G before the gradient-row noise."""
    parts = {
        "version": CACHE_VERSION,
        "names": list(layout.names),
        "shapes": [list(s) for s in layout.shapes],
        "weights": weights_hash(model),
        "inputs": tensor_hash(inputs),
        "targets": tensor_hash(targets),
        "indices": tensor_hash(indices),
        "num_rows": int(inputs.shape[0]) // int(mini_batch),
        "mini_batch": int(mini_batch),
        "seed": seed,
        "loss": getattr(loss_fn, "__module__", "") + "." + getattr(loss_fn, "__qualname__", repr(loss_fn)),
        "extra": extra,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _flag(cal: Mapping[str, Any], key: str, default: bool) -> bool:
    v = cal.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ConfigError(f"calibration.{key}", v, "true, false")
    return v


def build_gradient_matrix(
    model: nn.Module,
    layout: ParamLayout,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    indices: torch.Tensor,
    calibration: Mapping[str, Any],
    *,
    cache_dir: str | Path | None = None,
    seed: int | None = None,
    key_extra: Any = None,
    loss_fn: LossFn = F.cross_entropy,
    progress: bool = False,
) -> GradientMatrix:
    """G for one pruning step, through the disk cache when `calibration.cache` is on.

    `calibration` holds mini_batch, chunk_size, block_size, stream (default false) and cache
    (default true); `cache_dir` is the cache root (required for caching; stream mode also uses
    it for scratch files). Call it inside the noise model's `calibration_weights` context and
    with the noisy calibration inputs, so that the key covers them.
    """
    mini_batch = int(calibration.get("mini_batch", 1))
    chunk_size = int(calibration.get("chunk_size", 128))
    block_size = calibration.get("block_size")
    block_size = None if block_size is None else int(block_size)
    stream = _flag(calibration, "stream", False)
    use_cache = _flag(calibration, "cache", True) and cache_dir is not None
    device = next(model.parameters()).device
    kw = {"mini_batch": mini_batch, "chunk_size": chunk_size, "block_size": block_size,
          "loss_fn": loss_fn, "progress": progress}
    if not use_cache:
        scratch = None
        if stream and cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=".scratch-", dir=cache_dir))
        try:
            return compute_gradient_matrix(model, layout, inputs, targets, indices, stream=stream,
                                           store_dir=scratch, **kw)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
    key = cache_key(model, layout, inputs, targets, indices, mini_batch=mini_batch, seed=seed,
                    loss_fn=loss_fn, extra=key_extra)
    path = Path(cache_dir) / key
    hit = load_gradient_matrix(path, layout, block_size, mmap=stream, device=device)
    if hit is not None:
        return hit
    meta = {"key": key, "mini_batch": mini_batch, "seed": seed, "extra": key_extra}
    if stream:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            G = compute_gradient_matrix(model, layout, inputs, targets, indices, stream=True, store_dir=tmp, **kw)
            np.save(tmp / "indices.npy", G.indices.numpy())
            info = {"version": CACHE_VERSION, "names": list(layout.names),
                    "shapes": [list(s) for s in layout.shapes], "num_rows": G.num_rows, **meta}
            (tmp / "meta.json").write_text(json.dumps(info, indent=1, sort_keys=True, default=str))
            try:
                os.rename(tmp, path)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)  # our maps stay valid after the unlink
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        G.key = key
        return G
    G = compute_gradient_matrix(model, layout, inputs, targets, indices, stream=False, **kw)
    save_gradient_matrix(G, layout, path, meta)
    G.key = key
    return G


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
    draws as on a dense G); in stream mode (memory-mapped G) chunks of `chunk_rows` rows, written
    to fresh scratch maps, so the memory bound holds (rows are independent in every row-noise
    model; the draws then differ from the in-memory mode).
    """
    from pruning.noise import NoiseModel

    if noise is None:
        return G
    if hasattr(noise, "gradient_matrix"):
        return noise.gradient_matrix(G, gen)
    if type(noise).gradients is NoiseModel.gradients:
        return G
    if not G.mmap:
        noisy = noise.gradients(G.dense(), gen)
        return replace(G, data=[noisy[:, sl].contiguous() for sl in G.blocks])
    p, n = G.num_cols, G.num_rows
    step = chunk_rows or max(1, (1 << 24) // max(p, 1))
    root = Path(tempfile.mkdtemp(prefix="grads-noise-"))
    try:
        arrays = [np.lib.format.open_memmap(root / f"block{b:05d}.npy", mode="w+", dtype=np.float32,
                                            shape=(n, sl.stop - sl.start)) for b, sl in enumerate(G.blocks)]
        for s in range(0, n, step):
            rows = noise.gradients(G.rows(s, min(s + step, n)).float(), gen).detach().cpu().numpy()
            for arr, sl in zip(arrays, G.blocks):
                arr[s:s + rows.shape[0]] = rows[:, sl.start:sl.stop]
        for arr in arrays:
            arr.flush()
        del arrays
        data = [torch.from_numpy(np.load(root / f"block{b:05d}.npy", mmap_mode="c")) for b in range(len(G.blocks))]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return replace(G, data=data)
