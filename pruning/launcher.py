"""Submitit launching for Hydra that keeps a sweep going when a job ends without a result.

Hydra's submitit launcher (hydra-submitit-launcher 1.2) submits one job array per sweeper batch
and then collects the results with `[j.results()[0] for j in jobs]`. A job that ends without a
result (scancel, out of memory, node failure, timed out more than `max_num_timeout` times) raises
there, so the whole multirun stops: later batches are never submitted and the end-of-sweep
summary never runs. The launchers here (`cluster=slurm`, `cluster=submitit_local`) collect every
job, record such a run as failed in its `result.json` (with the scheduler's state and the log
paths in `error.txt`) and go on; with `fail_fast=true` they re-raise instead.

Hydra only instantiates launchers from the `hydra_plugins` package, so the two classes live in
`hydra_plugins/pruning_launcher` (next to launch.py, importable wherever launch.py runs). On a
worker only the stock `__call__`/`checkpoint` run, so an instance pickles as the stock launcher:
a worker needs only the installed packages, and submitit's requeue (`checkpoint()` resubmits the
same Hydra job) re-enters the task in the same run directory.
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf, open_dict

from pruning.lock import LOCK_NAME, read_lock
from pruning.record import RunRecord

log = logging.getLogger(__name__)


def rebuild(cls: type, state: dict[str, Any]) -> Any:
    """Unpickle helper: an instance of `cls` (the stock launcher) with `state` as its attributes."""
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


def job_run_dir(launcher: Any, overrides: Sequence[str], job_num: int) -> Path:
    """The run directory job `job_num` of the sweep writes to (as Hydra's run_job computes it)."""
    sweep_config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with open_dict(sweep_config.hydra.job):
        sweep_config.hydra.job.num = job_num
    hc = HydraConfig.instance()
    previous = hc.cfg
    hc.set_config(sweep_config)
    try:
        sweep_dir = OmegaConf.select(sweep_config, "hydra.sweep.dir")
        subdir = OmegaConf.select(sweep_config, "hydra.sweep.subdir")
        return Path(str(sweep_dir)) / str(subdir)
    finally:
        hc.cfg = previous


def release_dead_lock(run_dir: Path, job_id: str | None) -> bool:
    """Remove `run_dir/run.lock` when it was held by job `job_id`, which the scheduler reports dead
    (so a relaunch need not wait for the heartbeat to go stale on another host)."""
    info = read_lock(run_dir)
    if info is None or not job_id:
        return False
    same_job = info.get("slurm_job_id") == str(job_id) or (
        info.get("host") == socket.gethostname() and str(info.get("pid")) == str(job_id))  # local executor
    if same_job:
        (run_dir / LOCK_NAME).unlink(missing_ok=True)
    return same_job


def mark_unfinished(run_dir: Path, reason: str, details: str = "", job_id: str | None = None) -> str:
    """Record in `run_dir/result.json` that the job ended without finishing the run (and release
    the run lock the dead job left behind).

    Returns the run's status afterwards: 'failed', 'completed' (the run finished; only the
    scheduler's bookkeeping failed) or 'missing' (the job never started the run)."""
    release_dead_lock(run_dir, job_id)
    record = RunRecord.load(run_dir)
    if record is None:
        return "missing"
    if record.status == "completed":
        return "completed"
    record.fail(reason)
    if details:
        (run_dir / "error.txt").write_text(f"{reason}\n\n{details}\n")
    return "failed"


# states of a job that is over (Slurm's, and the local executor's INTERRUPTED for a process killed by
# a signal); a job in one of them without a result pickle never writes one
_DEAD_STATES = ("CANCELLED", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT", "PREEMPTED", "BOOT_FAIL",
                "DEADLINE", "REVOKED", "INTERRUPTED")


def _ended_without_result(job: Any) -> bool:
    try:
        state = str(job.state)
    except Exception:
        return False
    return state.split(" ")[0] in _DEAD_STATES and not job.paths.result_pickle.exists()


def collect(launcher: Any, job: Any, overrides: Sequence[str], job_num: int) -> JobReturn:
    """The job's JobReturn; a job that ended without a result is recorded and does not raise
    (unless fail_fast), so the sweeper goes on with the other jobs and batches."""
    from submitit.core.utils import UncompletedJobError

    try:
        job.wait()
        if _ended_without_result(job):  # do not wait _results_timeout_s (15 s) for a file that never comes
            raise UncompletedJobError(f"Job {job.job_id} ended {job.state} without writing a result")
        return job.results()[0]
    except Exception as exc:  # UncompletedJobError (cancelled, killed), FailedJobError (crash outside the task)
        if launcher.config is not None and launcher.config.get("fail_fast", False):
            raise
        try:
            state = job.state
        except Exception:  # sacct unreachable: the exception text still says what happened
            state = "UNKNOWN"
        reason = (f"{launcher._EXECUTOR} job {job.job_id} ended {state} without a result "
                  f"(logs: {job.paths.stdout.parent})")
        run_dir: Path | None = None
        try:
            run_dir = job_run_dir(launcher, overrides, job_num)
            status = mark_unfinished(run_dir, reason, f"{type(exc).__name__}: {exc}", str(job.job_id))
            where = {"failed": f"recorded as failed in {run_dir}/result.json",
                     "missing": "the run never started (missing)",
                     "completed": "the run itself had completed"}[status]
        except Exception as err:  # bookkeeping must not stop the sweep either
            where = f"could not record it ({type(err).__name__}: {err})"
        print(f"error: job #{job_num} ({' '.join(filter_overrides(overrides))}): {reason}; {where}",
              file=sys.stderr, flush=True)
        ret = JobReturn(overrides=list(overrides), working_dir=str(run_dir) if run_dir else None,
                        status=JobStatus.COMPLETED)
        ret.return_value = None
        return ret


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
    """BaseSubmititLauncher.launch of hydra-submitit-launcher 1.2 (one job array per batch), with
    `collect` instead of `j.results()[0]`."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    assert launcher.config is not None
    assert len(job_overrides) > 0
    params = dict(launcher.params)
    if not params.get("gpus_per_node"):  # 0 or null: no --gpus-per-node flag on Slurm, 0 GPUs locally
        params["gpus_per_node"] = None if launcher._EXECUTOR == "slurm" else 0
    init_keys = {"max_num_timeout"}
    init_params = {"folder": params["submitit_folder"],
                   **{f"{launcher._EXECUTOR}_{k}": v for k, v in params.items() if k in init_keys}}
    executor = submitit.AutoExecutor(cluster=launcher._EXECUTOR, **init_params)
    baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{
        k if k in baseparams else f"{launcher._EXECUTOR}_{k}": v
        for k, v in params.items() if k not in init_keys | {"submitit_folder"}
    })
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    log.info(f"Submitit '{launcher._EXECUTOR}' sweep output dir : {sweep_dir}")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in launcher.config.hydra.sweep:
        sweep_dir.chmod(int(str(launcher.config.hydra.sweep.mode), 8))
    job_params = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
    jobs = executor.map_array(launcher, *zip(*job_params))
    if jobs:
        print(f"submitted {len(jobs)} job(s) ({launcher._EXECUTOR} {jobs[0].job_id.split('_')[0]}); "
              f"logs in {Path(str(params['submitit_folder'])).parent}", flush=True)
    return [collect(launcher, job, p[0], p[2]) for job, p in zip(jobs, job_params)]
