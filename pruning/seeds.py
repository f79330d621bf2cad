"""Named random streams: every draw of a run (calibration subset, noise, data order, a method's
randomness) comes from its own generator, seeded by (run seed, stream name), so changing one axis
(e.g. the noise level) never changes the draws of another (e.g. the calibration subset)."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, stream: str) -> int:
    """An independent 60-bit seed for `stream` of the run seeded `seed` (sha256 of "seed:stream")."""
    return int(hashlib.sha256(f"{seed}:{stream}".encode()).hexdigest()[:15], 16)


def generator(seed: int, stream: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator for `stream` (see `derive_seed`)."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, stream))
    return g
