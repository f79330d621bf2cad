"""Shared block factorisations of the Fisher/OBS family across a sweep (issue 17).

WoodFisher (Singh & Alistarh, NeurIPS 2020, WF eq. 3 with its Woodbury closed form) and CBS-U
(Yu et al., ICML 2022, CBS eq. 6) both start from one block G_b of the gradient matrix (columns of
pruned weights zeroed) and spend O(N^2 B) on

  the Gram matrix        K_b = G_b G_b^T                                  (N x N, no damp)
  its Cholesky factor    L_b L_b^T = N lambda I_N + K_b                     (the Woodbury N x N system)
  the OBS diagonal       diag(F_b^-1) = (1 - ||L_b^-1 g_q||^2) / lambda     (N^2 B)

none of which depends on the target sparsity. A study that prunes the same seed to 7 sparsities
with 2 second-order methods would repeat them 14 times; this module computes each once per
(G, block slice, mask, dtype [, damp, inverse]) and keeps it

* in memory for the rest of the process (least recently used first out, `MEMORY_MB` in all), and
* on disk next to G's cache entry, ``<G entry>/factors/<kind>-<key>.pt`` (a `torch.save` dict of
  tensors written with `atomic_write(..., digest=True)`), when G came through the gradient cache
  (`GradientMatrix.entry`). A file that fails `verify_digest`, cannot be read with
  ``weights_only=True`` or holds other shapes or another key is a miss: it is removed, recomputed,
  rewritten and reported (`warnings.warn` and the stage info's ``factor_cache_warning``).

The key of an entry hashes G's identity (its gradient-cache key; a sha256 of the block's values
when G has no cache entry, e.g. ``calibration.cache=false`` or gradient-row noise), the block
slice, N, the dtype, a hash of the mask restricted to the block and, for factors, damp and the
inverse method. Multi-stage and gradual runs get a new G (and mask) every stage and simply miss.
A reused entry holds the very tensors a fresh computation produces, so results are bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pruning.calibration import tensor_hash
from pruning.gradients import GradientMatrix
from pruning.record import atomic_write, remove_with_digest, verify_digest

MEMORY_MB = 4096   # in-process entries kept (bytes of tensors), least recently used dropped first
DISK_MAX_MB = 4096  # larger entries (e.g. a dense B x B inverse of a big block) are kept in memory only
FACTORS_DIR = "factors"
FORMAT = 1

Tensors = dict[str, torch.Tensor]
_memory: OrderedDict[str, Tensors] = OrderedDict()
_memory_bytes = 0


@dataclass
class CacheStats:
    """What the lookups of one pruning step did, for the stage info."""

    status: dict[str, list[str]] = field(default_factory=dict)  # kind -> ["hit", "miss", ...]
    seconds: float = 0.0       # time in lookups (loads, digests and the computations of misses)
    warnings: list[str] = field(default_factory=list)

    def add(self, kind: str, status: str) -> None:
        self.status.setdefault(kind, []).append(status)

    def info(self, kind: str) -> dict[str, Any]:
        """{'factor_cache': hit | miss | mixed, 'factor_seconds': ...} for the entries of `kind`."""
        got = set(self.status.get(kind, []))
        out: dict[str, Any] = {"factor_cache": got.pop() if len(got) == 1 else ("mixed" if got else "none"),
                               "factor_seconds": round(self.seconds, 4)}
        if self.warnings:
            out["factor_cache_warning"] = "; ".join(self.warnings)
        return out


def clear_memory() -> None:
    """Drop every in-process entry (tests, benchmarks measuring a cold start)."""
    global _memory_bytes
    _memory.clear()
    _memory_bytes = 0


def _nbytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _remember(key: str, tensors: Tensors) -> None:
    global _memory_bytes
    size = _nbytes(tensors)
    if size > MEMORY_MB << 20:
        return
    if key in _memory:
        _memory_bytes -= _nbytes(_memory.pop(key))
    _memory[key] = tensors
    _memory_bytes += size
    while _memory_bytes > MEMORY_MB << 20:
        _memory_bytes -= _nbytes(_memory.popitem(last=False)[1])


def matrix_identity(G: GradientMatrix, block: torch.Tensor) -> str:
    """G's gradient-cache key when it has an entry on disk, else a sha256 of the block's values."""
    entry = G.entry
    if entry is not None and G.key:
        return f"grads:{G.key}"
    return f"values:{tensor_hash(block)}"


def entry_key(kind: str, identity: str, parts: dict[str, Any]) -> str:
    blob = json.dumps({"format": FORMAT, "kind": kind, "G": identity, **parts}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:32]}"


def _disk_path(G: GradientMatrix, key: str) -> Path | None:
    entry = G.entry
    return None if entry is None else Path(entry) / FACTORS_DIR / f"{key}.pt"


def _load(path: Path, key: str, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
          device: torch.device) -> Tensors:
    """The tensors of a disk entry; raises ValueError naming what is wrong."""
    problem = verify_digest(path)
    if problem is not None:
        raise ValueError(problem)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # garbled pickle stream, wrong types: never trusted
        raise ValueError(f"it cannot be read ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or obj.get("key") != key or not isinstance(obj.get("tensors"), dict):
        raise ValueError("it holds another entry")
    out = {}
    for name, shape in shapes.items():
        t = obj["tensors"].get(name)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise ValueError(f"its {name} is not a {dtype} tensor of shape {tuple(shape)}")
        out[name] = t.to(device)
    return out


def _store(path: Path, key: str, tensors: Tensors, stats: CacheStats) -> None:
    if _nbytes(tensors) > DISK_MAX_MB << 20:
        return
    obj = {"key": key, "tensors": {k: v.detach().cpu() for k, v in tensors.items()}}
    try:
        atomic_write(path, lambda f: torch.save(obj, f), binary=True, digest=True)
    except OSError as exc:  # disk full, read-only cache: the run goes on without the disk copy
        stats.warnings.append(f"factor cache entry {path} not written ({exc.strerror or exc})")
        warnings.warn(stats.warnings[-1], stacklevel=3)


def lookup(G: GradientMatrix, kind: str, identity: str, parts: dict[str, Any],
           shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device,
           compute: Callable[[], Tensors], stats: CacheStats) -> Tensors:
    """The tensors of entry (kind, G, parts): from memory, else from G's cache entry on disk, else
    `compute()` (then kept in both). `shapes` are the expected shapes of a disk entry's tensors."""
    t0 = time.perf_counter()
    key = entry_key(kind, identity, parts)
    try:
        hit = _memory.get(key)
        if hit is not None:
            _memory.move_to_end(key)
            stats.add(kind, "hit")
            return {k: v.to(device) for k, v in hit.items()}
        path = _disk_path(G, key)
        if path is not None and path.exists():
            try:
                out = _load(path, key, shapes, dtype, device)
            except ValueError as exc:
                stats.warnings.append(f"factor cache entry {path} not used: {exc}; recomputing it")
                warnings.warn(stats.warnings[-1], stacklevel=2)
                remove_with_digest(path)
            else:
                _remember(key, out)
                stats.add(kind, "hit")
                return out
        out = compute()
        stats.add(kind, "miss")
        _remember(key, out)
        if path is not None:
            _store(path, key, out, stats)
        return out
    finally:
        stats.seconds += time.perf_counter() - t0


def mask_hash(mask: torch.Tensor) -> str:
    return tensor_hash(mask.to(torch.bool))


def gram(G: GradientMatrix, Gb: torch.Tensor, sl: slice, mask: torch.Tensor, stats: CacheStats,
         identity: str | None = None) -> torch.Tensor:
    """K_b = G_b G_b^T (N x N) of the masked block `Gb` (columns `sl` of G, pruned columns zeroed
    by `mask[sl]`), shared by WoodFisher and CBS at every damp and sparsity."""
    n = Gb.shape[0]
    identity = identity or matrix_identity(G, Gb)
    parts = {"block": [sl.start, sl.stop], "rows": n, "dtype": str(Gb.dtype), "mask": mask_hash(mask[sl])}
    return lookup(G, "gram", identity, parts, {"gram": (n, n)}, Gb.dtype, Gb.device,
                  lambda: {"gram": Gb @ Gb.T}, stats)["gram"]
