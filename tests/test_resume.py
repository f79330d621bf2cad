"""Preemption-safe resume without Slurm (issue 7): the stage-boundary state round-trips, and a run
interrupted like submitit interrupts it (SystemExit raised in the middle of the task, after a
boundary was saved) resumes in the same directory to exactly the result of an uninterrupted run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from pruning import noise as noise_mod
from pruning.checkpoint import StageCheckpoint, config_fingerprint
from pruning.state import RunState
from pruning.task import Job, run
from pruning.train import fit, make_loader, make_optimizer, train_config


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """One intra-op thread: tiny models on a shared 2-core machine run many times faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rows(run_dir: Path, drop: tuple[str, ...] = ("seconds", "step", "factor_cache", "factor_seconds"),
          ) -> list[dict[str, Any]]:
    """metrics.jsonl without wall-clock fields and without the dense-training rows (only the run
    that trained the shared dense model logs those, which also shifts its step counter)."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("phase") != "dense_train":
            out.append({k: v for k, v in row.items() if k not in drop})
    return out


def _result(rec: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    skip = ("seconds", "factor_cache", "factor_seconds")  # wall clock, and whether the factor cache was hit
    return rec["metrics"], [{k: v for k, v in s.items() if k not in skip} for s in rec["stages"]]


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, boundary: str) -> None:
    """Raise SystemExit (what submitit's USR2 handler does after requeuing) at the first metrics row
    logged after `boundary` was saved, or right after it when nothing is logged before the next one:
    the interrupted attempt has done work past its last saved state."""
    save, log = StageCheckpoint.save, Job.log
    armed = {"on": False}

    def save_then_maybe_exit(self: StageCheckpoint, state: RunState, key: str, *args: Any) -> None:
        if armed["on"]:
            raise SystemExit(-1)
        save(self, state, key, *args)
        armed["on"] = armed["on"] or key == boundary

    def log_then_maybe_exit(self: Job, row: dict[str, Any]) -> None:
        log(self, row)
        if armed["on"]:
            raise SystemExit(-1)

    monkeypatch.setattr(StageCheckpoint, "save", save_then_maybe_exit)
    monkeypatch.setattr(Job, "log", log_then_maybe_exit)


# small settings: a large batch keeps an epoch short on a shared 2-core machine
CASES = {
    "finetune-epoch": (["finetune=short", "finetune.epochs=3", "finetune.batch_size=256"], "finetune/1"),
    "multistage-stage-finetune": (["schedule=multistage", "schedule.stages=2", "schedule.finetune_epochs=1",
                                   "dataset.batch_size=256"], "stage1_finetune/1"),
    "gradual-epoch": (["schedule=gradual", "schedule.epochs=3", "schedule.end=1", "dataset.batch_size=256"],
                      "gradual/1"),
    # a train-time method's own loop (gRDA: 600 epochs in the VGG-16 study), from scratch under
    # gradient noise, with an lr milestone after the interruption: the model, GRDA's accumulators
    # and step count (its threshold schedule), the data order and the noise draws all resume
    "grda-epoch": (["method=grda", "method.epochs=3", "method.batch_size=256", "method.init=scratch",
                    "method.lr_milestones=[2]", "noise=gradient"], "method/grda/1"),
    "sdprun-epoch": (["method=sdprun", "method.epochs=2", "method.batch_size=256"], "method/sdprun/1"),
    # GFS saves after every selected layer (weights after its fine-tuning, channel scales, streams)
    "gfs-layer": (["method=gfs", "method.budget=width", "method.width=0.5", "method.num_evaluate=8",
                   "method.finetune_batch_size=256"], "method/gfs/1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_interrupted_run_resumes_to_the_uninterrupted_result(case: str, make_cfg: Callable[..., Any],
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    overrides, boundary = CASES[case]
    cfg = make_cfg(*overrides, "deterministic=true")
    reference = run(cfg, tmp_path / "reference")

    run_dir = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        _interrupt_after(m, boundary)
        with pytest.raises(SystemExit):
            run(cfg, run_dir)
    rec = json.loads((run_dir / "result.json").read_text())
    assert rec["status"] == "failed" and rec["error"].startswith("interrupted")
    assert (run_dir / "ckpt" / "state.pt").is_file()
    rows_before = len(_rows(run_dir))

    capsys.readouterr()
    resumed = run(cfg, run_dir)
    assert f"continues after '{boundary}'" in capsys.readouterr().out
    assert resumed["status"] == "completed" and resumed["attempt"] == 2
    assert resumed["resumed_from"] == boundary
    assert _result(resumed) == _result(reference)
    # the row(s) logged after the boundary by the interrupted attempt were dropped, then redone
    assert _rows(run_dir) == _rows(tmp_path / "reference")
    assert rows_before <= len(_rows(run_dir))
    # same step counter (up to the offset of the dense-training rows): no step logged twice or skipped
    steps = [[r["step"] for r in _rows(d, drop=()) if "step" in r] for d in (run_dir, tmp_path / "reference")]
    assert [s - steps[0][0] for s in steps[0]] == [s - steps[1][0] for s in steps[1]]
    assert not (run_dir / "ckpt").exists()  # removed once the run completed


def test_state_round_trips(make_cfg: Callable[..., Any], tmp_path: Path) -> None:
    cfg = make_cfg("finetune=short")

    def start(run_dir: Path) -> Job:
        job = Job(cfg, run_dir)
        job.state.noise = noise_mod.build(cfg.noise)
        run_dir.mkdir(parents=True, exist_ok=True)
        job.ckpt.begin(cfg, job.record, job.say)
        job.record.start()
        job.setup()
        job.ckpt.restore(job.state)
        return job

    run_dir = tmp_path / "run"
    job = start(run_dir)
    st = job.state
    assert job.ckpt.state is None and not job.ckpt.passed("dense_eval")
    tc = train_config({"epochs": 1, "batch_size": 64, "lr": 0.05}, "finetune")
    opt = make_optimizer(st.model, tc)
    loader = make_loader(st.data.train, tc.batch_size, seed=3)
    st.mask[::3] = False
    fit(st.model, loader, opt, st.device, epochs=1, phase="finetune", layout=st.layout, mask=st.mask)
    job.log({"phase": "finetune", "epoch": 1})
    job.record.update_metrics(dense_acc=0.5)
    job.record.add_stage({"stage": 1, "acc": 0.25})
    torch.manual_seed(1234)
    job.ckpt.save(st, "dense_eval")
    job.ckpt.save(st, "finetune/1", loader, opt)
    next_global = torch.rand(4)
    next_order = torch.randperm(10, generator=loader.generator)
    job.log({"phase": "finetune", "epoch": 2})  # after the boundary: dropped on resume

    job2 = start(run_dir)
    st2 = job2.state
    assert job2.ckpt.boundaries == ["dense_eval", "finetune/1"] and job2.ckpt.passed("dense_eval")
    assert job2.record.data["resumed_from"] == "finetune/1"
    assert st2.step == st.step - 1
    assert torch.equal(st2.mask, st.mask)
    for (k, a), b in zip(st.model.state_dict().items(), st2.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert job2.record.data["metrics"]["dense_acc"] == 0.5
    assert job2.record.data["stages"] == [{"stage": 1, "acc": 0.25}]
    assert torch.equal(torch.rand(4), next_global)  # global RNG restored
    opt2 = make_optimizer(st2.model, tc)
    loader2 = make_loader(st2.data.train, tc.batch_size, seed=3)
    assert job2.ckpt.resume_loop("finetune", loader2, opt2) == 1
    assert job2.ckpt.resume_loop("gradual", loader2) == 0
    assert torch.equal(torch.randperm(10, generator=loader2.generator), next_order)
    mom = [s["momentum_buffer"] for s in opt.state_dict()["state"].values()]
    mom2 = [s["momentum_buffer"] for s in opt2.state_dict()["state"].values()]
    assert len(mom) == len(mom2) > 0 and all(torch.equal(a, b) for a, b in zip(mom, mom2))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("epoch") for r in rows if r.get("phase") == "finetune"] == [1]


def test_resume_false_or_other_config_starts_over(make_cfg: Callable[..., Any], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cfg = make_cfg("finetune=short", "finetune.epochs=2")
    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_after(m, "finetune/1")
        with pytest.raises(SystemExit):
            run(cfg, run_dir)
    assert (run_dir / "ckpt" / "state.pt").is_file()

    other = make_cfg("finetune=short", "finetune.epochs=2", "finetune.lr=0.02")
    assert config_fingerprint(other) != config_fingerprint(cfg)
    assert config_fingerprint(make_cfg("finetune=short", "finetune.epochs=2", "calibration.chunk_size=7",
                                       "progress=true")) == config_fingerprint(cfg)
    capsys.readouterr()
    with monkeypatch.context() as m:
        _interrupt_after(m, "finetune/1")
        with pytest.raises(SystemExit):
            run(other, run_dir)
    assert "different configuration; starting from scratch" in capsys.readouterr().out

    fresh = make_cfg("finetune=short", "finetune.epochs=2", "resume=false")
    data = run(fresh, run_dir)
    assert data["status"] == "completed" and "resumed_from" not in data
    assert [r["epoch"] for r in _rows(run_dir) if r["phase"] == "finetune"] == [1, 2]


@pytest.mark.parametrize("cache_stages,recomputed", [("all", 0), ("first", 1)])
def test_resumed_pruning_step_reads_g_from_the_cache(make_cfg: Callable[..., Any], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, cache_stages: str,
                                                     recomputed: int) -> None:
    """The 'G computed' boundary: preempted inside a method's second pruning step, the resumed job
    reads that step's G from the gradient cache with calibration.cache_stages=all; with the default
    (first), which caches only the first step's G, it recomputes it once."""
    from pruning import gradients, methods

    # a cache of its own: another test may already have cached this very G in the session cache
    cfg = make_cfg("method=woodfisher", "schedule=multistage", "schedule.stages=2", "deterministic=true",
                   f"paths.cache_dir={tmp_path / 'cache'}", f"calibration.cache_stages={cache_stages}")
    module = methods.get("woodfisher")
    prune, compute = module.prune, gradients.cache.compute_gradient_matrix
    calls: list[int] = []

    def counting_compute(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return compute(*args, **kwargs)

    def preempted_in_stage_2(problem: Any, sparsity: float, mcfg: Any) -> Any:
        if problem.stage == 2:
            raise SystemExit(-1)
        return prune(problem, sparsity, mcfg)

    monkeypatch.setattr(gradients.cache, "compute_gradient_matrix", counting_compute)
    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(module, "prune", preempted_in_stage_2)
        with pytest.raises(SystemExit):
            run(cfg, run_dir)
    assert calls, "the interrupted attempt computed G for stage 2"
    calls.clear()
    resumed = run(cfg, run_dir)
    assert resumed["resumed_from"] == "prune/1" and resumed["status"] == "completed"
    assert len(calls) == recomputed
    reference = run(cfg, tmp_path / "reference")
    assert _result(resumed) == _result(reference)


@pytest.mark.slow
def test_submitit_local_sweep_survives_a_killed_job_and_the_relaunch_resumes_it(tmp_path: Path,
                                                                              session_cache: Path) -> None:
    """cluster=submitit_local (the launcher behind cluster=slurm, without Slurm): a job killed like
    an out-of-memory kill is recorded as failed and the sweep ends normally with its summary; the
    same command again skips the completed run and resumes the killed one from its saved stage."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from pruning.config import run_dirname

    root = Path(__file__).resolve().parents[1]
    common = [f"paths.out_root={tmp_path}", f"paths.data_dir={tmp_path / 'data'}", f"paths.cache_dir={session_cache}",
              "progress=false", "calibration.num_samples=64", "finetune=short", "finetune.batch_size=2048"]
    args = [sys.executable, str(root / "launch.py"), "-m", "cluster=submitit_local", "sweep_name=local_kill",
            "resources.cpus=1", *common, "finetune.epochs=1,300"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    sweep_dir = tmp_path / "sweeps" / "local_kill"
    long = sweep_dir / run_dirname([*common, "finetune.epochs=300"]) / "seed=0"

    def epochs_done() -> int:
        try:
            rows = [json.loads(x) for x in (long / "metrics.jsonl").read_text().splitlines() if x.endswith("}")]
        except FileNotFoundError:
            return 0
        return max((r.get("epoch", 0) for r in rows if r.get("phase") == "finetune"), default=0)

    def running_jobs() -> list[Path]:  # the local executor's job id is the pid of the job's process
        return [d for d in (sweep_dir / ".submitit").glob("[0-9]*") if not list(d.glob("*_result.pkl"))]

    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        t0 = time.time()
        # the short job is over and the long one has passed two epochs
        while epochs_done() < 2 or len(running_jobs()) != 1:
            assert proc.poll() is None and time.time() - t0 < 180, "the long job never reached epoch 2 alone"
            time.sleep(0.2)
        # the job: submitit's local controller (pid = job id) and its task process; kill both, like an
        # out-of-memory kill of the job
        pid = int(running_jobs()[0].name)
        assert b"submitit.local._local" in Path(f"/proc/{pid}/cmdline").read_bytes()
        tasks = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        assert tasks and all(b"submitit.core._submit" in Path(f"/proc/{t}/cmdline").read_bytes() for t in tasks)
        for victim in (pid, *tasks):
            os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # the launcher and its job processes (one process group)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 1, out[-3000:]  # the sweep ends normally; its exit status says a job failed
    rec = json.loads((long / "result.json").read_text())
    assert rec["status"] == "failed" and "without a result" in rec["error"], rec["error"]
    assert "1 completed, 1 failed" in out and "finetune.epochs=300" in out
    done = epochs_done()

    jobs_before = set((sweep_dir / ".submitit").glob("[0-9]*"))
    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "2 completed, 0 failed" in again.stdout
    # the completed cell is not queued again: one new job, for the killed one
    assert "1 of 2 job(s) already completed: not submitted" in again.stdout
    assert len(set((sweep_dir / ".submitit").glob("[0-9]*")) - jobs_before) == 1
    rec = json.loads((long / "result.json").read_text())
    assert rec["status"] == "completed" and rec["attempt"] == 2
    assert rec["resumed_from"].startswith("finetune/") and int(rec["resumed_from"].split("/")[1]) >= done - 1
    epochs = [r["epoch"] for r in _rows(long) if r["phase"] == "finetune"]
    assert epochs == list(range(1, 301))


def test_a_completed_retry_leaves_no_stale_error_file(make_cfg: Callable[..., Any], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """error.txt is the failed attempt's traceback; once a later attempt runs it is history
    (error.attempt<k>.txt), so a completed run's directory does not show an error the record cleared."""
    import pruning.evaluation

    cfg, run_dir = make_cfg(), tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(pruning.evaluation, "final_eval", lambda job: (_ for _ in ()).throw(RuntimeError("disk hiccup")))
        with pytest.raises(RuntimeError):
            run(cfg, run_dir)
    assert "disk hiccup" in (run_dir / "error.txt").read_text()
    rec = run(cfg, run_dir)
    assert rec["status"] == "completed" and rec["attempt"] == 2 and rec["error"] is None
    assert not (run_dir / "error.txt").exists()
    assert "disk hiccup" in (run_dir / "error.attempt1.txt").read_text()


def test_an_invalid_job_config_is_recorded_without_being_submitted(tmp_path: Path, session_cache: Path) -> None:
    """The configs of a submitit sweep are checked before anything is queued: a bad cell is recorded
    as failed on the spot (on a cluster it would otherwise wait in the queue to fail on a node), the
    good ones run, and the exit status says a config failed."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, str(root / "launch.py"), "-m", "cluster=submitit_local", "sweep_name=bad_grid",
            f"paths.out_root={tmp_path}", f"paths.cache_dir={session_cache}", "progress=false",
            "calibration.num_samples=32", "sparsity=0.5,1.5", "method=magnitude,woodfisher",
            "hydra.callbacks.report.enabled=false"]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    bad = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: job #")]
    assert len(bad) == 2 and all("sparsity=1.5" in ln and "[0, 1)" in ln for ln in bad), proc.stderr
    assert "2 of 4 job(s) failed on their config: not submitted (recorded as failed)" in proc.stdout
    assert "submitted 2 job(s) (local " in proc.stdout
    records = [json.loads(p.read_text()) for p in (tmp_path / "sweeps" / "bad_grid").rglob("result.json")]
    assert sorted((r["index"]["sparsity"], r["status"], r.get("error_type")) for r in records) == [
        (0.5, "completed", None), (0.5, "completed", None), (1.5, "failed", "config"), (1.5, "failed", "config")]
