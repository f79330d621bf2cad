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

import contextlib
import logging
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf, open_dict

from pruning.lock import LOCK_NAME, read_lock
from pruning.record import ERROR_FILE, RunRecord

log = logging.getLogger(__name__)


def rebuild(cls: type, state: dict[str, Any]) -> Any:
    """Unpickle helper: an instance of `cls` (the stock launcher) with `state` as its attributes."""
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


@contextlib.contextmanager
def job_config(launcher: Any, overrides: Sequence[str], job_num: int) -> Iterator[Any]:
    """The composed config of job `job_num` of the sweep (hydra node included), with Hydra's
    singleton set to it while the block runs, so `${hydra:...}` interpolations resolve as in the job."""
    sweep_config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with open_dict(sweep_config.hydra.job):
        sweep_config.hydra.job.num = job_num
    hc = HydraConfig.instance()
    previous = hc.cfg
    hc.set_config(sweep_config)
    try:
        yield sweep_config
    finally:
        hc.cfg = previous


def _run_dir_of(sweep_config: Any) -> Path:
    return Path(str(OmegaConf.select(sweep_config, "hydra.sweep.dir"))) / str(
        OmegaConf.select(sweep_config, "hydra.sweep.subdir"))


def job_run_dir(launcher: Any, overrides: Sequence[str], job_num: int) -> Path:
    """The run directory job `job_num` of the sweep writes to (as Hydra's run_job computes it)."""
    with job_config(launcher, overrides, job_num) as sweep_config:
        return _run_dir_of(sweep_config)


def presubmit(launcher: Any, job_params: Sequence[tuple]) -> tuple[list[tuple], dict[int, JobReturn]]:
    """Before anything is queued, per job: a run already completed (with resume on) is not submitted
    (its JobReturn carries the recorded final accuracy), and a config that fails validation
    (`pruning.runconfig.validate`) is not either: it is recorded as failed in its run directory, as
    the job would have done on a node, with its one line on stderr (with `fail_fast=true` the launch
    stops instead, nothing submitted). Returns (jobs to submit, returns of the others by job number)."""
    from pruning.errors import ConfigError
    from pruning.runconfig import validate
    from pruning.task import run

    todo: list[tuple] = []
    done: dict[int, JobReturn] = {}
    skipped = invalid = 0
    fail_fast = bool(launcher.config.get("fail_fast", False))
    for params in job_params:
        overrides, job_num = params[0], params[2]
        with job_config(launcher, overrides, job_num) as sweep_config:
            run_dir = _run_dir_of(sweep_config)
            cfg = OmegaConf.masked_copy(sweep_config, [k for k in sweep_config if k != "hydra"])
            rec = RunRecord.load(run_dir)
            ret = JobReturn(overrides=list(overrides), working_dir=str(run_dir), status=JobStatus.COMPLETED)
            if cfg.get("resume", True) and rec is not None and rec.status == "completed":
                ret.return_value = (rec.data.get("metrics") or {}).get("final_acc")
                done[job_num], skipped = ret, skipped + 1
                continue
            try:
                validate(cfg)
            except ConfigError as exc:
                print(f"error: job #{job_num} ({' '.join(filter_overrides(overrides))}): {exc}", file=sys.stderr,
                      flush=True)
                if fail_fast:
                    raise SystemExit(2) from None
                try:  # the task's own path records it (it fails in the same check, before any work)
                    run(cfg, run_dir, list(sweep_config.hydra.overrides.task))
                except ConfigError:
                    pass
                ret.return_value = None
                done[job_num], invalid = ret, invalid + 1
                continue
        todo.append(params)
    if skipped:
        print(f"{skipped} of {len(job_params)} job(s) already completed: not submitted", flush=True)
    if invalid:
        print(f"{invalid} of {len(job_params)} job(s) failed on their config: not submitted (recorded as failed)",
              flush=True)
    return todo, done


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
        (run_dir / ERROR_FILE).write_text(f"{reason}\n\n{details}\n")
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


