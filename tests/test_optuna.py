"""Hydra's Optuna sweeper with this project (issue 15, item 8): `hydra/sweeper=optuna` composes with
`cluster=slurm` (the array size is a launcher key, not the basic sweeper's max_batch_size), and a
failed trial does not stop the study: the task returns None for a failed run in a multirun, which
the sweeper records as a FAIL trial while the job itself completed, so the study goes on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF_DIR, ROOT
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper",
                    reason="hydra-optuna-sweeper is not installed (pip install -e '.[optuna]')")


@pytest.mark.parametrize("cluster", ["slurm", "submitit_local", "local"])
def test_optuna_composes_with_every_cluster(cluster):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=[f"cluster={cluster}", "hydra/sweeper=optuna"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.pruning_launcher.")
    if cluster == "slurm":
        assert cfg.hydra.launcher.max_array_size == 500 and cfg.hydra.launcher.progress_interval_s == 60
    GlobalHydra.instance().clear()


def test_slurm_still_batches_the_basic_sweeper():
    """The basic sweeper is unchanged by cluster=slurm (one launch per sweep); the launcher splits."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True, overrides=["cluster=slurm"])
    assert cfg.hydra.sweeper.max_batch_size is None
    assert cfg.hydra.launcher.max_array_size == 500
    GlobalHydra.instance().clear()


def test_failed_trial_does_not_stop_the_study(tmp_path: Path, session_cache: Path):
    """Random sampler, seed 1: trials 0.5, 0.5 (a completed run: skipped, same value), 1.5 (fails on
    its config). Not the grid sampler: there a failure in the grid's last trial makes the sweeper
    raise (hydra-optuna-sweeper calls Study.stop outside an objective; README "Optuna")."""
    env = {**os.environ, "PRUNING_OUT_DIR": str(tmp_path / "out"), "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=random",
         "hydra.sweeper.sampler.seed=1", "hydra.sweeper.direction=maximize", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1",
         "sparsity=choice(1.5,0.5)", "progress=false", "sweep_name=optuna_fail",
         f"paths.cache_dir={session_cache}", "hydra.callbacks.report.enabled=false"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "Best parameters: {'sparsity': 0.5}" in out, out[-3000:]
    records = {json.loads(p.read_text())["index"]["sparsity"]: json.loads(p.read_text())["status"]
               for p in (tmp_path / "out" / "sweeps" / "optuna_fail").rglob("result.json")}
    assert records == {1.5: "failed", 0.5: "completed"}
