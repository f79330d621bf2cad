"""The calibration step: the gradient matrix G of one pruning stage, with the noise model applied.

This is the one place where noise meets G. For stage t of a run seeded `seed`:

  1. draw the (N, m) calibration indices from the stream "calibration/<t>" (fresh per stage);
  2. read the examples a block at a time (`pruning.calibration.DatasetRows`) with the noise model's
     calibration-input hook applied per block (stream "noise/<t>/inputs/<block>");
  3. inside the noise model's calibration-weights context (stream "noise/<t>/weights"), build G
     through the disk cache (`pruning.gradients.build_gradient_matrix`), keyed by everything above;
  4. apply the noise model's gradient-row hook after the cache (stream "noise/<t>/gradients");
  5. refuse NaN/inf entries before any solver sees them.

Each hook has its own stream, so draws are paired across methods and noise settings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pruning.calibration import DatasetRows
from pruning.errors import ConfigError
from pruning.gradients import GradientMatrix, apply_row_noise, build_gradient_matrix, noise_cache_key
from pruning.layout import ParamLayout
from pruning.noise import NoiseModel
from pruning.seeds import derive_seed, generator

# dataset keys that cannot change the examples (how files are fetched or checked, loader settings)
DATA_KEYS_NOT_IN_EXAMPLES = ("download", "verify_checksums", "batch_size", "num_workers")


@dataclass
class Calibration:
    """Everything the calibration step reads, besides the model: plain values, no Hydra."""

    calibration: Mapping[str, Any]   # the run's `calibration` section
    dataset: Mapping[str, Any]       # the run's `dataset` section (part of G's cache key)
    cache_dir: Path | None           # where G is cached (None: no cache)
    seed: int
    device: torch.device
    num_workers: int = 0
    progress: bool = True
    warn: Callable[[str], None] | None = None


def calibration_indices(pool: int, num_samples: int, mini_batch: int, seed: int, stage: int) -> torch.Tensor:
    """(N, m) example indices from the stream "calibration/<stage>": without replacement when the
    pool is large enough, else with replacement."""
    n = num_samples * mini_batch
    g = generator(seed, f"calibration/{stage}")
    idx = torch.randperm(pool, generator=g)[:n] if n <= pool else torch.randint(pool, (n,), generator=g)
    return idx.view(num_samples, mini_batch)


def calibration_rows(c: Calibration, calib_set: Any, model: torch.nn.Module, noise: Any, stage: int) -> DatasetRows:
    """The calibration examples of `stage`, read a block at a time while G is built (the N x m
    inputs are never all in memory), with the noise model's input hook applied per block."""
    cal = c.calibration
    key: dict[str, Any] = {"dataset": {k: v for k, v in dict(c.dataset).items() if k not in DATA_KEYS_NOT_IN_EXAMPLES},
                           "size": len(calib_set)}
    prepare = None
    if noise is not None and type(noise).calibration_inputs is not NoiseModel.calibration_inputs:
        seed = c.seed

        def prepare(x: torch.Tensor, y: torch.Tensor, block: int) -> torch.Tensor:
            return noise.calibration_inputs(model, x, y, generator(seed, f"noise/{stage}/inputs/{block}"))

        key["input_noise"] = {"noise": noise.record(), "draw": derive_seed(c.seed, f"noise/{stage}/inputs")}
    idx = calibration_indices(len(calib_set), int(cal["num_samples"]), int(cal["mini_batch"]), c.seed, stage)
    workers = c.num_workers if cal.get("num_workers") is None else int(cal["num_workers"])
    return DatasetRows(calib_set, idx, key=key, prepare=prepare, device=c.device, num_workers=workers)


def gradient_matrix(c: Calibration, calib_set: Any, model: torch.nn.Module, layout: ParamLayout,
                    mask: torch.Tensor, noise: Any, stage: int) -> GradientMatrix:
    """G of stage `stage` at the model's current weights, noise applied (steps 1-5 above)."""
    rows = calibration_rows(c, calib_set, model, noise, stage)
    try:
        with noise.calibration_weights(model, layout, mask, generator(c.seed, f"noise/{stage}/weights")):
            # blocked G through the disk cache, keyed inside the weight-noise context
            G = build_gradient_matrix(model, layout, rows, None, rows.indices, c.calibration,
                                      cache_dir=c.cache_dir, seed=c.seed,
                                      key_extra=noise_cache_key(noise, derive_seed(c.seed, f"noise/{stage}/weights")),
                                      progress=c.progress, warn=c.warn)
    finally:
        rows.close()
    G = apply_row_noise(G, noise, generator(c.seed, f"noise/{stage}/gradients"))  # after the cache
    check_finite(G, stage, noise)
    return G


def check_finite(G: GradientMatrix, stage: int, noise: Any = None) -> None:
    """NaN/inf in G (an overflowing loss, a noise setting) would make every solver return NaN
    weights: stop before solving. One pass over G's blocks (a read of G in stream mode)."""
    bad = 0
    for b in range(len(G.blocks)):
        block = G.block(b)
        bad += int(block.numel() - int(torch.isfinite(block).sum()))
    if bad:
        what = f", noise {noise.record()}" if noise is not None and noise.kind != "none" else ""
        raise ConfigError("calibration", f"G of stage {stage} ({G.num_rows} x {G.num_cols}{what})",
                          "finite gradients (check the dense weights, noise.* and the data)",
                          f"has {bad} NaN/inf entries")
