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
  warnings   one line per reused file that failed its digest check and was recomputed (or a state
             that was discarded): what was not trusted, and what was done instead; or per setting
             that had nothing to act on (finetune.bn_recalibrate on a model without BatchNorm)
Every write goes to a temp file first and is then renamed, so a reader never sees half a file; the
file gets the mode a plain `open` would give it (0666 less the umask), not mkstemp's 0600.

Digests: files that are reused later (stage state, dense cache) get a sidecar `<file>.sha256`
(JSON: sha256 and size of the bytes) written with them (`atomic_write(..., digest=True)`);
`verify_digest` checks it before the file is opened, so a garbled, truncated or planted file is
never read.
"""

from __future__ import annotations

import errno
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
# a failed attempt's traceback (or the launcher's reason) in the run directory
ERROR_FILE = "error.txt"
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


DIGEST_SUFFIX = ".sha256"
_HASH_CHUNK = 16 << 20  # bytes per read while hashing a file


def _umask() -> int:
    """The process umask, read without changing it where Linux exposes it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only a fallback)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a new regular file under the current umask (0644 under the usual 022)."""
    return 0o666 & ~_umask()


def sha256_file(path: str | os.PathLike, start: int = 0, length: int | None = None) -> str:
    """sha256 of bytes start:start+length of a file (all from `start` when length is None),
    read in 16 MiB pieces; a file shorter than asked raises OSError (errno EIO)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left is None or left > 0:
            piece = f.read(_HASH_CHUNK if left is None else min(_HASH_CHUNK, left))
            if not piece:
                if left is not None:
                    raise OSError(errno.EIO, f"{path} ends {left} bytes early")
                break
            h.update(piece)
            if left is not None:
                left -= len(piece)
    return h.hexdigest()


def digest_path(path: str | os.PathLike) -> Path:
    """The sidecar that holds the digest of `path`: `<path>.sha256`."""
    path = Path(path)
    return path.with_name(path.name + DIGEST_SUFFIX)


def verify_digest(path: str | os.PathLike) -> str | None:
    """None when `path` matches the digest written with it, else what is wrong (one short phrase:
    no digest, wrong size, sha256 mismatch, unreadable). Costs one read of the file."""
    return _check_digest(Path(path))[0]


def _check_digest(path: Path) -> tuple[str | None, dict[str, Any] | None]:
    """(`verify_digest`'s answer, the file's own {"sha256", "bytes"} when it verifies)."""
    try:
        want = json.loads(digest_path(path).read_text())
        # the file's digest, then the one of the file it replaced (see `atomic_write`)
        accepted = [(int(d["bytes"]), str(d["sha256"])) for d in (want, *want.get("previous", []))]
    except FileNotFoundError:
        return f"it has no digest ({digest_path(path).name} is missing)", None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"its digest {digest_path(path).name} is unreadable ({type(exc).__name__})", None
    try:
        have = path.stat().st_size
        shas = {sha for size, sha in accepted if size == have}
        if not shas:
            return f"it holds {have} bytes, its digest says {accepted[0][0]}", None
        sha = sha256_file(path)
        if sha not in shas:
            return "its sha256 does not match its digest", None
    except OSError as exc:
        return f"it cannot be read ({exc})", None
    return None, {"sha256": sha, "bytes": have}


def remove_with_digest(path: str | os.PathLike) -> None:
    """Remove a file and its digest sidecar (missing ones are fine)."""
    for p in (Path(path), digest_path(path)):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], None], binary: bool = False,
                 digest: bool = False) -> None:
    """Call `write(f)` on a temp file in the same directory, fsync it, then rename it over `path`,
    so a reader (or a requeued job) never sees half a file. The file gets the umask's mode.

    digest=True also writes `<path>.sha256` (`verify_digest`) before the rename. The sidecar holds
    the new file's digest and the digest of the file it replaces, so an interruption between the
    two renames (a preempted job's exit, a kill) leaves the previous file still verifying, never
    a pair that disagrees (a requeued job then resumes from its previous save instead of starting
    over) and never an unchecked file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:  # e.g. ENOSPC: name the file that could not be written
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp creates 0600: lab-mates on a shared filesystem read records
        if digest:  # one re-read of a file that is still in the page cache
            info: dict[str, Any] = {"sha256": sha256_file(tmp), "bytes": os.path.getsize(tmp)}
            current = _check_digest(path)[1] if path.exists() else None
            if current is not None:  # the file that stays in place until the rename keeps verifying
                info["previous"] = [current]
            atomic_write(digest_path(path), lambda f: f.write(json.dumps(info) + "\n"))
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:  # name the file (ENOSPC from write() does not)
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (see `atomic_write`)."""

    def write(f: IO[Any]) -> None:
        json.dump(_jsonable(data), f, indent=2, sort_keys=False)
        f.write("\n")

    atomic_write(path, write)