def fmt_duration(seconds: float) -> str:
    """A short human duration: 42s, 3m05s, 2h07m."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m"


@dataclass
class JobProgress:
    """`job k/N` lines of a sweep whose jobs run one after another (cluster=local): elapsed time and
    an ETA = mean time per finished job x jobs remaining. One instance lives as long as the launcher,
    so a sweeper that launches several batches (Optuna) keeps one clock; `total` grows with them."""

    total: int = 0
    finished: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self, k: int, now: float | None = None) -> str:
        elapsed = (time.monotonic() if now is None else now) - self.started
        eta = fmt_duration(elapsed / self.finished * (self.total - self.finished)) if self.finished else "-"
        return f"job {k}/{self.total}  elapsed {fmt_duration(elapsed)}  ETA {eta}"


# Slurm states of a job still waiting for a node (UNKNOWN: not yet visible to sacct); everything
# that is neither waiting, over nor finished counts as running (RUNNING, COMPLETING, SUSPENDED, ...)
_PENDING_STATES = ("PENDING", "REQUEUED", "CONFIGURING", "RESIZING", "UNKNOWN", "REQUEUE_HOLD", "REQUEUE_FED")


def job_category(state: str, has_result: bool) -> str:
    """pending | running | completed | failed for a submitit job state (Slurm's or the local
    executor's) and whether the job left its result pickle (a result means the job is over)."""
    word = state.split(" ")[0].upper()
    if has_result or word == "COMPLETED":  # Slurm's COMPLETED: the pickle may not be visible yet (NFS)
        return "completed"
    # the local executor's FINISHED is any exit of its wrapper process; without a result the job died
    if word in _DEAD_STATES or word == "FINISHED":
        return "failed"
    if word in _PENDING_STATES:
        return "pending"
    return "running"


def job_counts(jobs: Sequence[Any]) -> Counter[str]:
    """Counts of `job_category` over submitit jobs, from `job.state`: submitit's shared watcher, one
    sacct call for all jobs of the sweep (see `refresh_states`), never a squeue per job."""
    counts: Counter[str] = Counter()
    for job in jobs:
        try:
            state = str(job.state)
        except Exception:  # sacct briefly unreachable: count it as waiting rather than stop the sweep
            state = "UNKNOWN"
        counts[job_category(state, job.paths.result_pickle.exists())] += 1
    return counts


def counts_line(label: str, counts: Counter[str], total: int, elapsed: float) -> str:
    """One progress line of a submitted array, e.g. `slurm 1234: 8 jobs: 1 pending, 4 running,
    2 completed, 1 failed (elapsed 2m05s)`."""
    parts = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("pending", "running", "completed", "failed"))
    return f"{label}: {total} jobs: {parts} (elapsed {fmt_duration(elapsed)})"


def refresh_states(jobs: Sequence[Any]) -> None:
    """One sacct call for all jobs of the sweep (submitit's shared watcher). Left alone, the watcher
    refreshes at most every 10 minutes once jobs are old; the local executor has nothing to refresh."""
    if not jobs:
        return
    try:
        jobs[0].watcher.update()
    except Exception:  # NotImplementedError (local executor's base watcher), sacct errors
        pass


def wait_with_progress(jobs: Sequence[Any], label: str, interval_s: float,
                       out: Callable[[str], None] | None = None, poll_s: float = 5.0) -> None:
    """Wait until every job is over, printing `counts_line` when the counts have changed, at most
    once per `interval_s` (the last line, all jobs over, always). interval_s <= 0: no lines."""
    out = out or (lambda msg: print(msg, flush=True))
    started = time.monotonic()
    last: Counter[str] | None = None
    last_time = -float("inf")
    refreshed = time.monotonic()
    while True:
        if interval_s > 0 and time.monotonic() - refreshed >= interval_s:
            refresh_states(jobs)
            refreshed = time.monotonic()
        counts = job_counts(jobs)
        over = counts["completed"] + counts["failed"] == len(jobs)
        now = time.monotonic()
        if interval_s > 0 and counts != last and (over or now - last_time >= interval_s):
            out(counts_line(label, counts, len(jobs), now - started))
            last, last_time = counts, now
        if over:
            return
        time.sleep(min(poll_s, interval_s) if interval_s > 0 else poll_s)


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
    """BaseSubmititLauncher.launch of hydra-submitit-launcher 1.2 (one job array per batch), with
    `presubmit` first (configs checked, completed runs not queued), `collect` instead of
    `j.results()[0]`, a line of job counts every `progress_interval_s` while it waits, and batches
    of at most `max_array_size` jobs per array (submitted in turn)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    assert launcher.config is not None
    assert len(job_overrides) > 0
    params = dict(launcher.params)
    # this project's keys (conf/cluster/*.yaml): not submitit parameters
    interval_s = float(params.pop("progress_interval_s", 60.0) or 0)
    array_size = params.pop("max_array_size", None)
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
    todo, by_num = presubmit(launcher, job_params)
    size = int(array_size) if array_size else max(len(todo), 1)
    for start in range(0, len(todo), size):
        chunk = todo[start:start + size]
        jobs = executor.map_array(launcher, *zip(*chunk))
        if not jobs:
            continue
        array = jobs[0].job_id.split("_")[0]
        print(f"submitted {len(jobs)} job(s) ({launcher._EXECUTOR} {array}); "
              f"logs in {Path(str(params['submitit_folder'])).parent}", flush=True)
        wait_with_progress(jobs, f"{launcher._EXECUTOR} {array}", interval_s)
        by_num.update({p[2]: collect(launcher, job, p[0], p[2]) for job, p in zip(jobs, chunk)})
    return [by_num[p[2]] for p in job_params]  # in the sweeper's order (Optuna pairs them with its trials)
