"""Slurm launching through a real cluster (issue 7): `python launch.py -m cluster=slurm ...` submits
one job array per batch; a cancelled job is recorded as failed and the sweep goes on to its
summary; a preempted job is requeued and resumes from its saved stage to the result of an
uninterrupted run.

The tests need a cluster that answers `scontrol ping` with accounting (`sacct`: submitit needs
it to notice cancelled jobs). When none answers and this is root with the Slurm and MUNGE
packages installed, the session fixture starts the project's single-node cluster
(scripts/slurm-local-start.sh; .ci/run installs the packages and starts it) and stops it at the
end if it started it. Otherwise the tests skip and say why. On another cluster set
PRUNING_SLURM_TEST_DIR to a directory the compute nodes can read and write.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from pruning.config import run_dirname
from pruning.sweep import sweep_status
from pruning.task import run

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
START = ROOT / "scripts" / "slurm-local-start.sh"
STOP = ROOT / "scripts" / "slurm-local-stop.sh"
LOCAL_DIR = Path(os.environ.get("SLURM_LOCAL_DIR", "/tmp/slurm-local"))
LOCAL_CONF = LOCAL_DIR / "etc" / "slurm.conf"
DAEMONS = ("munged", "slurmctld", "slurmd", "slurmdbd", "mariadbd")


@dataclass
class Cluster:
    local: bool            # the project's single-node cluster (scripts/slurm-local-start.sh)
    work_dir: Path | None  # shared directory for runs on another cluster (PRUNING_SLURM_TEST_DIR)


def _answers() -> bool:
    if shutil.which("scontrol") is None:
        return False
    try:
        return subprocess.run(["scontrol", "ping"], capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _installed(name: str) -> bool:
    return shutil.which(name) is not None or Path("/usr/sbin", name).exists()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Cluster]:
    if "SLURM_CONF" not in os.environ and LOCAL_CONF.is_file():
        os.environ["SLURM_CONF"] = str(LOCAL_CONF)
    started = False
    if not _answers():
        if os.geteuid() != 0:
            pytest.skip("no Slurm cluster answers `scontrol ping`, and starting the local one needs root "
                        "(sudo scripts/slurm-local-start.sh)")
        missing = [d for d in DAEMONS if not _installed(d)]
        if missing:
            pytest.skip(f"no Slurm cluster answers `scontrol ping`, and {', '.join(missing)} are not installed: "
                        "run scripts/slurm-local-start.sh as root (installs Slurm, MUNGE and MariaDB from "
                        "Debian packages), or .ci/run")
        out = subprocess.run([str(START)], env={**os.environ, "SLURM_LOCAL_INSTALL": "0"},
                             capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            pytest.skip(f"could not start the local Slurm cluster (logs in {LOCAL_DIR}/log): "
                        f"{out.stderr.strip().splitlines()[-1:] or out.stdout[-300:]}")
        os.environ["SLURM_CONF"] = str(LOCAL_CONF)
        started = True
    acct = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, text=True, timeout=60)
    if acct.returncode != 0:
        pytest.skip(f"`sacct` does not work ({acct.stderr.strip()[:200]}): submitit cannot see cancelled "
                    "jobs without accounting (slurmdbd)")
    local = os.environ.get("SLURM_CONF") == str(LOCAL_CONF)
    work = os.environ.get("PRUNING_SLURM_TEST_DIR")
    if not local and not work:
        pytest.skip("a Slurm cluster answers but it is not the local test cluster: set PRUNING_SLURM_TEST_DIR "
                    "to a directory the compute nodes share")
    try:
        yield Cluster(local=local, work_dir=Path(work) if work else None)
    finally:
        if started:
            subprocess.run([str(STOP)], capture_output=True, timeout=120)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread, like the jobs (cpus_per_task=1 -> OMP_NUM_THREADS=1): in-process reference
    runs are then bit-identical to the jobs, and fast on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dense_cache(slurm_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train the shared dense MLP once, before any job needs it (jobs would race to train it)."""
    base = slurm_cluster.work_dir or tmp_path_factory.mktemp("slurm")
    cache = base / "cache"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(_cfg(base / "warmup", cache), base / "warmup" / "run")
    finally:
        torch.set_num_threads(n)
    return cache