def read_json(path: str | os.PathLike) -> dict | None:
    """The JSON object in `path`, or None when it is missing or cannot be read as one."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):  # missing, unreadable (permissions), garbled (JSON or UTF-8)
        return None
    return data if isinstance(data, dict) else None


def read_record(path: str | os.PathLike) -> dict | None:
    """A run record for reports: the JSON object in `path`, None when the file does not exist, and
    a stand-in `failed` record naming the file and the problem when it exists but cannot be read
    (garbled JSON, permissions, not an object), so one bad record never hides the others."""
    try:
        with open(path) as f:
            data = json.load(f)
        problem = None if isinstance(data, dict) else f"holds a JSON {type(data).__name__}, not an object"
    except FileNotFoundError:
        return None
    except OSError as exc:
        problem = f"cannot be read ({exc.strerror or exc})"
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        problem = f"is not valid JSON ({type(exc).__name__}: {str(exc)[:80]})"
    if problem is None:
        return data
    return {"status": "failed", "error": f"unreadable record {path}: it {problem}", "unreadable": True}


def run_id_for(sweep: str, overrides: list[str], seed: int) -> str:
    """Deterministic run identity: sha1 of the sweep, the sorted result-relevant overrides and the seed."""
    key = f"{sweep}|{'|'.join(sorted(overrides))}|seed={seed}"
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def _git(where: Path, *args: str) -> str | None:
    """stdout of a git command run in `where`; None outside a checkout or without git."""
    try:
        out = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state(where: Path | None = None) -> dict[str, Any]:
    """The code a run ran (`where`: default this package's checkout): `git_commit` (HEAD) and,
    since HEAD alone does not say it when tracked files were edited, `git_dirty` and
    `git_diff_sha1` (sha1 of `git diff HEAD`, None when clean); all None outside a git checkout
    (an installed wheel)."""
    where = where if where is not None else Path(__file__).resolve().parent
    commit = _git(where, "rev-parse", "HEAD")
    diff = _git(where, "diff", "HEAD", "--no-ext-diff", "--no-color") if commit else None
    dirty = None if diff is None else bool(diff)
    return {"git_commit": commit.strip() or None if commit else None, "git_dirty": dirty,
            "git_diff_sha1": hashlib.sha1(diff.encode()).hexdigest() if dirty else None}


def environment() -> dict[str, Any]:
    """Package versions (this project's too), the code's git state (`git_state`), host and scheduler
    ids of this process."""
    versions = {}
    for pkg in ("pruning-noise", "torch", "torchvision", "numpy", "scipy", "pandas", "hydra-core", "omegaconf",
                "submitit", "wandb", "pot"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "packages": versions,
        **git_state(),
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
            "warnings": [],
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
            # the traceback of an earlier attempt is history, not this attempt's error (which the record clears)
            stale = self.run_dir / ERROR_FILE
            if stale.is_file():
                stale.replace(self.run_dir / f"error.attempt{int(previous.get('attempt', 0))}.txt")
        self.data["status"] = "running"
        self.data["error"] = None
        self.data["started_at"] = time.time()
        self.data["env"] = environment()
        self.save()

    def complete(self) -> None:
        self.data["status"] = "completed"
        self.data["finished_at"] = time.time()
        self.save()

    def fail(self, error: str, error_type: str | None = None) -> None:
        """Mark the run failed with a one-line `error`; `error_type` ("config" or the exception's
        class name) lets reports group failures."""
        self.data["status"] = "failed"
        self.data["error"] = error
        if error_type is not None:
            self.data["error_type"] = error_type
        self.data["finished_at"] = time.time()
        self.save_anyhow()

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def save_anyhow(self) -> None:
        """`save`, and when that fails (disk full: no room for the temp file) a rewrite in place,
        the full record, else the fields that say it failed: the status must reach the file."""
        try:
            self.save()
            return
        except OSError as exc:
            print(f"warning: cannot write {self.path} atomically ({exc}); rewriting it in place", flush=True)
        brief = {k: self.data.get(k) for k in ("schema", "status", "run_id", "run_dir", "sweep", "overrides",
                                                "index", "error", "attempt", "finished_at")}
        for data in (self.data, brief):
            try:
                with open(self.path, "w") as f:  # truncates first: the old record's blocks are reused
                    json.dump(_jsonable(data), f, indent=1)
                    f.write("\n")
                return
            except OSError:
                continue
        print(f"error: cannot write {self.path} at all; the run's status there is stale", flush=True)

    def warn(self, message: str) -> None:
        """Something the user should know about the result (a reused file was not trusted, a setting
        had nothing to act on): say so on the console and keep the line in the record's `warnings`."""
        print(f"warning: {message}", flush=True)
        self.data.setdefault("warnings", []).append(message)

    def adopt(self, data: Mapping[str, Any]) -> None:
        """Take over a record read from disk (a completed run that is skipped)."""
        self.data = dict(data)

    # ---------------------------------------------------------------- content
    @property
    def run_id(self) -> str:
        return str(self.data["run_id"])

    @property
    def stages(self) -> list[dict[str, Any]]:
        """The recorded pruning stages (read-only use; add rows with `add_stage`)."""
        return self.data["stages"]

    def set_index(self, index: Mapping[str, Any]) -> None:
        """The flat grouping keys (`INDEX_KEYS`) once the configuration is validated."""
        self.data["index"] = dict(index)

    def set_noise(self, params: Mapping[str, Any]) -> None:
        """The parameters of the run's noise model (`NoiseModel.record()`)."""
        self.data["noise"] = dict(params)

    def set_ids(self, **ids: str) -> None:
        """Identities of this attempt: `cell_id` (what is computed), `wandb_id` (its dashboard run)."""
        unknown = set(ids) - {"cell_id", "wandb_id"}
        if unknown:
            raise KeyError(f"not a record id: {sorted(unknown)}")
        self.data.update(ids)

    def set_env(self, **fields: Any) -> None:
        """Add to `env` (set by `start`): e.g. the device the run picked, torch's thread count."""
        self.data["env"].update(fields)

    def set_resumed_from(self, boundary: str | None) -> None:
        """The stage boundary a resumed attempt continues after (`pruning.checkpoint`)."""
        self.data["resumed_from"] = boundary

    def set_model_file(self, entry: Mapping[str, Any]) -> None:
        """The saved model file (`pruning.artifacts.save_pruned`: path, digest), and save."""
        self.data["model_file"] = dict(entry)
        self.save()

    def update_metrics(self, **metrics: Any) -> None:
        self.data["metrics"].update(metrics)

    def add_stage(self, stage: Mapping[str, Any]) -> None:
        """Record a pruning stage in result.json (the task also streams it as a metrics row)."""
        self.data["stages"].append(dict(stage))

    def annotate_stage(self, stage: int, **fields: Any) -> None:
        """Add fields to the recorded row of pruning stage `stage` (e.g. the accuracy after the
        stage's fine-tuning, known only once that fine-tuning ran), and save."""
        for row in self.data["stages"]:
            if row.get("stage") == stage:
                row.update(fields)
        self.save()

    def resumable(self) -> dict[str, Any]:
        """What a stage checkpoint keeps of the record: metrics, stages, timings, warnings."""
        return {"metrics": self.data["metrics"], "stages": self.data["stages"], "timings": self.data["timings"],
                "warnings": self.data.get("warnings", [])}

    def resume(self, saved: Mapping[str, Any]) -> None:
        """Continue from `resumable()` as saved by an earlier attempt: its metrics and stages, its
        timings under this attempt's (e.g. this setup), its warnings before this attempt's."""
        self.data["metrics"] = dict(saved["metrics"])
        self.data["stages"] = list(saved["stages"])
        self.data["timings"] = {**saved["timings"], **self.data["timings"]}
        self.data["warnings"] = [*saved.get("warnings", []), *self.data.get("warnings", [])]

    def set_timing(self, name: str, seconds: float) -> None:
        self.data["timings"][name] = round(float(seconds), 4)

    def log_step(self, row: Mapping[str, Any]) -> None:
        """Append one row to metrics.jsonl (a stream of what happened, for curves)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(_jsonable(dict(row))) + "\n")
