"""Shared measuring helpers of the benchmarks in bench/ (each script runs as `python3 bench/<x>.py`,
so this sibling module is importable as `benchlib`)."""

from __future__ import annotations

import gc
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESNET20_CHECKPOINT = ROOT.parent / "shared" / "data" / "resnet20-cifar10-12fca82f.th"


def rss() -> int:
    """Anonymous resident memory (RssAnon) in bytes: process memory proper; file-backed pages of
    memory maps live in the (reclaimable) page cache and are not counted."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Largest growth of the resident set over its value at entry, sampled every 2 ms."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20
