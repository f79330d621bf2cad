"""Sweep progress (issue 15, item 4): `job k/N` lines with elapsed time and an ETA when jobs run
one after another (cluster=local), and pending/running/completed/failed counts from submitit job
states while a launcher waits for an array (cluster=slurm, cluster=submitit_local)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT
from test_slurm import slurm_cluster  # noqa: F401  (the fixture: a reachable Slurm cluster, else skip)

from pruning.launcher import JobProgress, counts_line, fmt_duration, job_category, wait_with_progress


def test_fmt_duration():
    assert [fmt_duration(s) for s in (0, 42.4, 60, 185, 3600, 7620)] == ["0s", "42s", "1m00s", "3m05s",
                                                                         "1h00m", "2h07m"]


def test_eta_is_mean_time_per_finished_job_times_remaining():
    p = JobProgress(total=10, finished=0, started=100.0)
    assert p.line(1, now=100.0) == "job 1/10  elapsed 0s  ETA -"
    p.finished = 4
    # 120 s for 4 jobs: 30 s each, 6 to go
    assert p.line(5, now=220.0) == f"job 5/10  elapsed 2m00s  ETA {fmt_duration(30.0 * 6)}"


@pytest.mark.parametrize(("state", "has_result", "category"), [
    ("PENDING", False, "pending"), ("REQUEUED", False, "pending"), ("UNKNOWN", False, "pending"),
    ("RUNNING", False, "running"), ("COMPLETING", False, "running"),
    ("COMPLETED", True, "completed"), ("COMPLETED", False, "completed"), ("FINISHED", True, "completed"),
    ("RUNNING", True, "completed"), ("FINISHED", False, "failed"),
    ("CANCELLED by 1000", False, "failed"), ("OUT_OF_MEMORY", False, "failed"), ("TIMEOUT", False, "failed"),
    ("INTERRUPTED", False, "failed"), ("NODE_FAIL", False, "failed"),
])
def test_job_category(state, has_result, category):
    assert job_category(state, has_result) == category


def test_counts_line():
    counts = Counter(pending=1, running=4, completed=2, failed=1)
    assert counts_line("slurm 1234", counts, 8, 125.0) == \
        "slurm 1234: 8 jobs: 1 pending, 4 running, 2 completed, 1 failed (elapsed 2m05s)"


def test_counts_from_real_local_executor_jobs(tmp_path: Path):
    """Real submitit LocalExecutor jobs: one returns, one dies on a signal (the local executor's
    INTERRUPTED, like a killed Slurm job); the lines follow their states to 1 completed, 1 failed."""
    submitit = pytest.importorskip("submitit")
    executor = submitit.LocalExecutor(folder=str(tmp_path / "%j"))
    executor.update_parameters(timeout_min=5)
    jobs = [executor.submit(sum, [1, 2]), executor.submit(os.abort)]
    lines: list[str] = []
    wait_with_progress(jobs, "local", interval_s=0.01, out=lines.append, poll_s=0.05)
    assert lines, "no progress line"
    assert all(re.fullmatch(r"local: 2 jobs: \d pending, \d running, \d completed, \d failed \(elapsed \S+\)",
                            ln) for ln in lines), lines
    assert lines[-1].startswith("local: 2 jobs: 0 pending, 0 running, 1 completed, 1 failed"), lines
    assert len(lines) == len(set(ln.split(" (")[0] for ln in lines)), "a line without a change in counts"
    assert jobs[0].result() == 3


def test_interval_limits_lines(tmp_path: Path):
    """With an interval longer than the jobs take, only the first and the final counts are printed."""
    submitit = pytest.importorskip("submitit")
    executor = submitit.LocalExecutor(folder=str(tmp_path / "%j"))
    executor.update_parameters(timeout_min=5)
    jobs = [executor.submit(sum, [1, 2]), executor.submit(sum, [3, 4])]
    lines: list[str] = []
    wait_with_progress(jobs, "local", interval_s=3600, out=lines.append, poll_s=0.05)
    assert 1 <= len(lines) <= 2 and "2 completed" in lines[-1], lines


def test_local_multirun_prints_job_k_of_n_with_eta(tmp_path: Path):
    """cluster=local through the real entry point. The jobs fail on their config (no training), which
    is enough for the launcher's lines."""
    env = {**os.environ, "PRUNING_OUT_DIR": str(tmp_path / "out"), "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "-m", "progress=false", "sweep_name=prog",
                           "sparsity=1.5,1.6,1.7", "hydra.callbacks.report.enabled=false"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr  # every job failed on its config: the launcher exits 2
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("job ")]
    assert [ln.split("  ")[0] for ln in lines] == ["job 1/3", "job 2/3", "job 3/3"], proc.stdout
    assert re.fullmatch(r"job 1/3  elapsed \S+  ETA -", lines[0])
    assert all(re.fullmatch(r"job \d/3  elapsed \d\S*  ETA \d\S*", ln) for ln in lines[1:]), lines


def test_submitit_local_sweep_prints_job_counts(tmp_path: Path, session_cache: Path):
    """cluster=submitit_local goes through the same launcher as cluster=slurm: after `submitted`,
    count lines until every job is over (two digits runs; the dense model from the session cache)."""
    env = {**os.environ, "PRUNING_OUT_DIR": str(tmp_path / "out"), "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "-m", "cluster=submitit_local",
                           "progress=false", "sweep_name=prog_local", "sparsity=0.5,0.6", f"paths.cache_dir={session_cache}",
                           "hydra.launcher.progress_interval_s=0.5", "hydra.callbacks.report.enabled=false"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("submitted 2 job(s) (local "))
    counts = [ln for ln in lines[start + 1:] if re.match(r"local \d+: 2 jobs: ", ln)]
    assert counts and counts[-1].startswith(counts[-1].split(":")[0] + ": 2 jobs: 0 pending, 0 running, 2 completed, "
                                            "0 failed"), proc.stdout


@pytest.mark.slurm
def test_slurm_sweep_prints_job_counts_per_array(slurm_cluster, tmp_path: Path):  # noqa: F811
    """A real Slurm cluster (fixture of tests/test_slurm.py): three jobs, at most two per array, so
    two arrays in turn, each followed by count lines from sacct that end with every job over."""
    from test_slurm import _finish, _launch

    out = slurm_cluster.work_dir / "progress" if slurm_cluster.work_dir else tmp_path
    with _launch(out, out / "cache", "progress_slurm", "sparsity=0.5,0.6,0.7", "hydra.launcher.max_array_size=2",
                 "hydra.launcher.progress_interval_s=1", "hydra.callbacks.report.enabled=false") as proc:
        text = _finish(proc, timeout=300, code=0)
    arrays = re.findall(r"^submitted (\d) job\(s\) \(slurm (\d+)\)", text, flags=re.M)
    assert [n for n, _ in arrays] == ["2", "1"], text
    for n, array in arrays:
        counts = re.findall(rf"^slurm {array}: {n} jobs: (\d) pending, (\d) running, (\d) completed, (\d) failed",
                            text, flags=re.M)
        assert counts and counts[-1] == ("0", "0", n, "0"), text
