"""G on disk: the file format of a stored gradient matrix (`BlockStore`).

One row-major (N, p_t) float32 ``.npy`` file per prunable tensor (``tensor0000.npy``, ...), in
the order of the layout. Rows s:e of a tensor are one contiguous byte range, so a chunk of rows
is one positioned write per tensor; columns lo:hi of a tensor are one read when they span it,
else one read per row. Nothing is memory-mapped: a read copies exactly what was asked for into a
fresh array that the caller drops, so a process never keeps pages of G resident (touched pages
of a memory map would count in its resident set).

Integrity: while the rows of a tensor arrive in order the store keeps a running sha256 of them
(`digests`, no extra pass) and counts their NaN/inf entries (`nonfinite`); `verify` reads each
file once and checks it against the stored digests.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

_IO_MAX = 1 << 30  # bytes per positioned read/write call (Linux caps one call near 2 GiB)
_HASH_CHUNK = 16 << 20  # bytes per read while verifying a stored tensor


def tensor_file(t: int) -> str:
    """File name of prunable tensor t inside a store."""
    return f"tensor{t:04d}.npy"


def count_nonfinite(rows: np.ndarray) -> int:
    """NaN/inf entries of a float array. A finite sum has no NaN/inf terms, so the usual case
    costs one fast reduction; only a non-finite sum (or an overflow) is counted entry by entry."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(rows.sum()):
            return 0
    return int(rows.size - np.count_nonzero(np.isfinite(rows)))


def owners_by_size(sizes: tuple[int, ...], blocks: list[slice]) -> list[tuple[int, int, int]]:
    """For each column block: (tensor index, local start, local stop) inside that tensor."""
    starts = np.cumsum((0,) + tuple(sizes))
    out = []
    for sl in blocks:
        t = int(np.searchsorted(starts, sl.start, side="right")) - 1
        if t < 0 or t >= len(sizes) or sl.stop > starts[t + 1]:
            raise ValueError(f"block {sl} crosses a tensor boundary of the stored gradients")
        out.append((t, sl.start - int(starts[t]), sl.stop - int(starts[t])))
    return out


