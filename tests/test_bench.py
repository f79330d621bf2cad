"""The benchmark scripts run (their smoke sizes), so a refactor of the core cannot leave them
broken unnoticed: bench_core.py once called names that had moved to other modules."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT


def _bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)


def test_bench_core_quick_prints_its_ratios():
    proc = _bench("bench/bench_core.py", "--quick", "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "G/floor" in proc.stdout and "torchBN/floor" in proc.stdout and "speed-up" in proc.stdout, proc.stdout


def test_bench_solvers_quick_gives_a_verdict():
    proc = _bench("bench/bench_solvers.py", "--quick")
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdict = proc.stdout.rsplit("target (ResNet-20)", 1)[-1]
    assert any(v in verdict for v in ("-> met", "-> NOT met", "not comparable")), proc.stdout


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine runs the real benchmark")
def test_gpu_script_stops_at_once_without_cuda(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=120)
    if "cuda True" in proc.stdout:
        pytest.skip("torch sees a CUDA device here")
    assert proc.returncode == 2 and "needs a GPU" in proc.stderr, proc.stdout + proc.stderr
    assert not list((tmp_path / "out").glob("*.log"))  # no step ran
