"""Inputs and outputs of a weight-space pruning step, shared by every method."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pruning.gradients import GradientMatrix
from pruning.layout import ParamLayout


@dataclass
class PruningProblem:
    """One pruning step: prune `w` (current weights) to a target sparsity.

    w_bar is the anchor of the local quadratic model (targets y = G w_bar): the dense weights in
    one-shot and multi-stage runs (SWAP), or the current weights when re-anchoring (CHITA++).
    """

    layout: ParamLayout
    w: torch.Tensor                      # (p,) current prunable weights
    w_bar: torch.Tensor                  # (p,) anchor weights
    mask: torch.Tensor                   # (p,) bool, current mask (all True when dense)
    grads: GradientMatrix | None = None  # G at w, when the method needs it
    generator: torch.Generator | None = None
    stage: int = 1
    num_stages: int = 1
    progress: bool = True                # show progress bars on long loops
    loss: Callable[[torch.Tensor, int], float] | None = None  # loss(w, n): mean training loss of the network
                                         # at prunable weights w on n training examples (0 = all)


@dataclass
class PruneResult:
    w: torch.Tensor                      # (p,) new weights, zero where pruned
    mask: torch.Tensor                   # (p,) bool
    info: dict[str, Any] = field(default_factory=dict)  # e.g. objective value, iterations


@dataclass
class TrainContext:
    """What a train-time method (gfs, grda, sdprun) needs: the model, its data and the run's knobs.

    `log(row)` appends a row to the run's metrics stream (and W&B when enabled); `evaluate()` gives
    test accuracy and loss of the current model. `checkpoint` (set by the task) lets a long
    training loop save and resume its state at epoch boundaries (`pruning.optim.train_loop`,
    through `pruning.train.fit`).
    """

    model: torch.nn.Module
    layout: ParamLayout
    data: Any                            # pruning.data.DataBundle
    device: torch.device
    sparsity: float
    generator: torch.Generator
    noise: Any                           # pruning.noise.NoiseModel (hook points)
    progress: bool = True
    log: Any = None                      # Callable[[dict], None]
    evaluate: Any = None                 # Callable[[], dict[str, float]]
    checkpoint: Any = None               # pruning.train.LoopCheckpoint: resume(phase, loader, *stateful) -> epoch,
                                         # save(phase, epoch, loader, *stateful) (pruning.checkpoint)
