"""Preemption-safe resume: the state of a run at its stage boundaries, in `<run_dir>/ckpt/state.pt`.

A run passes named boundaries in a fixed order:

  dense_eval                    dense metrics recorded
  prune/<t>                     multistage: pruning stage t done (G, mask, weights)
  <phase>/<epoch>               one epoch of a training loop done: `stage<t>_finetune`, `gradual`,
                                `finetune` (optimizer, data-order generator included)
  prune, finetune               the whole stage done

After each one `StageCheckpoint.save` writes everything needed to continue from there, atomically
(temp file, fsync, rename): model weights, mask, step counter, the run record's metrics, stages
and timings, the size of `metrics.jsonl`, the RNG states and the state of the training loop in
progress. A requeued Slurm job (submitit calls the launcher's `checkpoint()`, which resubmits the
same Hydra job, so it re-enters the task in the same run directory) finds the file, skips the
passed boundaries and continues; the final result equals an uninterrupted run with the same seed
in deterministic mode. G itself is not stored here: with `calibration.cache: true` (the default)
a resumed pruning step reads G from the gradient cache instead of recomputing it.

`resume: true` semantics: completed -> skip (in `Job.run`); running or failed with a state ->
resume; no state, `resume: false`, or a state saved for a different configuration -> from the start.
The directory is removed when the run completes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig, OmegaConf

from pruning.config import NON_RESULT_KEYS
from pruning.record import atomic_write

STATE_VERSION = 1
CKPT_DIR = "ckpt"
STATE_FILE = "state.pt"
# config sections that decide the result (the fingerprint of a saved state); calibration keys that
# only trade speed for memory are left out
_RESULT_KEYS = ("task", "model", "dataset", "method", "method_args", "schedule", "noise", "finetune", "sparsity",
                "seed", "calibration")
# the same rule as run directories: calibration keys listed in NON_RESULT_KEYS do not change results
_NON_RESULT_CALIBRATION = tuple(k.split(".", 1)[1] for k in NON_RESULT_KEYS if k.startswith("calibration."))


class _Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def config_fingerprint(cfg: DictConfig | Mapping[str, Any]) -> str:
    """Hash of the result-relevant configuration, so a state is only reused by the same run."""
    parts: dict[str, Any] = {}
    for key in _RESULT_KEYS:
        value = cfg.get(key) if hasattr(cfg, "get") else None
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        if key == "calibration" and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in _NON_RESULT_CALIBRATION}
        parts[key] = value
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save, atomically (temp file, fsync, rename)."""
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


