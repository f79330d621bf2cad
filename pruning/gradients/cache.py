"""The disk cache of G, and the `calibration` settings that say how G is built.

`build_gradient_matrix` caches G under ``<cache_dir>/<key>/`` (a `BlockStore`: one ``.npy`` per
prunable tensor, plus the sampled indices and ``meta.json``). The key hashes everything that
changes G before the gradient-row noise: the layout, every parameter and buffer of the model as
it is while G is computed (so weight noise applied by the noise model's weight hook is covered),
the calibration data's fingerprint (`pruning.calibration`: for tensors, a hash of the inputs
after input noise and of the labels; for rows read from a dataset, the caller's data key, which
names the input noise and its seed, and a hash of the first row), the sampled indices, N, m, the
run seed, the loss and optionally a noise-model key (`key_extra`). The cached files do not depend
on the block size or the mode, so every method of a comparison (and both modes) shares one
entry. Gradient-row noise is applied after the cache (`pruning.calibrate`). Files live in the
cache when ``calibration.cache`` is on; a streamed G without the cache lives in a scratch
directory that is unlinked at once (the store keeps its files open, so they stay readable until
the matrix is dropped).

Integrity: ``meta.json`` holds the sha256 of every tensor file's data bytes and of
``indices.npy`` (`CACHE_VERSION` 2). The tensor digests are computed while the rows are written
(rows of a tensor arrive in order, so no extra pass); an entry is verified when it is opened, one
sequential read of each file (the same bytes an in-memory load reads anyway; in stream mode one
extra read of G at the disk's speed, a few seconds per GB on one core; that read also counts the
NaN/inf entries), and its row count and stored indices must equal the requested ones. A missing,
short or garbled entry is a miss: it is removed, G is recomputed and stored again, and `warn`
(the run record's warnings) names it. ``indices.npy`` is read with ``allow_pickle=False``: no
code runs from a cache file. An entry is written in a temporary directory renamed into place
(`_publish`), so no reader sees half an entry. Block factorisations of G
(`pruning.factor_cache`) live in ``<entry>/factors/`` and go with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pruning.calibration import RowSource, tensor_hash
from pruning.errors import choice, flag, integer, megabytes, require, unknown_key
from pruning.gradients.compute import STREAM_CHUNK_MB, LossFn, as_rows, compute_gradient_matrix
from pruning.gradients.operator import RESIDENT_MB, GradientMatrix
from pruning.gradients.storage import BlockStore, owners_by_size
from pruning.layout import ParamLayout
from pruning.record import sha256_file

CACHE_VERSION = 2  # 2: sha256 of every file in meta.json, checked when an entry is opened
INDICES_FILE = "indices.npy"
T = TypeVar("T")


class CorruptCache(ValueError):
    """A gradient cache entry that exists but fails its checks (digest, size, rows, indices)."""


# ------------------------------------------------------------------------------------ settings
def _positive_or_null(value: Any, key: str, null_means: str) -> int | None:
    require(value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0), key, value,
            f"null ({null_means}) or a positive integer")
    return value


@dataclass(frozen=True)
class CalibrationSettings:
    """The run's `calibration` section, checked: how G is sampled, built, stored and cached.

    num_samples N rows, mini_batch m examples per row, chunk_size rows per vmap call, sub_batch
    examples of one row per vmap call (None: all m), num_workers loader processes (None: the
    dataset's), block_size columns per block (None: one block per tensor), cache (keep G on
    disk), cache_stages (first: only the first pruning step's G, the one other jobs of the seed
    can reuse | all: every step's, each tied to one job's weights), stream (build G on disk,
    `pruning.gradients.compute`), stream_chunk_mb (MiB of rows per vmap call when streaming),
    stream_cols (None: one pass; an integer: one pass per group of at most that many columns),
    resident_mb (largest dense copy of G's columns a solver keeps when G is on disk; None: no
    bound).
    """

    num_samples: int = 256
    mini_batch: int = 1
    chunk_size: int = 128
    sub_batch: int | None = None
    num_workers: int | None = None
    block_size: int | None = None
    cache: bool = True
    cache_stages: str = "first"
    stream: bool = False
    stream_chunk_mb: float = STREAM_CHUNK_MB
    stream_cols: int | None = None
    resident_mb: float | None = RESIDENT_MB

    @classmethod
    def parse(cls, cal: Mapping[str, Any] | CalibrationSettings) -> CalibrationSettings:
        """Settings from a `calibration` mapping (missing keys, and null cache/stream, take the
        defaults above); a bad value or an unknown key is a one-line ConfigError naming
        `calibration.<key>`."""
        if isinstance(cal, CalibrationSettings):
            return cal
        names = [f.name for f in fields(cls)]
        for key in cal:
            if key not in names:
                raise unknown_key(f"calibration.{key}", cal[key], [f"calibration.{n}" for n in names])
        d = {**{f.name: f.default for f in fields(cls)}, **cal}
        workers = d["num_workers"]
        if workers is not None:
            integer(workers, "calibration.num_workers", lo=0, allowed="null or a non-negative integer")
        return cls(
            num_samples=integer(d["num_samples"], "calibration.num_samples", lo=1, allowed="a positive integer"),
            mini_batch=integer(d["mini_batch"], "calibration.mini_batch", lo=1, allowed="a positive integer"),
            chunk_size=integer(d["chunk_size"], "calibration.chunk_size", lo=1, allowed="a positive integer"),
            sub_batch=_positive_or_null(d["sub_batch"], "calibration.sub_batch", "the whole mini-batch"),
            num_workers=workers,
            block_size=_positive_or_null(d["block_size"], "calibration.block_size", "one block per tensor"),
            cache=flag(d["cache"], "calibration.cache", True),
            cache_stages=choice(d["cache_stages"], "calibration.cache_stages", ("first", "all")),
            stream=flag(d["stream"], "calibration.stream", False),
            stream_chunk_mb=megabytes(d["stream_chunk_mb"], "calibration.stream_chunk_mb"),
            stream_cols=_positive_or_null(d["stream_cols"], "calibration.stream_cols", "one pass"),
            resident_mb=megabytes(d["resident_mb"], "calibration.resident_mb", allow_none=True),
        )


# ------------------------------------------------------------------------------------ entries
def _publish(path: Path, fill: Callable[[Path], T]) -> tuple[T, bool]:
    """`fill(tmp)` on a fresh directory beside `path`, then renamed to `path` in one step.

    Returns fill's result and whether this call created `path`; if `path` exists already (another
    job cached the same G first) it is left as is and the temporary directory removed (files that
    `fill` left open stay readable after the unlink)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        out = fill(tmp)
        try:
            os.rename(tmp, path)
            return out, True
        except OSError:  # the destination exists
            shutil.rmtree(tmp, ignore_errors=True)
            return out, False
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    of every file), atomically. Holds at most one tensor's columns in extra memory. If `path`
    already exists (another job won the race) it is left as is."""

    def fill(tmp: Path) -> None:
        store = BlockStore.create(tmp, layout.sizes, G.num_rows)
        try:
            for t, tsl in enumerate(layout.slices()):
                store.write_rows(t, 0, G.columns(tsl).detach().float().cpu().contiguous().numpy())
            _write_entry_files(tmp, store, layout, G.indices, meta)
        finally:
            store.close()

    path = Path(path)
    _publish(path, fill)
    return path


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise CorruptCache(f"{path / 'meta.json'} cannot be read ({type(exc).__name__})") from None
    if not isinstance(meta, dict):
        raise CorruptCache(f"{path / 'meta.json'} is not a JSON object")
    return meta


def _open_verified(path: Path, layout: ParamLayout, digests: Any, num_rows: Any,
                   indices: torch.Tensor | None) -> tuple[BlockStore, torch.Tensor]:
    """The entry's store, every file checked against `digests`, and its stored indices."""
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
        if store.n_rows != num_rows or store.n_rows != stored.shape[0]:
            raise CorruptCache(f"{path} holds {store.n_rows} rows, its meta.json says {num_rows} "
                               f"and its indices {stored.shape[0]}")
        problem = store.verify(digests)
        if problem is not None:
            raise CorruptCache(problem)
    except BaseException as exc:
        store.close()
        if isinstance(exc, OSError):
            raise CorruptCache(f"{path} cannot be read ({exc})") from None
        raise
    return store, stored


