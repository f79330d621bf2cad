"""The run record: `result.json` in each run directory, the source of truth for reports.

Schema (version 1):
  schema, status (running|completed|failed), run_id, run_dir, sweep, overrides,
  index      flat keys for grouping: model, dataset, method, schedule, noise, noise_level,
             sparsity, seed, sweep
  metrics    dense/pruned/finetuned accuracy and loss, achieved sparsity, non-zeros, ...
  stages     per pruning stage: target and achieved sparsity, objective, accuracy
  noise      parameters of the noise model (e.g. kappa, p, snr_db)
  timings    seconds per named stage
  env        package versions, git commit, host, Slurm job id
  error      error text when failed
Every write goes to a temp file first and is then renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import IO, Any

SCHEMA_VERSION = 1
INDEX_KEYS = ("model", "dataset", "method", "schedule", "noise", "noise_level", "sparsity", "seed", "sweep")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return _jsonable(obj.item())
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], None], binary: bool = False) -> None:
    """Call `write(f)` on a temp file in the same directory, fsync it, then rename it over `path`,
    so a reader (or a requeued job) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (see `atomic_write`)."""

    def write(f: IO[Any]) -> None:
        json.dump(_jsonable(data), f, indent=2, sort_keys=False)
        f.write("\n")

    atomic_write(path, write)


def read_json(path: str | os.PathLike) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_id_for(sweep: str, overrides: list[str], seed: int) -> str:
    """Deterministic run identity: sha1 of the sweep, the sorted result-relevant overrides and the seed."""
    key = f"{sweep}|{'|'.join(sorted(overrides))}|seed={seed}"
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment() -> dict[str, Any]:
    """Package versions, git commit, host and scheduler ids of this process."""
    versions = {}
    for pkg in ("torch", "torchvision", "numpy", "hydra-core", "omegaconf", "submitit", "wandb", "pot"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "packages": versions,
        "git_commit": _git_commit(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
    }
    try:
        import torch

        env["cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return env


class RunRecord:
    """Owns `result.json` (and `metrics.jsonl`) of one run directory."""

    def __init__(self, run_dir: str | os.PathLike, *, run_id: str, sweep: str, overrides: list[str],
                 index: Mapping[str, Any]):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "result.json"
        self.data: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "status": "running",
            "run_id": run_id,
            "run_dir": str(self.run_dir),
            "sweep": sweep,
            "overrides": list(overrides),
            "index": dict(index),
            "metrics": {},
            "stages": [],
            "noise": {},
            "timings": {},
            "env": {},
            "error": None,
            "attempt": 1,
            "started_at": None,
            "finished_at": None,
        }

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> RunRecord | None:
        """The record already in `run_dir` (None when there is none), to change its status."""
        data = read_json(Path(run_dir) / "result.json")
        if data is None:
            return None
        rec = cls(run_dir, run_id=data.get("run_id", ""), sweep=data.get("sweep", ""),
                  overrides=data.get("overrides", []), index=data.get("index", {}))
        rec.data = data
        return rec

    # ------------------------------------------------------------------ state
    def existing(self) -> dict | None:
        return read_json(self.path)

    @property
    def status(self) -> str:
        return self.data["status"]

    def start(self) -> None:
        previous = self.existing()
        if previous:
            self.data["attempt"] = int(previous.get("attempt", 0)) + 1
        self.data["status"] = "running"
        self.data["error"] = None
        self.data["started_at"] = time.time()
        self.data["env"] = environment()
        self.save()

    def complete(self) -> None:
        self.data["status"] = "completed"
        self.data["finished_at"] = time.time()
        self.save()

    def fail(self, error: str) -> None:
        self.data["status"] = "failed"
        self.data["error"] = error
        self.data["finished_at"] = time.time()
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    # ---------------------------------------------------------------- content
    def update_metrics(self, **metrics: Any) -> None:
        self.data["metrics"].update(metrics)

    def add_stage(self, stage: Mapping[str, Any]) -> None:
        """Record a pruning stage in result.json (the task also streams it as a metrics row)."""
        self.data["stages"].append(dict(stage))

    def set_timing(self, name: str, seconds: float) -> None:
        self.data["timings"][name] = round(float(seconds), 4)

    def log_step(self, row: Mapping[str, Any]) -> None:
        """Append one row to metrics.jsonl (a stream of what happened, for curves)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(_jsonable(dict(row))) + "\n")
