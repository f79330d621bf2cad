"""One writer per run directory: `<run_dir>/run.lock`, held while a process computes the run.

The lock file is created with O_CREAT|O_EXCL (atomic on local filesystems and NFSv3+) and holds
the holder's host, pid and Slurm job id as JSON. While held, a heartbeat thread touches its mtime
every `heartbeat_s` seconds. A lock is stale, and is taken over, when
  - its host is this host and its pid is no longer alive (a killed local run), or
  - it was written by this very Slurm job (a requeued job whose previous attempt was preempted), or
  - its host is another host and its mtime is older than `stale_s` (no heartbeat: the node died;
    pids of other hosts cannot be checked).
A second launcher of a cell whose lock is live skips it with a message instead of computing it
alongside (both would append every metrics row and race on result.json).

Taking over a stale lock renames it away first (only one of two racing processes can rename a
given file) and checks the renamed file is the one judged stale.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
# several missed heartbeats: a loaded shared filesystem may delay an mtime update by a minute
STALE_S = 300.0


def _slurm_job_id() -> str | None:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a zombie counts as alive until reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_lock(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The lock's contents plus `age_s` (seconds since its last heartbeat); None when there is none."""
    path = Path(run_dir) / LOCK_NAME
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        info = json.loads(text)
        if not isinstance(info, dict):
            raise ValueError
    except ValueError:  # being written right now, or garbage: judge it by its age alone
        info = {"host": None, "pid": None}
    info["age_s"] = max(0.0, time.time() - mtime)
    return info


def is_live(info: dict[str, Any] | None, stale_s: float = STALE_S) -> bool:
    """Whether the holder described by `info` (from `read_lock`) may still be running."""
    if info is None:
        return False
    ours = _slurm_job_id()
    if ours and info.get("slurm_job_id") == ours and info.get("pid") != os.getpid():
        return False  # an earlier attempt of this very job (requeued after preemption)
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        return pid_alive(info["pid"])
    return float(info.get("age_s", 0.0)) < stale_s


def describe(info: dict[str, Any]) -> str:
    job = f", Slurm job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return f"pid {info.get('pid')} on {info.get('host')}{job}, heartbeat {info.get('age_s', 0):.0f}s ago"


class RunLock:
    """`with RunLock(run_dir) as lock:` ... `lock.acquired` says whether this process holds it;
    when not, `lock.holder` describes who does. Released (file removed) on exit."""

    def __init__(self, run_dir: str | os.PathLike, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.heartbeat_s = float(heartbeat_s)
        self.stale_s = float(stale_s)
        self.acquired = False
        self.holder: dict[str, Any] | None = None
        self._token = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _create(self) -> bool:
        self._token = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "slurm_job_id": _slurm_job_id(), "started": time.time()})
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self._token)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over(self, stale: dict[str, Any]) -> None:
        """Move a stale lock away, unless another process replaced it in the meantime."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{socket.gethostname()}-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone else moved it; retry the create
        try:
            moved = json.loads(aside.read_text())
        except ValueError:
            moved = {"host": None, "pid": None}
        if (moved.get("host"), moved.get("pid"), moved.get("started")) != (
                stale.get("host"), stale.get("pid"), stale.get("started")):
            try:  # we moved a fresh lock of a racing taker: put it back
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def acquire(self) -> bool:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                self.acquired, self.holder = True, None
                self._thread = threading.Thread(target=self._beat, name=f"run-lock-{self.run_dir.name}",
                                                daemon=True)
                self._thread.start()
                return True
            info = read_lock(self.run_dir)
            if info is None:
                continue  # released between our create and read
            if is_live(info, self.stale_s):
                self.holder = info
                return False
            self._take_over(info)
        self.holder = read_lock(self.run_dir)
        return False

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:  # removed under us: nothing to keep alive
                return

    def release(self) -> None:
        if not self.acquired:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self.path.read_text() == self._token:  # never remove a lock another process took over
                self.path.unlink()
        except FileNotFoundError:
            pass
        self.acquired = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
