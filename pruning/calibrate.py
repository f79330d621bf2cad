"""The calibration step: the gradient matrix G of one pruning stage, with the noise model applied.

This is the one place where noise meets G. For stage t of a run seeded `seed`:

  1. draw the (N, m) calibration indices from the stream "calibration/<t>" (fresh per stage);
  2. read the examples a block at a time (`pruning.calibration.DatasetRows`) with the noise model's
     calibration-input hook applied per block (stream "noise/<t>/inputs/<block>");
  3. inside the noise model's calibration-weights context (stream "noise/<t>/weights"), build G
     through the disk cache (`pruning.gradients.build_gradient_matrix`), keyed by everything above
     (with `calibration.cache_stages: first`, the default, only stage 1 is cached: later stages
     see weights that this job's own pruning made, which no other job reaches, so caching them
     only filled the disk -- 1.3 GB per stage for MLPNet at N = 10,000);
  4. apply the noise model's gradient-row hook after the cache (stream "noise/<t>/gradients");
  5. refuse NaN/inf entries before any solver sees them.

Each hook has its own stream, so draws are paired across methods and noise settings. Which hooks
run is what the noise model declares in `ACTS_ON` ("inputs" step 2, "weights" step 3,
"gradient_rows" step 4); `pruning.gradients` never sees the noise model. Step 5 costs no pass
over G: the builder counts NaN/inf entries while it writes G (or verifies a cached entry), and
the row-noise step while it writes the noisy rows.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pruning.calibration import DatasetRows
from pruning.errors import ConfigError
from pruning.gradients import (
    BlockStore,
    CalibrationSettings,
    GradientMatrix,
    build_gradient_matrix,
    nonfinite_entries,
)
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


def acts_on(noise: NoiseModel | None, what: str) -> bool:
    """Whether the noise model declares that it acts on `what` (a key of `pruning.noise.HOOKS`)."""
    return noise is not None and what in noise.ACTS_ON


def calibration_rows(c: Calibration, cal: CalibrationSettings, calib_set: Any, model: torch.nn.Module,
                     noise: NoiseModel | None, stage: int) -> DatasetRows:
    """The calibration examples of `stage`, read a block at a time while G is built (the N x m
    inputs are never all in memory), with the noise model's input hook applied per block."""
    key: dict[str, Any] = {"dataset": {k: v for k, v in dict(c.dataset).items() if k not in DATA_KEYS_NOT_IN_EXAMPLES},
                           "size": len(calib_set)}
    prepare = None
    if acts_on(noise, "inputs"):
        seed = c.seed

        def prepare(x: torch.Tensor, y: torch.Tensor, block: int) -> torch.Tensor:
            return noise.calibration_inputs(model, x, y, generator(seed, f"noise/{stage}/inputs/{block}"))

        key["input_noise"] = {"noise": noise.record(), "draw": derive_seed(c.seed, f"noise/{stage}/inputs")}
    idx = calibration_indices(len(calib_set), cal.num_samples, cal.mini_batch, c.seed, stage)
    workers = c.num_workers if cal.num_workers is None else cal.num_workers
    return DatasetRows(calib_set, idx, key=key, prepare=prepare, device=c.device, num_workers=workers)


def noise_cache_key(noise: NoiseModel | None, stream_seed: int) -> Any:
    """The part of G's cache key owed to the noise model's weight hook.

    Input noise is covered by hashing the inputs and in-place weight noise by hashing the weights;
    a model that acts on the weights may perturb the forward pass some other way (hooks), so its
    parameters and the draw's seed join the key. None for every other model, so that e.g. all
    gradient-noise levels share one cached G.
    """
    if not acts_on(noise, "weights"):
        return None
    return {"noise": noise.record(), "draw": int(stream_seed)}


def gradient_matrix(c: Calibration, calib_set: Any, model: torch.nn.Module, layout: ParamLayout,
                    mask: torch.Tensor, noise: NoiseModel | None, stage: int) -> GradientMatrix:
    """G of stage `stage` at the model's current weights, noise applied (steps 1-5 above)."""
    cal = CalibrationSettings.parse(c.calibration)  # checked once, used by steps 1-3
    if stage > 1 and cal.cache_stages == "first":
        cal = replace(cal, cache=False)
    rows = calibration_rows(c, cal, calib_set, model, noise, stage)
    weights = (noise.calibration_weights(model, layout, mask, generator(c.seed, f"noise/{stage}/weights"))
               if acts_on(noise, "weights") else contextlib.nullcontext())
    try:
        with weights:  # blocked G through the disk cache, keyed inside the weight-noise context
            G = build_gradient_matrix(model, layout, rows, None, rows.indices, cal,
                                      cache_dir=c.cache_dir, seed=c.seed,
                                      key_extra=noise_cache_key(noise, derive_seed(c.seed, f"noise/{stage}/weights")),
                                      progress=c.progress, warn=c.warn)
    finally:
        rows.close()
    G = apply_row_noise(G, noise, generator(c.seed, f"noise/{stage}/gradients"))  # after the cache
    check_finite(G, stage, noise)
    return G


def apply_row_noise(G: GradientMatrix, noise: NoiseModel | None, gen: torch.Generator,
                    chunk_rows: int | None = None) -> GradientMatrix:
    """G after the noise model's gradient-row hook (G itself when the model does not act on rows).

    The hook sees dense rows: all N rows at once in memory mode (the same draws as on a dense G);
    in stream mode (G on disk) chunks of `chunk_rows` rows, written to a fresh scratch store, so
    the memory bound holds (rows are independent in every row-noise model; the draws then differ
    from the in-memory mode). The result has no cache entry (G's cached factorisations do not
    apply to it) and its NaN/inf entries counted.
    """
    if not acts_on(noise, "gradient_rows"):
        return G
    if not G.on_disk:
        noisy = noise.gradients(G.dense(), gen)
        bad = nonfinite_entries(noisy)
        return replace(G, data=[noisy[:, sl].contiguous() for sl in G.blocks], entry=None, nonfinite=bad)
    p, n = G.num_cols, G.num_rows
    step = chunk_rows or max(1, (1 << 24) // max(p, 1))
    root = Path(tempfile.mkdtemp(prefix="grads-noise-"))
    try:
        store = BlockStore.create(root, G.store.sizes, n, digest=False)
        starts = np.cumsum((0,) + G.store.sizes)
        for s in range(0, n, step):
            rows = noise.gradients(G.rows(s, min(s + step, n)).float(), gen).detach().float().cpu().numpy()
            for t in range(len(store.sizes)):
                store.write_rows(t, s, rows[:, starts[t]:starts[t + 1]])  # counts NaN/inf as it writes
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the store keeps its files open
    return GradientMatrix.from_store(store, G.blocks, G.indices, key=G.key, device=G.device, dtype=G.dtype,
                                     max_resident_bytes=G.max_resident_bytes)


def check_finite(G: GradientMatrix, stage: int, noise: NoiseModel | None = None) -> None:
    """NaN/inf in G (an overflowing loss, a noise setting) would make every solver return NaN
    weights: stop before solving. Uses the count taken while G was written (`G.nonfinite`); one
    pass over G's blocks only when nothing counted them."""
    bad = G.nonfinite
    if bad is None:
        bad = sum(nonfinite_entries(G.block(b)) for b in range(len(G.blocks)))
    if bad:
        what = f", noise {noise.record()}" if noise is not None and noise.kind != "none" else ""
        raise ConfigError("calibration", f"G of stage {stage} ({G.num_rows} x {G.num_cols}{what})",
                          "finite gradients (check the dense weights, noise.* and the data)",
                          f"has {bad} NaN/inf entries")