def load_gradient_matrix(path: str | Path, layout: ParamLayout, block_size: int | None = None, *,
                         on_disk: bool = False, device: torch.device | str = "cpu",
                         resident_mb: float | None = RESIDENT_MB,
                         indices: torch.Tensor | None = None) -> GradientMatrix | None:
    """G from a store written by `save_gradient_matrix`, or None if absent or for another layout
    or cache version. on_disk=True keeps G on disk (stream mode): blocks are read on demand onto
    `device`.

    Every file is checked against its sha256 in meta.json before use, and the rows and stored
    indices against `indices` (the requested ones) when given; an entry that fails raises
    `CorruptCache` naming the file and the problem.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    meta = _read_meta(path)
    if (meta.get("version") != CACHE_VERSION or meta.get("names") != list(layout.names)
            or meta.get("shapes") != [list(s) for s in layout.shapes]):
        return None
    store, stored = _open_verified(path, layout, meta.get("digests"), meta.get("num_rows"), indices)
    blocks = layout.blocks(block_size)
    if on_disk:
        return GradientMatrix.from_store(store, blocks, stored, key=meta.get("key"), device=device,
                                         max_resident_bytes=None if resident_mb is None else int(resident_mb * 2**20))
    try:
        data = [torch.from_numpy(store.read(t, lo, hi)).to(device) for t, lo, hi in owners_by_size(store.sizes, blocks)]
    finally:
        store.close()
    return GradientMatrix(blocks, data, stored, key=meta.get("key"), nonfinite=store.nonfinite)


def _discard(path: Path) -> None:
    """Remove a bad cache entry (renamed first, so no reader sees it half removed)."""
    trash = path.parent / f".{path.name}.bad-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, trash)
    except OSError:  # already gone (another job discarded it)
        return
    shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------------------- keys
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


# ---------------------------------------------------------------------------------------- build
def build_gradient_matrix(
    model: nn.Module,
    layout: ParamLayout,
    inputs: torch.Tensor | RowSource,
    targets: torch.Tensor | None,
    indices: torch.Tensor,
    calibration: Mapping[str, Any] | CalibrationSettings,
    *,
    cache_dir: str | Path | None = None,
    seed: int | None = None,
    key_extra: Any = None,
    loss_fn: LossFn = F.cross_entropy,
    progress: bool = False,
    warn: Callable[[str], None] | None = None,
) -> GradientMatrix:
    """G for one pruning step, through the disk cache when `calibration.cache` is on.

    `calibration` is the `calibration` section (`CalibrationSettings`); `cache_dir` is the cache
    root (required for caching; stream mode also uses it for scratch files). `inputs` is a tensor
    (with `targets`) or a `RowSource` (`targets` None) whose rows are loaded chunk by chunk. Call
    it inside the noise model's weight-noise context, with inputs that carry the input noise (a
    source's fingerprint must name it), so that the key covers them. A cache entry that fails its
    checks (`load_gradient_matrix`) is replaced by a recomputed G and reported through
    `warn(message)` (default: printed).
    """
    cal = CalibrationSettings.parse(calibration)
    source = as_rows(inputs, targets, cal.mini_batch)
    kw = {"mini_batch": cal.mini_batch, "chunk_size": cal.chunk_size, "block_size": cal.block_size,
          "sub_batch": cal.sub_batch, "loss_fn": loss_fn, "progress": progress,
          "stream_chunk_mb": cal.stream_chunk_mb, "stream_cols": cal.stream_cols, "resident_mb": cal.resident_mb}
    if not (cal.cache and cache_dir is not None):
        return _uncached(model, layout, source, indices, cal.stream, cache_dir, kw)
    key = cache_key(model, layout, source, indices, seed=seed, loss_fn=loss_fn, extra=key_extra)
    path = Path(cache_dir) / key
    try:
        hit = load_gradient_matrix(path, layout, cal.block_size, on_disk=cal.stream,
                                   device=next(model.parameters()).device, resident_mb=cal.resident_mb,
                                   indices=indices)
    except CorruptCache as exc:
        (warn or _print_warning)(f"gradient cache entry not used: {exc}; recomputing G and replacing it")
        _discard(path)
        hit = None
    if hit is not None:
        hit.entry = path
        return hit
    meta = {"key": key, "mini_batch": cal.mini_batch, "seed": seed, "extra": key_extra}
    if cal.stream:  # the rows go straight into the entry's files
        def fill(tmp: Path) -> GradientMatrix:
            G = compute_gradient_matrix(model, layout, source, None, indices, stream=True, store_dir=tmp,
                                        digest=True, **kw)
            _write_entry_files(tmp, G.store, layout, G.indices, meta)
            return G

        G, created = _publish(path, fill)
        if created:
            G.store.root, G.entry = path, path
    else:
        G = compute_gradient_matrix(model, layout, source, None, indices, stream=False, **kw)
        save_gradient_matrix(G, layout, path, meta)
        G.entry = path
    G.key = key
    return G


def _uncached(model: nn.Module, layout: ParamLayout, source: RowSource, indices: torch.Tensor, stream: bool,
              cache_dir: str | Path | None, kw: dict[str, Any]) -> GradientMatrix:
    """G without the cache; a streamed G lives in a scratch directory under `cache_dir`, unlinked
    at once (its open files stay readable)."""
    scratch = None
    if stream and cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".scratch-", dir=cache_dir))
    try:
        return compute_gradient_matrix(model, layout, source, None, indices, stream=stream, store_dir=scratch, **kw)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _print_warning(message: str) -> None:
    print(f"warning: {message}", flush=True)
