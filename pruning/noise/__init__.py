"""Noise models: one axis of a study, selected as `noise=<kind>` (config group `noise`).

Keys:
  none         no perturbation
  gradient     noise on the rows of G (SWAP's entry noise; outlier samples)
  analog       phase-change-memory weight perturbation (programming, drift, read noise)
  adversarial  FGSM / PGD inputs (calibration and/or evaluation)

A noise model acts at up to four hook points of a run, each with its own generator derived from
the run seed (paired draws: methods compared in one sweep see the same noise for one seed):
  calibration_inputs(model, x, y, gen) -> x          inputs used to compute G
  calibration_weights(model, layout, mask, gen)      context manager: weights used to compute G
  gradients(G, gen) -> G                             rows of the gradient matrix
  evaluate(model, data, layout, mask, device, gen)   extra metrics of the final model
`record()` returns its parameters for the run record; `level` is its main level for the index.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from pruning.errors import ConfigError

_MODULES = {
    "none": "pruning.noise",
}


class NoiseModel:
    """The identity at every hook point (`noise=none`); subclasses override what they perturb."""

    kind = "none"

    @property
    def level(self) -> float:
        return 0.0

    def calibration_inputs(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                           gen: torch.Generator) -> torch.Tensor:
        return x

    @contextlib.contextmanager
    def calibration_weights(self, model: nn.Module, layout: Any, mask: torch.Tensor,
                            gen: torch.Generator) -> Iterator[None]:
        yield

    def gradients(self, G: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return G

    def evaluate(self, model: nn.Module, data: Any, layout: Any, mask: torch.Tensor,
                 device: torch.device, gen: torch.Generator, batch_size: int = 512) -> dict[str, Any]:
        return {}

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind}


def build(cfg: Mapping[str, Any]) -> NoiseModel:
    kind = cfg.get("kind", "none")
    if kind == "none":
        return NoiseModel()
    if kind not in _MODULES:
        raise ConfigError("noise", kind, ", ".join(sorted(_MODULES)))
    module = importlib.import_module(_MODULES[kind])
    return module.build(cfg)
