"""Registry of pruning methods: `method=<key>` selects `pruning/methods/<key>.py` and
`conf/method/<key>.yaml` (the YAML's keys, minus `name`, are the fields of the module's `Config`).

Keys:
  magnitude   global or layer-wise magnitude pruning (baseline)
  woodfisher  WoodFisher: block empirical-Fisher OBS (Singh & Alistarh, NeurIPS 2020)
  cbs         Combinatorial Brain Surgeon (Yu et al., ICML 2022)
  lr          CHITA-style sparse linear regression by IHT (Benbaki et al., ICML 2023)
  swap        SWAP: entropic Wasserstein regression (You & Cheng, ICLR 2024)
  gfs         Greedy Forward Selection (Ye et al., ICML 2020)
  grda        gRDA directional pruning (Chao et al., NeurIPS 2020)
  sdprun      structured directional pruning (Li et al., 2021)

A weight-space method module defines:
  Config                 frozen dataclass of its hyperparameters (defaults = the reference's)
  NEEDS_GRADIENTS: bool  whether `problem.grads` (the matrix G) must be provided
  prune(problem: PruningProblem, sparsity: float, cfg: Config) -> PruneResult
A train-time method (gfs, grda, sdprun) sets KIND = "train" and defines
  run(ctx: TrainContext, cfg: Config) -> PruneResult
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from pruning.errors import ConfigError, closest
from pruning.methods.base import PruneResult, PruningProblem

__all__ = ["PruneResult", "PruningProblem", "available", "get", "make_config"]

_KEYS = ("magnitude", "woodfisher", "cbs", "lr", "swap", "gfs", "grda", "sdprun")


def available() -> list[str]:
    """Keys whose module is present."""
    out = []
    for k in _KEYS:
        if importlib.util.find_spec(f"pruning.methods.{k}") is not None:
            out.append(k)
    return out


def get(name: str) -> ModuleType:
    if name not in available():
        raise ConfigError("method", name, ", ".join(available()))
    return importlib.import_module(f"pruning.methods.{name}")


def make_config(name: str, params: Mapping[str, Any]) -> Any:
    """The method's Config from a mapping; unknown keys are an error naming what is allowed."""
    module = get(name)
    fields = {f.name for f in dataclasses.fields(module.Config)}
    data = {k: v for k, v in dict(params).items() if k != "name"}
    bad = sorted(set(data) - fields)
    if bad:
        near = closest(bad[0], fields)  # a typo: name the closest key first
        raise ConfigError(f"method.{bad[0]}", data[bad[0]], (f"did you mean method.{near}? " if near else "")
                          + "keys: " + (", ".join(sorted(fields)) or "(none)"), f"is not a key of method '{name}'")
    cfg = module.Config(**data)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def kind(name: str) -> str:
    return getattr(get(name), "KIND", "weights")


def needs_gradients(name: str) -> bool:
    return bool(getattr(get(name), "NEEDS_GRADIENTS", False))
