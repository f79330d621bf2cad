"""The gradient matrix G of the Fisher/OBS family (algorithms.md section 1).

Row i of G is the gradient of the mean loss over one "fisher mini-batch" of m examples, over the
prunable weights, at the current weights (model in eval mode). G is held as column blocks
(`ParamLayout.blocks(B)`: one per prunable tensor, tensors larger than B cut into chunks of at
most B), in memory or on disk, and never as one dense N x p matrix by the builder.

  storage.py   the on-disk format: `BlockStore` (one (N, p_t) float32 .npy per tensor, digests)
  operator.py  `GradientOperator`, the protocol solvers use, and `GradientMatrix` (G as blocks),
               `DenseOperator`, `ColumnView`
  compute.py   rows of G with torch.func (vmap of grad), in memory or streamed to a store
  cache.py     `CalibrationSettings` (the `calibration` section), the disk cache (keys, atomic
               entries, verification) and `build_gradient_matrix`

Noise never enters here: `pruning.calibrate` is the one place where the noise model meets G.
"""

from pruning.gradients.cache import (
    CACHE_VERSION,
    CalibrationSettings,
    CorruptCache,
    build_gradient_matrix,
    cache_key,
    load_gradient_matrix,
    save_gradient_matrix,
    weights_hash,
)
from pruning.gradients.compute import (
    STREAM_CHUNK_MB,
    STREAM_COLS,
    LossFn,
    affine_batchnorm,
    as_rows,
    compute_gradient_matrix,
    compute_gradients,
    nonfinite_entries,
    release_heap,
    stream_groups,
)
from pruning.gradients.operator import (
    RESIDENT_MB,
    ColumnView,
    DenseOperator,
    GradientMatrix,
    GradientOperator,
    split_blocks,
)
from pruning.gradients.storage import BlockStore

__all__ = [
    "CACHE_VERSION", "RESIDENT_MB", "STREAM_CHUNK_MB", "STREAM_COLS",
    "BlockStore", "CalibrationSettings", "ColumnView", "CorruptCache", "DenseOperator", "GradientMatrix",
    "GradientOperator", "LossFn",
    "affine_batchnorm", "as_rows", "build_gradient_matrix", "cache_key", "compute_gradient_matrix",
    "compute_gradients", "load_gradient_matrix", "nonfinite_entries", "release_heap", "save_gradient_matrix", "split_blocks",
    "stream_groups", "weights_hash",
]
