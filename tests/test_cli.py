"""The real entry point in a subprocess (issue 2): bad input gives one line naming the key, the
bad value and what is allowed, a non-zero exit, and status `failed` where a run dir exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


def launch(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PRUNING_OUT_DIR": str(tmp_path / "out"), "PRUNING_DATA_DIR": str(tmp_path / "data"),
           "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), "progress=false", *overrides],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn" not in ln]


def test_unknown_group_option(tmp_path):
    proc = launch(tmp_path, "method=nosuchmethod")
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert "method" in lines[0] and "nosuchmethod" in lines[0] and "magnitude" in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("override", "key", "allowed"), [
    ("sparsity=1.5", "sparsity", "[0, 1)"),
    ("sparsity=-0.1", "sparsity", "[0, 1)"),
    ("calibration.num_samples=0", "calibration.num_samples", "positive integer"),
    ("model.checkpoint=/no/such/file.pt", "model.checkpoint", "existing"),
])
def test_bad_value_fails_cleanly(tmp_path, override, key, allowed):
    proc = launch(tmp_path, override)
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert key in lines[0] and override.split("=", 1)[1] in lines[0] and allowed in lines[0]
    assert "Traceback" not in proc.stderr
    records = list((tmp_path / "out").rglob("result.json"))
    assert len(records) == 1
    rec = json.loads(records[0].read_text())
    assert rec["status"] == "failed" and key in rec["error"]


def test_main_job_runs_then_skips(tmp_path):
    proc = launch(tmp_path, "sparsity=0.5")
    assert proc.returncode == 0, proc.stderr
    assert "accuracy dense" in proc.stdout
    rec = json.loads(next((tmp_path / "out").rglob("result.json")).read_text())
    assert rec["status"] == "completed" and rec["index"]["sparsity"] == 0.5
    assert "sparsity=0.5" in rec["run_dir"]
    again = launch(tmp_path, "sparsity=0.5")
    assert again.returncode == 0 and "skip" in again.stdout


def test_help_lists_groups_options_and_studies(tmp_path):
    """`launch.py --help` is this project's help (hydra.help.template in conf/config.yaml)."""
    proc = launch(tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("pruning-noise:") and "README.md" in out and "Powered by Hydra" not in out
    for group in ("method", "model", "dataset", "noise", "schedule", "cluster", "resources"):
        line = next((ln for ln in out.splitlines() if ln.startswith(f"{group}: ")), None)
        assert line is not None, out
        assert set(line.split(": ", 1)[1].split(", ")) == {p.stem for p in (ROOT / "conf" / group).glob("*.yaml")}
    studies = {p.stem for p in (ROOT / "sweeps").glob("*.yaml")}
    assert studies and all(s in out.replace("\n", " ") for s in studies), out
