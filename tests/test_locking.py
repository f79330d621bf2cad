"""Issue 14 item 4: one writer per run (a lock per run directory, stale locks taken over), one grid
per sweep (concurrent launchers' grids are merged), one count per cell (runs with the same resolved
settings are one cell), interrupted runs (a `running` record without a live lock) are resumed."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_validation import multirun

from pruning.config import run_dirname
from pruning.sweep import sweep_status

LOCK_NAME = "run.lock"  # pruning.lock.LOCK_NAME (imported inside the tests that need the module)


def write_lock(run_dir: Path, age_s: float = 0.0, **info) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": 1.0, **info}))
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------ the lock

def test_lock_is_exclusive_and_released(tmp_path):
    from pruning import lock as lock_mod
    from pruning.lock import RunLock

    assert lock_mod.LOCK_NAME == LOCK_NAME

    first, second = RunLock(tmp_path / "run"), RunLock(tmp_path / "run")
    assert first.acquire()
    assert not second.acquire()
    assert second.holder["pid"] == os.getpid() and second.holder["host"] == socket.gethostname()
    first.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    assert second.acquire()
    second.release()


@pytest.mark.parametrize(("info", "age_s", "stale"), [
    ({"pid": "dead"}, 0.0, True),                        # same host, process gone
    ({}, 0.0, False),                                    # same host, this (live) process
    ({"host": "elsewhere", "pid": 1}, 10.0, False),      # other host, recent heartbeat
    ({"host": "elsewhere", "pid": 1}, 3600.0, True),     # other host, no heartbeat for an hour
    ({"host": "elsewhere", "pid": 1, "slurm_job_id": "77_3"}, 1.0, True),  # this Slurm job's earlier attempt
])
def test_stale_locks_are_taken_over(tmp_path, monkeypatch, info, age_s, stale):
    from pruning.lock import RunLock, is_live, read_lock

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    if info.get("pid") == "dead":
        info = {**info, "pid": dead_pid()}
    write_lock(tmp_path, age_s, **info)
    assert is_live(read_lock(tmp_path), stale_s=300) is not stale
    lock = RunLock(tmp_path, stale_s=300)
    assert lock.acquire() is stale
    if stale:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert not list(tmp_path.glob(f"{LOCK_NAME}.stale-*"))
        lock.release()
        assert not (tmp_path / LOCK_NAME).exists()
    else:
        assert (tmp_path / LOCK_NAME).exists()


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
    from pruning.lock import RunLock, read_lock

    with RunLock(tmp_path, heartbeat_s=0.05) as lock:
        assert lock.acquired
        old = time.time() - 1000
        os.utime(tmp_path / LOCK_NAME, (old, old))
        time.sleep(0.5)
        assert read_lock(tmp_path)["age_s"] < 100
    assert not (tmp_path / LOCK_NAME).exists()


def test_release_never_removes_a_lock_taken_over_by_another_process(tmp_path):
    from pruning.lock import RunLock

    lock = RunLock(tmp_path)
    assert lock.acquire()
    write_lock(tmp_path, host="elsewhere", pid=1)  # e.g. a requeued job judged us dead
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "elsewhere"


# ------------------------------------------------------------------------- two launchers, one cell

def _launch_cell(cfg, run_dir, barrier, results):
    import contextlib
    import io

    from pruning.task import run

    out = io.StringIO()
    barrier.wait()
    with contextlib.redirect_stdout(out):
        data = run(cfg, run_dir, ["finetune=short"])
    results.put((os.getpid(), data.get("status"), out.getvalue()))


def test_same_cell_launched_twice_at_once_is_computed_once(make_cfg, tmp_path):
    cfg = make_cfg("finetune=short")
    run_dir = tmp_path / "run"
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_launch_cell, args=(cfg, run_dir, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    skipped = [out for _, _, out in got if "is being run by another process" in out]
    assert len(skipped) == 1, [out[-500:] for _, _, out in got]
    assert "not computing it twice" in skipped[0]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, len(steps) + 1))  # every row once, in order
    assert json.loads((run_dir / "result.json").read_text())["status"] == "completed"
    assert not (run_dir / LOCK_NAME).exists()


def test_a_live_lock_skips_and_leaves_the_record_alone(make_cfg, tmp_path):
    from pruning.task import run

    run_dir = tmp_path / "run"
    write_lock(run_dir, host="elsewhere", pid=1)
    data = run(make_cfg("sparsity=abc"), run_dir)  # even a bad config: the holder owns the record
    assert data["status"] == "running"
    assert not (run_dir / "result.json").exists()


# ----------------------------------------------------------------------------- interrupted runs

def test_running_record_without_lock_is_interrupted_and_resumed(make_cfg, tmp_path):
    from pruning.task import run

    sweep = tmp_path / "sweep"
    run_dir = sweep / "sparsity=0.5" / "seed=0"
    cfg = make_cfg("sparsity=0.5")
    rec = run(cfg, run_dir, ["sparsity=0.5"])
    rec["status"] = "running"  # killed mid-run: the record says running, nobody holds the lock
    (run_dir / "result.json").write_text(json.dumps(rec))
    status = sweep_status(sweep)
    assert [c.status for c in status.cells] == ["interrupted"] and status.to_rerun == status.cells
    assert "1 interrupted" in status.summary()
    write_lock(run_dir)  # a live holder (this process): really running
    assert [c.status for c in sweep_status(sweep).cells] == ["running"]
    (run_dir / LOCK_NAME).unlink()
    again = run(cfg, run_dir, ["sparsity=0.5"])  # the relaunch resumes it
    assert again["status"] == "completed" and again["attempt"] == 2


# --------------------------------------------------------------------------- one grid per sweep

def test_concurrent_launchers_merge_their_grids(tmp_path):
    """Three launchers into one sweep at once (every cell fails on a config error, so nothing trains):
    the status lists all six failed cells and one relaunch command per launcher."""
    grids = [("sparsity=abc,1.5", "seed=0"), ("sparsity=abc,1.5", "seed=1"), ("sparsity=xyz", "seed=0,1")]
    procs = [multirun(tmp_path, *g, wait=False) for g in grids]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2, 2], [err[-2000:] for _, err in outs]
    status = sweep_status(tmp_path / "out" / "sweeps" / "adhoc")
    assert status.grid_size == 6 and status.grid_error is None
    assert status.counts()["failed"] == 6 and not status.missing
    assert len(status.relaunch.splitlines()) == 3
    for g in grids:
        assert sum(all(o in line for o in g) for line in status.relaunch.splitlines()) == 1
    assert len(list((tmp_path / "out" / "sweeps" / "adhoc" / ".grids").glob("*.yaml"))) == 3


# ----------------------------------------------------------------------- one count per cell

def test_two_adhoc_sweeps_count_a_cell_once(make_cfg, tmp_path):
    """`-m seed=0,1,2` and `-m method=magnitude seed=0,1,2` into one ad-hoc sweep: the same three
    runs (magnitude is the default), not six."""
    from pruning.report import load_local, summarize
    from pruning.task import run

    sweep = tmp_path / "adhoc"
    for extra in ([], ["method=magnitude"]):
        for seed in range(3):
            run(make_cfg(*extra, f"seed={seed}"), sweep / run_dirname(extra) / f"seed={seed}", [*extra, f"seed={seed}"])
    status = sweep_status(sweep)
    assert status.counts()["completed"] == 3 and len(status.duplicates) == 3
    from omegaconf import OmegaConf  # the two launchers' grids: 3 expected cells, not 6

    (sweep / ".grids").mkdir()
    for i, extra in enumerate(([], ["method=magnitude"])):
        OmegaConf.save({"seed": 0, "hydra": {"overrides": {"task": [*extra, "seed=0,1,2"]}}},
                       sweep / ".grids" / f"{i}.yaml")
    status = sweep_status(sweep)
    assert status.grid_size == 3 and status.counts() == {"completed": 3, "failed": 0, "running": 0,
                                                         "interrupted": 0, "missing": 0}
    assert "3 completed, 0 failed, 0 running, 0 interrupted, 0 missing of 3 expected" in status.summary()
    summary = summarize(load_local(sweep), "final_acc")
    assert summary["n"].tolist() == [3]
    other = run(make_cfg("sparsity=0.5"), sweep / "sparsity=0.5" / "seed=0", ["sparsity=0.5"])
    assert other["cell_id"] != json.loads((sweep / "default" / "seed=0" / "result.json").read_text())["cell_id"]


@pytest.mark.parametrize(("info", "released"), [({"slurm_job_id": "55_1", "host": "node7", "pid": 9}, True),
                                                ({"pid": "job"}, True),
                                                ({"slurm_job_id": "55_2", "host": "node7", "pid": 9}, False)])
def test_launcher_releases_the_lock_of_a_dead_job(tmp_path, info, released):
    """A job the scheduler reports dead (node failure, OOM kill) leaves its lock; the launcher removes
    it when it records the failure, so the relaunch need not wait for the heartbeat to go stale."""
    from pruning.launcher import mark_unfinished

    job_id = "55_1" if "slurm_job_id" in info else "4242"
    write_lock(tmp_path, **{**info, "pid": 4242 if info.get("pid") == "job" else info["pid"]})
    (tmp_path / "result.json").write_text(json.dumps({"status": "running"}))
    assert mark_unfinished(tmp_path, "killed", job_id=job_id) == "failed"
    assert (tmp_path / LOCK_NAME).exists() is not released