class StageCheckpoint:
    """Saves and restores a `pruning.task.Job` at stage boundaries (see the module docstring).

    The Job calls, in order: `begin(job)` before the record starts, `restore(job)` after setup,
    `passed(key)` / `resume_loop(...)` to skip finished work, `save(job, key, ...)` after each
    boundary and `clear()` once the run is completed.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.dir = Path(run_dir) / CKPT_DIR
        self.path = self.dir / STATE_FILE
        self.state: dict[str, Any] | None = None   # loaded state when resuming
        self.boundaries: list[str] = []            # passed boundaries, in order
        self.fingerprint: str | None = None
        self._setup_shapes: dict[str, tuple[int, ...]] | None = None

    # ------------------------------------------------------------------ reading
    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none (or it cannot be read: then say why)."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a torn or foreign file: start over rather than fail the run
            print(f"warning: cannot read {self.path} ({type(exc).__name__}: {exc}); starting from scratch",
                  flush=True)
            return None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            print(f"warning: {self.path} has an unknown format; starting from scratch", flush=True)
            return None
        return state

    def passed(self, key: str) -> bool:
        """Whether boundary `key` was passed (in a previous attempt or in this one)."""
        return key in self.boundaries

    @property
    def last(self) -> str | None:
        return self.boundaries[-1] if self.boundaries else None

    # ------------------------------------------------------------------ lifecycle
    def begin(self, job: Any) -> None:
        """Decide between resuming and starting over; called before the run record starts.

        Resuming truncates `metrics.jsonl` to what it held at the saved boundary (rows logged
        after it will be logged again); starting over removes it and any stale state.
        """
        cfg = job.cfg
        self.fingerprint = config_fingerprint(cfg)
        metrics = job.run_dir / "metrics.jsonl"
        state = self.load() if cfg.get("resume", True) and cfg.get("task", "prune") == "prune" else None
        if state is not None and state.get("fingerprint") != self.fingerprint:
            print(f"warning: {self.path} was saved for a different configuration; starting from scratch",
                  flush=True)
            state = None
        if state is None:
            self.clear()
            metrics.unlink(missing_ok=True)
            return
        self.state = state
        self.boundaries = list(state["boundaries"])
        size = int(state.get("metrics_bytes", 0))
        if metrics.is_file() and metrics.stat().st_size > size:
            with open(metrics, "r+b") as f:
                f.truncate(size)
        job.record.data["resumed_from"] = self.last
        job.say(f"resume: {job.run_dir} continues after '{self.last}' (state saved in {self.path})")

    def restore(self, job: Any) -> None:
        """Load the saved model, mask, record and RNG state into `job` (after its setup stage)."""
        self._setup_shapes = _shapes(job.model)
        st = self.state
        if st is None:
            return
        device = job.device
        if st.get("arch") is not None:  # the architecture changed during pruning (structured methods)
            job.model = st["arch"]["model"].to(device)
            job.layout = st["arch"]["layout"]
        else:
            job.model.load_state_dict(st["model"])
        job.mask = st["mask"].to(device)
        job.step = int(st["step"])
        rec = job.record.data
        rec["metrics"] = dict(st["record"]["metrics"])
        rec["stages"] = list(st["record"]["stages"])
        rec["timings"] = {**st["record"]["timings"], **rec["timings"]}  # this attempt's setup time
        _set_rng_state(st["rng"])
        if st.get("noise") and hasattr(job.noise, "load_state_dict"):
            job.noise.load_state_dict(st["noise"])
        job.record.save()

    def resume_loop(self, phase: str, loader: Any, *stateful: _Stateful) -> int:
        """First epoch (0-based) a training loop `phase` still has to run; restores the loop's
        optimizer (and any other `stateful` object, e.g. a scheduler) and data-order generator
        when the saved state stopped inside this loop."""
        done = [int(b.rsplit("/", 1)[1]) for b in self.boundaries
                if b.startswith(phase + "/") and b.rsplit("/", 1)[1].isdigit()]
        start = max(done, default=0)
        loop = (self.state or {}).get("loop")
        if start and loop is not None and loop["phase"] == phase and loop["epoch"] == start:
            if loop.get("generator") is not None and getattr(loader, "generator", None) is not None:
                loader.generator.set_state(loop["generator"])
            for obj, sd in zip(stateful, loop["stateful"]):
                obj.load_state_dict(sd)
        return start

    def save(self, job: Any, key: str, loader: Any = None, *stateful: _Stateful) -> None:
        """Record that boundary `key` was passed and persist the state to continue from it.

        Pass the loop's `loader` and optimizer (and scheduler) for an epoch boundary."""
        if key not in self.boundaries:
            self.boundaries.append(key)
        arch = None
        if self._setup_shapes is not None and _shapes(job.model) != self._setup_shapes:
            arch = {"model": job.model, "layout": job.layout}
        loop = None
        if loader is not None or stateful:
            gen = getattr(loader, "generator", None)
            loop = {"phase": key.rsplit("/", 1)[0], "epoch": int(key.rsplit("/", 1)[1]),
                    "generator": gen.get_state() if gen is not None else None,
                    "stateful": [obj.state_dict() for obj in stateful]}
        metrics = job.run_dir / "metrics.jsonl"
        rec = job.record.data
        state = {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint or config_fingerprint(job.cfg),
            "boundaries": list(self.boundaries),
            "model": None if arch is not None else job.model.state_dict(),
            "arch": arch,
            "mask": job.mask.detach().cpu() if job.mask is not None else None,
            "step": int(job.step),
            "record": {"metrics": rec["metrics"], "stages": rec["stages"], "timings": rec["timings"]},
            "metrics_bytes": metrics.stat().st_size if metrics.is_file() else 0,
            "rng": _rng_state(),
            "loop": loop,
            "noise": job.noise.state_dict() if hasattr(job.noise, "state_dict") else {},
        }
        atomic_torch_save(state, self.path)

    def clear(self) -> None:
        """Remove the saved state (the run completed, or it starts over)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.state = None
        self.boundaries = []
