"""Schedules: WHEN a run prunes. `schedule=<name>` (conf/schedule/<name>.yaml) selects a module here.

Keys:
  oneshot     prune once to the target (CBS, CHITA tables)                       oneshot.py
  multistage  T stages on the cubic schedule, G recomputed each stage, targets    multistage.py
              anchored to the dense weights, optional fine-tuning per stage (SWAP)
  gradual     prune inside training on the cubic schedule over epochs            gradual.py
              (Zhu & Gupta 2017; WoodFisher's protocol)
A train-time method (`methods.kind(name) == "train"`: gfs, grda, sdprun) brings its own training
and sparsity schedule: it runs through `train_time.py`, and only with `schedule=oneshot` (the
default); another schedule with it is a ConfigError at validation time, before data is loaded.

`gradual` and `multistage` accept every weight-space method, G-free ones included: with
`method=magnitude` gradual is the classic gradual magnitude pruning of Zhu & Gupta, and
multistage is iterative magnitude pruning on the same cubic schedule.

A schedule module defines:
  validate(cfg) -> None            its keys, before any data is loaded (ConfigError)
  run(job, target: float) -> None  the prune stage: prune the job's state to `target`, record
                                   each step (`pruning.schedules.step`), save boundaries
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from pruning import methods
from pruning.errors import ConfigError

_MODULES = {
    "oneshot": "pruning.schedules.oneshot",
    "multistage": "pruning.schedules.multistage",
    "gradual": "pruning.schedules.gradual",
}
TRAIN_TIME = "pruning.schedules.train_time"


def available() -> list[str]:
    return list(_MODULES)


def get(name: str) -> ModuleType:
    if name not in _MODULES:
        raise ConfigError("schedule.name", name, ", ".join(available()))
    return importlib.import_module(_MODULES[name])


def select(cfg: Any) -> ModuleType:
    """The module that runs the prune stage of `cfg`: the train-time path for a train-time method,
    else the schedule named by `schedule.name`."""
    if methods.kind(cfg.method.name) == "train":
        return importlib.import_module(TRAIN_TIME)
    return get(cfg.schedule.name)


def validate(cfg: Any) -> None:
    """The schedule's keys and its combination with the method (task=prune), before data loads."""
    name = cfg.schedule.name
    module = get(name)
    if methods.kind(cfg.method.name) == "train" and name != "oneshot":
        raise ConfigError("schedule", name, "oneshot (the default) with a train-time method",
                          f"cannot drive method={cfg.method.name}, which trains and sparsifies on its own "
                          "schedule (its epochs, lr and threshold are method.* keys)")
    module.validate(cfg)
