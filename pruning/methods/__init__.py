"""Pruning methods: `method=<key>` selects `pruning/methods/<key>.py` through `pruning.registry.METHODS`
(the key list, each method's kind and whether it needs G, and the method contract `MethodSpec`).

A method module defines a frozen `Config` dataclass (its defaults are the method's defaults;
conf/method/<key>.yaml only adds comments) and its entry point: `prune(problem: PruningProblem,
sparsity, cfg) -> PruneResult` for a weight-space method, `run(ctx: TrainContext, cfg) -> PruneResult`
for a train-time one (gfs, grda, sdprun). Method modules import shared modules only, never each other.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from pruning.errors import ConfigError, closest
from pruning.methods.base import PruneResult, PruningProblem
from pruning.registry import METHODS, MethodSpec

__all__ = ["PruneResult", "PruningProblem", "available", "get", "kind", "make_config", "needs_gradients", "spec"]


def available() -> list[str]:
    """Method keys, in the registry's order."""
    return list(METHODS)


def spec(name: str) -> MethodSpec:
    """The registry entry of method `name`; ConfigError when unknown."""
    if name not in METHODS:
        raise ConfigError("method", name, ", ".join(METHODS))
    return METHODS[name]


def get(name: str) -> ModuleType:
    """The method's module (its `prune` or `run` is the registry's entry point)."""
    return importlib.import_module(spec(name).entry.module)


def make_config(name: str, params: Mapping[str, Any]) -> Any:
    """The method's Config from a mapping; unknown keys are an error naming what is allowed."""
    config = spec(name).config.load()
    fields = {f.name for f in dataclasses.fields(config)}
    data = {k: v for k, v in dict(params).items() if k != "name"}
    bad = sorted(set(data) - fields)
    if bad:
        near = closest(bad[0], fields)  # a typo: name the closest key first
        raise ConfigError(f"method.{bad[0]}", data[bad[0]], (f"did you mean method.{near}? " if near else "")
                          + "keys: " + (", ".join(sorted(fields)) or "(none)"), f"is not a key of method '{name}'")
    cfg = config(**data)
    cfg.validate()
    return cfg


def kind(name: str) -> str:
    """"weights" (a pruning step the schedule calls) or "train" (prunes while training)."""
    return spec(name).kind


def needs_gradients(name: str) -> bool:
    """Whether the run computes the gradient matrix G for this method."""
    return spec(name).needs_gradients