class BlockStore:
    """G on disk: one row-major (N, p_t) float32 ``.npy`` file per prunable tensor (module docstring).

    The files stay open, so a store outlives the unlinking of its directory (scratch stores).
    `nonfinite` is the number of NaN/inf entries written or verified so far (None: unknown, an
    opened store that was not verified).
    """

    def __init__(self, root: Path, sizes: tuple[int, ...], n_rows: int, files: list[Any], offsets: list[int]):
        self.root, self.sizes, self.n_rows = Path(root), tuple(int(v) for v in sizes), int(n_rows)
        self.files, self.offsets = files, offsets
        # running sha256 of each tensor's rows while they are written in order (None: out of order)
        self._hashers: list[Any] = [hashlib.sha256() for _ in self.sizes]
        self._hashed_rows = [0] * len(self.sizes)
        self.nonfinite: int | None = 0

    @classmethod
    def create(cls, root: str | Path, sizes: tuple[int, ...], n_rows: int, digest: bool = True) -> BlockStore:
        """Empty (sparse) files of the right shape under `root`, opened for writing; digest=True
        keeps a sha256 of each tensor's rows as they are written (for a cache entry's meta.json)."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        files, offsets = [], []
        for t, size in enumerate(sizes):
            f = open(root / tensor_file(t), "w+b")  # noqa: SIM115 (kept open with the store)
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
        """The files written by `create`, checked against `sizes`."""
        root = Path(root)
        files, offsets, n_rows = [], [], None
        try:
            for t, size in enumerate(sizes):
                f = open(root / tensor_file(t), "rb")  # noqa: SIM115
                files.append(f)
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)
                n_rows = shape[0] if n_rows is None else n_rows
                if len(shape) != 2 or shape != (n_rows, size) or fortran or dtype != np.float32:
                    raise ValueError(f"stored gradients {root / tensor_file(t)} have shape {shape} and dtype "
                                     f"{dtype}, expected ({n_rows}, {size}) float32")
                offsets.append(f.tell())
                if os.fstat(f.fileno()).st_size < f.tell() + shape[0] * size * 4:
                    raise ValueError(f"stored gradients {root / tensor_file(t)} are truncated")
        except BaseException:
            for f in files:
                f.close()
            raise
        store = cls(root, tuple(sizes), n_rows or 0, files, offsets)
        store._hashers = [None] * len(store.sizes)  # opened, not written: `digests` reads the files
        store.nonfinite = None  # known once `verify` has read the files
        return store

    def close(self) -> None:
        for f in self.files:
            f.close()

    def write_rows(self, t: int, start: int, rows: np.ndarray) -> None:
        """Rows start:start+len(rows) of tensor t (rows: (n, p_t) float32); each row is written once."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.sizes[t] or start + rows.shape[0] > self.n_rows:
            raise ValueError(f"rows of shape {rows.shape} at {start} do not fit tensor {t} "
                             f"({self.n_rows}, {self.sizes[t]})")
        buf = memoryview(rows).cast("B")
        pos, fd = self.offsets[t] + start * self.sizes[t] * 4, self.files[t].fileno()
        done = 0
        while done < len(buf):
            done += os.pwrite(fd, buf[done:done + _IO_MAX], pos + done)
        if self.nonfinite is not None:  # counted while the rows are in cache: no pass over G later
            self.nonfinite += count_nonfinite(rows)
        if self._hashers[t] is not None and start == self._hashed_rows[t]:
            self._hashers[t].update(buf)
            self._hashed_rows[t] += rows.shape[0]
        else:  # rewritten or out of order: `digests` reads the file back instead
            self._hashers[t] = None

    def _scan(self, t: int) -> tuple[str, int]:
        """(sha256 of tensor t's data bytes, its NaN/inf entries), read back from the file."""
        h, fd = hashlib.sha256(), self.files[t].fileno()
        pos, left, bad, carry = self.offsets[t], self.n_rows * self.sizes[t] * 4, 0, b""
        while left > 0:
            piece = os.pread(fd, min(_HASH_CHUNK, left), pos)
            if not piece:
                raise OSError(errno.EIO, f"{self.root / tensor_file(t)} ends {left} bytes early")
            h.update(piece)
            whole = carry + piece if carry else piece  # a short read may end inside a float
            cut = len(whole) - len(whole) % 4
            bad += count_nonfinite(np.frombuffer(whole, dtype=np.float32, count=cut // 4))
            carry = whole[cut:]
            pos, left = pos + len(piece), left - len(piece)
        return h.hexdigest(), bad

    def digests(self) -> dict[str, str]:
        """{file name: sha256 of its data bytes}: from the hashes kept while the rows were written
        in order (no extra pass), else read back."""
        out = {}
        for t in range(len(self.sizes)):
            done = self._hashers[t] is not None and self._hashed_rows[t] == self.n_rows
            out[tensor_file(t)] = self._hashers[t].hexdigest() if done else self._scan(t)[0]
        return out

    def verify(self, digests: Mapping[str, str]) -> str | None:
        """None when every tensor file matches `digests`, else what is wrong. One read of each file,
        several files at once (hashlib releases the GIL), so it runs at disk or hashing speed; the
        same read counts the NaN/inf entries (`nonfinite`)."""
        names = [tensor_file(t) for t in range(len(self.sizes))]
        missing = [n for n in names if n not in digests]
        if missing:
            return f"{self.root / missing[0]} has no digest in meta.json"
        with ThreadPoolExecutor(max_workers=max(1, min(len(names), os.cpu_count() or 1, 8))) as pool:
            have = list(pool.map(self._scan, range(len(names))))
        bad = [n for n, (h, _) in zip(names, have) if h != digests[n]]
        if bad:
            return f"{self.root / bad[0]} does not match its sha256 in meta.json"
        self.nonfinite = sum(n for _, n in have)
        return None

    def _read_into(self, t: int, out: np.ndarray, pos: int) -> None:
        buf = memoryview(out).cast("B")
        fd, done = self.files[t].fileno(), 0
        while done < len(buf):
            n = os.preadv(fd, [buf[done:done + _IO_MAX]], pos + done)
            if n <= 0:
                raise OSError(f"unexpected end of {self.root / tensor_file(t)}")
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