def _common(out: Path, cache: Path) -> list[str]:
    return [f"paths.out_root={out}", f"paths.data_dir={out / 'data'}", f"paths.cache_dir={cache}",
            "progress=false", "calibration.num_samples=64", "deterministic=true"]


def _cfg(out: Path, cache: Path, *overrides: str) -> Any:
    """The config a job of `_launch(out, cache, ..., *overrides)` runs, composed in-process."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*_common(out, cache), *overrides])
    with open_dict(cfg):
        cfg.device = "cpu"
    return cfg


@contextmanager
def _launch(out: Path, cache: Path, sweep: str, *overrides: str) -> Iterator[subprocess.Popen[str]]:
    """`python launch.py -m cluster=slurm ...` in a subprocess (from another working directory).
    On the way out, whatever is left of it is stopped: the launcher (its own session) and the
    sweep's jobs (named after the sweep)."""
    args = [sys.executable, str(ROOT / "launch.py"), "-m", "cluster=slurm", f"sweep_name={sweep}",
            "resources.cpus=1", "resources.mem_gb=1", "resources.timeout_min=60",
            "hydra.launcher.array_parallelism=2", *_common(out, cache), *overrides]
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(args, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.communicate()
        subprocess.run(["scancel", f"--name={sweep}", f"--user={getpass.getuser()}"], capture_output=True,
                       timeout=60)


def _finish(proc: subprocess.Popen[str], timeout: float, code: int = 0) -> str:
    """The launcher's output once it exits with status `code` (1: a job of its grid failed)."""
    try:
        text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"launch.py did not finish within {timeout:.0f}s")
    assert proc.returncode == code, text[-3000:]
    return text


def _wait_for(what: str, cond: Callable[[], Any], proc: subprocess.Popen[str], timeout: float = 120) -> Any:
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = cond()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"launch.py ended before {what}:\n{proc.stdout.read()[-3000:] if proc.stdout else ''}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def _record(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "result.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _epochs_done(run_dir: Path, phase: str = "finetune") -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    rows = [json.loads(line) for line in lines if line.endswith("}")]
    return max((r.get("epoch", 0) for r in rows if r.get("phase") == phase), default=0)


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    drop = ("seconds", "step", "factor_cache", "factor_seconds")
    return [{k: v for k, v in r.items() if k not in drop} for r in rows
            if r.get("phase") != "dense_train"]


def _result(rec: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    skip = ("seconds", "factor_cache", "factor_seconds")  # wall clock, and whether the factor cache was hit
    return rec["metrics"], [{k: v for k, v in s.items() if k not in skip} for s in rec["stages"]]


def _sacct(job: str) -> dict[str, str]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "JobID,State"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)


