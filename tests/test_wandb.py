"""W&B mirror of a run (issue 8): real offline run files through `pruning.task.run`, a
deterministic id that a re-entered run directory resumes, and W&B failures that only warn.

The `.wandb` transaction log is protobuf without compression, so the keys and values we log
appear in it verbatim; the tests check those bytes instead of mocking wandb.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pruning.errors import ConfigError
from pruning.task import run
from pruning.tracking import Tracker, WandbTracker, build_tracker, run_label, wandb_config

# a 2-epoch dense model (cached for the session): these tests check plumbing, not accuracy
FAST = "model.train.epochs=2"


def _wandb_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def _flushed(path: Path, marker: bytes = b"time/total", timeout: float = 30.0) -> bytes:
    """The transaction log once written: wandb's core service writes it shortly after finish()."""
    deadline = time.monotonic() + timeout
    previous = b""
    while True:
        blob = path.read_bytes()
        if marker in blob and blob == previous:
            return blob
        if time.monotonic() > deadline:
            return blob
        previous = blob
        time.sleep(0.3)


def test_offline_run_writes_real_wandb_files(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg(FAST, "logger=wandb", "finetune=short", "finetune.epochs=1", "sweep_name=wbtest")
    assert cfg.logger.mode == "offline"  # the default follows WANDB_MODE
    run_dir = tmp_path / "run"
    rec = run(cfg, run_dir)
    assert rec["status"] == "completed"
    files = _wandb_files(run_dir)
    assert len(files) == 1, files
    run_id = rec["run_id"]
    assert files[0].name == f"run-{run_id}.wandb"
    blob = _flushed(files[0])
    expected = [
        run_id, "wbtest", "magnitude-s0.9-seed0",          # id, group, name
        "noise_level", "cfg", '"hidden":[128,64]',          # flat index keys + resolved config
        "dense/acc", "prune/acc", "prune/sparsity", "prune/loss", "finetune/acc", "final/acc",  # history
        "final_acc", "finetuned_acc", "time/total", '"completed"',  # summary
    ]
    for text in expected:
        assert text.encode() in blob, text


def test_rerun_in_same_dir_resumes_same_wandb_id(make_cfg, tmp_path, monkeypatch):
    """A requeued job re-enters its run directory: same W&B id (resume="allow"), new offline folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    first = run(make_cfg(FAST, "logger=wandb", "sparsity=0.5"), run_dir)
    second = run(make_cfg(FAST, "logger=wandb", "sparsity=0.5", "resume=false"), run_dir)
    assert first["run_id"] == second["run_id"] and second["attempt"] == 2
    files = _wandb_files(run_dir)
    assert len(files) == 2
    assert {f.name for f in files} == {f"run-{first['run_id']}.wandb"}


def test_wandb_init_failure_only_warns(make_cfg, tmp_path, monkeypatch, capsys):
    """An invalid project name makes the real wandb.init raise; the run still completes."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg(FAST, "logger=wandb", "logger.project=bad/project")
    rec = run(cfg, tmp_path / "run")
    assert rec["status"] == "completed"
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "completed"
    err = capsys.readouterr().err
    assert "warning: W&B init failed" in err and "project" in err
    assert not _wandb_files(tmp_path / "run")


def test_wandb_init_exception_only_warns(make_cfg, tmp_path, monkeypatch, capsys):
    import wandb

    def boom(*args, **kwargs):
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(wandb, "init", boom)
    rec = run(make_cfg(FAST, "logger=wandb", "logger.mode=online"), tmp_path / "run")
    assert rec["status"] == "completed"
    assert "network unreachable" in capsys.readouterr().err


def test_failed_run_still_finishes_wandb_run(make_cfg, tmp_path, monkeypatch):
    """A run that fails after the W&B run started finishes it (exit code 1, status failed)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg(FAST, "logger=wandb", f"model.checkpoint={tmp_path / 'nope.pt'}")
    with pytest.raises(ConfigError):
        run(cfg, tmp_path / "run")
    rec = json.loads((tmp_path / "run" / "result.json").read_text())
    assert rec["status"] == "failed"
    files = _wandb_files(tmp_path / "run")
    assert len(files) == 1
    blob = _flushed(files[0], marker=b'"failed"')
    assert b'"failed"' in blob and b"does not exist" in blob  # summary status and error


def test_build_tracker_modes():
    assert type(build_tracker({"name": "local"})) is Tracker
    assert type(build_tracker({"name": "wandb", "mode": "disabled"})) is Tracker  # no wandb import needed
    assert isinstance(build_tracker({"name": "wandb", "mode": "offline"}), WandbTracker)
    with pytest.raises(ConfigError, match="logger.mode='offlne'.*online, offline, disabled"):
        build_tracker({"name": "wandb", "mode": "offlne"})
    with pytest.raises(ConfigError, match="allowed: local, wandb"):
        build_tracker({"name": "tensorboard"})


def test_run_label_and_config():
    index = {"model": "mlp", "dataset": "digits", "method": "swap", "schedule": "oneshot",
             "noise": "gradient", "noise_level": 1.0, "sparsity": 0.95, "seed": 3, "sweep": "s1"}
    assert run_label(index) == "swap-s0.95-gradient1-seed3"
    assert run_label({**index, "noise": "none", "schedule": "gradual"}) == "swap-s0.95-gradual-seed3"
    flat = wandb_config({"index": index, "run_id": "abc", "overrides": ["method=swap"]},
                        {"model": {"name": "mlp"}, "sparsity": 0.95})
    assert flat["model"] == "mlp" and flat["method"] == "swap" and flat["noise_level"] == 1.0
    assert flat["cfg"] == {"model": {"name": "mlp"}, "sparsity": 0.95}
    assert flat["run_id"] == "abc" and flat["overrides"] == ["method=swap"]
