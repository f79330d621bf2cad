"""Logs where Hydra users look, and no silent CPU (issue 15 items 3 and 5): the run's console
output in `<run_dir>/launch.log`, tqdm only on a terminal, the device in the summary, and a loud
warning plus `env.device_fallback` when `device=auto` lands on CPU while a GPU was expected."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from pruning import device as device_mod
from pruning.errors import ConfigError
from pruning.logs import ConsoleHandler, show_progress
from pruning.task import run

ROOT = Path(__file__).resolve().parents[1]
FAST = "model.train.epochs=2"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of a machine without CUDA")


def _auto(cfg):
    with open_dict(cfg):
        cfg.device = "auto"  # make_cfg pins cpu
    return cfg


@no_cuda
def test_launch_log_holds_console_output_and_fallback_warning(tmp_path, session_cache):
    """A real `python launch.py` run (Hydra job logging): launch.log has the summary, the epoch
    lines and the warning; the console keeps its plain format (no logging prefixes, no tqdm `\\r`)."""
    out = tmp_path / "outputs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        [sys.executable, "launch.py", f"paths.out_root={out}", f"paths.cache_dir={session_cache}",
         f"paths.data_dir={tmp_path / 'data'}", FAST, "finetune=short", "finetune.epochs=1", "resources=gpu1",
         "calibration.num_samples=64"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    run_dir = next(out.glob("runs/**/result.json")).parent
    log = (run_dir / "launch.log").read_text()
    for text in ("device   cpu (", "accuracy dense", "sparsity target", f"record   {run_dir / 'result.json'}",
                 "finetune epoch 1:", "[WARNING] - device=auto fell back to CPU", "resources.gpus=1"):
        assert text in log, text
    assert proc.stdout.count("accuracy dense") == 1 and "accuracy dense" in proc.stdout  # printed once
    assert "[INFO]" not in proc.stdout and "finetune epoch 1:" in proc.stdout
    assert "warning: device=auto fell back to CPU although the job asked for resources.gpus=1" in proc.stderr
    assert "\r" not in proc.stderr  # no progress bars in a log file
    env_rec = json.loads((run_dir / "result.json").read_text())["env"]
    assert env_rec["device"].startswith("cpu (") and "resources.gpus=1" in env_rec["device_fallback"]


@no_cuda
def test_gpus_requested_but_cpu_is_a_warning_and_a_record_field(make_cfg, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    rec = run(_auto(make_cfg(FAST, "resources=gpu1")), tmp_path / "run")
    assert rec["status"] == "completed"
    assert "resources.gpus=1" in rec["env"]["device_fallback"]
    captured = capsys.readouterr()
    assert "warning: device=auto fell back to CPU" in captured.err
    assert "device   cpu (" in captured.out


@no_cuda
def test_no_fallback_warning_without_a_gpu_hint(make_cfg, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(device_mod.glob, "glob", lambda pattern: [])
    rec = run(_auto(make_cfg(FAST)), tmp_path / "run")
    assert rec["env"]["device_fallback"] is None and rec["env"]["device"].startswith("cpu (")
    assert "fell back" not in capsys.readouterr().err


def test_pick_device_reasons(monkeypatch):
    """Each hint of a GPU (request, CUDA_VISIBLE_DEVICES, torch's own warning) is named; an explicit
    device=cpu is the user's choice; device=cuda without CUDA stays a one-line error."""

    def unusable() -> bool:
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found version 10010)",
                      stacklevel=1)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", unusable)
    monkeypatch.setattr(device_mod.glob, "glob", lambda pattern: [])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert device_mod.pick_device("auto", 0) == (torch.device("cpu"), None)
    dev, why = device_mod.pick_device("auto", 2)
    assert dev == torch.device("cpu") and "resources.gpus=2" in why and "driver on your system is too old" in why
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    _, why = device_mod.pick_device("auto", 0)
    assert "CUDA_VISIBLE_DEVICES=0,1" in why and "\n" not in why
    assert device_mod.pick_device("cpu", 1) == (torch.device("cpu"), None)
    with pytest.raises(ConfigError, match=r"^device='cuda' cannot be used; allowed: .*no CUDA device") as err:
        device_mod.pick_device("cuda", 1)
    assert "\n" not in str(err.value)


def test_show_progress_only_on_a_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert show_progress(True) is False
    monkeypatch.setattr(sys, "stderr", Tty())
    assert show_progress(True) is True and show_progress(False) is False


def test_console_handler_format(capsys):
    """Plain info lines on stdout, `warning:`/`error:` prefixes on stderr (what print() gave before)."""
    import logging

    h = ConsoleHandler()
    for level, msg in ((logging.INFO, "hello"), (logging.WARNING, "careful"), (logging.ERROR, "broken")):
        h.handle(logging.LogRecord("pruning.x", level, __file__, 1, msg, None, None))
    captured = capsys.readouterr()
    assert captured.out == "hello\n" and captured.err == "warning: careful\nerror: broken\n"


def test_config_error_of_a_launch_is_in_its_log(tmp_path):
    out = tmp_path / "outputs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "launch.py", f"paths.out_root={out}", f"model.checkpoint={tmp_path / 'nope.pt'}",
         "device=cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: model.checkpoint=") and proc.stderr.count("\n") == 1
    log = next(out.glob("runs/**/launch.log")).read_text()
    assert "[ERROR] - model.checkpoint=" in log and "does not exist" in log


def test_describe_device(monkeypatch):
    assert device_mod.describe(torch.device("cpu")) == f"cpu ({torch.get_num_threads()} threads)"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: f"NVIDIA H200 #{index}")
    assert device_mod.describe(torch.device("cuda:1")) == "cuda:1 NVIDIA H200 #1"
