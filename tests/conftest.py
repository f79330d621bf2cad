"""Shared fixtures: compose configs with Hydra's compose API (no launcher), tiny settings,
a session-wide cache so the dense digits MLP is trained once per test session."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

import pruning.hydra_conf  # noqa: F401 (the method and noise defaults conf/ composes from, as launch.py)

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# One intra-op thread for the whole suite: it runs many tiny models on a small CPU, where idle
# OpenMP threads only add contention (measured several times faster on 2 shared cores).
# Subprocesses (launch.py, Slurm jobs) inherit OMP_NUM_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def compose_config(overrides: list[str] | None = None, config_dir: Path = CONF_DIR,
                   config_name: str = "config") -> DictConfig:
    """Compose like `python launch.py <overrides>` would, without running anything."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []))


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_cfg(tmp_path: Path, session_cache: Path) -> Callable[..., DictConfig]:
    """make_cfg(*overrides) -> a composed config writing under tmp_path, with small settings."""

    def _make(*overrides: str) -> DictConfig:
        cfg = compose_config([
            f"paths.out_root={tmp_path / 'outputs'}",
            f"paths.data_dir={tmp_path / 'data'}",
            f"paths.cache_dir={session_cache}",
            "progress=false",
            "calibration.num_samples=64",
            *overrides,
        ])
        with open_dict(cfg):
            cfg.device = "cpu"
        return cfg

    return _make


@pytest.fixture
def shared_data() -> Path:
    return SHARED_DATA