def test_sweep_is_one_job_array_and_a_cancelled_job_does_not_stop_it(slurm_cluster: Cluster, dense_cache: Path,
                                                                     tmp_path: Path) -> None:
    out = slurm_cluster.work_dir / tmp_path.name if slurm_cluster.work_dir else tmp_path
    sweep = f"pytest{os.getpid()}_array"
    fixed = ["finetune=short", "finetune.batch_size=256"]
    sweep_dir = out / "sweeps" / sweep
    dirs = {n: sweep_dir / run_dirname([*_common(out, dense_cache), *fixed, f"finetune.epochs={n}"]) / "seed=0"
            for n in (1, 2, 5000)}
    long = dirs[5000]
    with _launch(out, dense_cache, sweep, *fixed, "finetune.epochs=1,2,5000") as proc:
        # cancel the long job once it is running and has passed a few stage boundaries
        _wait_for("the long job to start fine-tuning", lambda: _epochs_done(long) >= 2, proc, timeout=150)
        rec = _record(long)
        assert rec is not None and rec["status"] == "running"
        subprocess.run(["scancel", rec["env"]["slurm_job_id"]], check=True, timeout=60)
        text = _finish(proc, timeout=150, code=1)  # the sweep ends normally; its status says a job failed

    recs = {n: _record(d) for n, d in dirs.items()}
    assert recs[1]["status"] == "completed" and recs[2]["status"] == "completed", text[-2000:]
    assert recs[5000]["status"] == "failed" and "CANCELLED" in recs[5000]["error"], recs[5000]["error"]
    assert "CANCELLED" in (long / "error.txt").read_text()
    # one job array: same array id, one task per job, as sacct sees it
    array_ids = {r["env"]["slurm_array_job_id"] for r in recs.values()}
    assert len(array_ids) == 1 and None not in array_ids
    assert sorted(r["env"]["slurm_array_task_id"] for r in recs.values()) == ["0", "1", "2"]
    array = array_ids.pop()
    states = _sacct(array)
    assert states[f"{array}_0"] == "COMPLETED" and states[f"{array}_1"] == "COMPLETED", states
    assert states[f"{array}_2"].startswith("CANCELLED"), states
    assert list(sweep_dir.glob(f".submitit/{array}_*/*_log.out"))
    # the end-of-sweep summary: completed, failed, and what to relaunch
    status = sweep_status(sweep_dir)
    assert (len(status.completed), len(status.failed), len(status.missing)) == (2, 1, 0)
    assert "finetune.epochs=5000" in status.failed[0].command_args()
    assert status.summary().splitlines()[0] in text
    assert "error: job #2" in text and "CANCELLED" in text
    # each job ran exactly the task of a local run
    local = run(_cfg(out / "local", dense_cache, *fixed, "finetune.epochs=2"), out / "local" / "run")
    assert _result(recs[2]) == _result(local)


def test_preempted_job_resumes_from_its_saved_stage(slurm_cluster: Cluster, dense_cache: Path,
                                                    tmp_path: Path) -> None:
    out = slurm_cluster.work_dir / tmp_path.name if slurm_cluster.work_dir else tmp_path
    sweep = f"pytest{os.getpid()}_requeue"
    fixed = ["finetune=short", "finetune.epochs=120", "finetune.batch_size=128"]
    run_dir = out / "sweeps" / sweep / run_dirname([*_common(out, dense_cache), *fixed]) / "seed=0"
    with _launch(out, dense_cache, sweep, *fixed) as proc:
        _wait_for("the job to pass two fine-tuning epochs", lambda: _epochs_done(run_dir) >= 2, proc, timeout=150)
        job_id = _record(run_dir)["env"]["slurm_job_id"]
        # what submitit's job._interrupt() sends on a preemption: SIGTERM (ignored), then USR2 -> the
        # launcher's checkpoint() resubmits the same Hydra job and `scontrol requeue`s it
        subprocess.run(["scancel", "--signal=TERM", job_id], check=True, timeout=60)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=60)
        # the uninterrupted reference, in-process, while Slurm requeues the job
        reference = run(_cfg(out / "reference", dense_cache, *fixed), out / "reference" / "run")
        text = _finish(proc, timeout=240)

    rec = _record(run_dir)
    assert rec["status"] == "completed", text[-2000:]
    assert rec["attempt"] == 2 and rec["env"]["slurm_restart_count"] == "1"
    assert rec["resumed_from"].startswith("finetune/") and int(rec["resumed_from"].split("/")[1]) >= 2
    assert _result(rec) == _result(reference)
    assert _rows(run_dir) == _rows(out / "reference" / "run")
    assert not (run_dir / "ckpt").exists()
    logs = "".join(p.read_text() for p in (out / "sweeps" / sweep).glob(".submitit/*/*_log.out"))
    assert "Requeued job" in logs and f"continues after '{rec['resumed_from']}'" in logs
