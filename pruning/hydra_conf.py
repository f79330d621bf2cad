"""Hydra's view of the method and noise defaults: each `Config` dataclass (the one place a default
lives) is registered with Hydra's ConfigStore, and conf/<group>/<key>.yaml starts from it:

  # conf/method/lr.yaml
  defaults:
    - /method_lr@_here_     # pruning/methods/lr.py: Config (registered here)
    - _self_
  name: lr

Registered names (root level, so they are not options of a group): `method_<key>` for every key of
`pruning.registry.METHODS`, `noise_<key>` for every key of `pruning.registry.NOISE`. Each node is a
plain dict (`dataclasses.asdict` plus `name` / `kind`), not a structured config: OmegaConf does no type
checks of its own, so a bad value or a typo still gets our one-line ConfigError (`make_config`,
`pruning.noise.parse_config`), and submitit jobs, which unpickle Hydra's ConfigStore, import nothing
from here. Importing this module registers the nodes (launch.py, `pruning.config._compose_base`,
tests/conftest.py); the core never imports it, so it stays Hydra-free.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hydra.core.config_store import ConfigStore

from pruning.registry import METHODS, NOISE


def method_node(key: str) -> dict[str, Any]:
    """`name` and the defaults of method `key` (its Config dataclass), as plain values."""
    return {"name": key, **dataclasses.asdict(METHODS[key].config.load()())}


def noise_node(key: str) -> dict[str, Any]:
    """`kind` and the defaults of noise model `key` (its Config dataclass, if it has one)."""
    config = NOISE[key].config
    return {"kind": key, **(dataclasses.asdict(config.load()()) if config is not None else {})}


def register() -> None:
    """Store every method's and noise model's defaults in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    for key in METHODS:
        cs.store(name=f"method_{key}", node=method_node(key), provider="pruning")
    for key in NOISE:
        cs.store(name=f"noise_{key}", node=noise_node(key), provider="pruning")


register()
