"""Preemption-safe resume: the state of a run at its stage boundaries, in `<run_dir>/ckpt/state.pt`.

A run passes named boundaries in a fixed order:

  dense_eval                    dense metrics recorded
  prune/<t>                     multistage: pruning stage t done (G, mask, weights)
  <phase>/<epoch>               one epoch of a training loop done: `stage<t>_finetune`, `gradual`,
                                `finetune` (optimizer, data-order generator included)
  method/<phase>/<n>            a train-time method's loop: an epoch (grda, sdprun) or a layer (gfs)
  prune, finetune               the whole stage done

After each one `StageCheckpoint.save` writes everything needed to continue from there, atomically
(temp file, fsync, rename): the run's state as a whole (`RunState.state_dict()`: model weights,
mask, step counter, global RNG states, the noise model's running state), the run record's
metrics, stages and timings, the size of `metrics.jsonl` and the state of the training loop in
progress. A requeued Slurm job (submitit calls the launcher's `checkpoint()`, which resubmits the
same Hydra job, so it re-enters the task in the same run directory) finds the file, skips the
passed boundaries and continues; the final result equals an uninterrupted run with the same seed
in deterministic mode. G itself is not stored here: with `calibration.cache: true` (the default)
a resumed first pruning step reads G from the gradient cache; a later step recomputes it (same
examples, same weights: the same G) unless `calibration.cache_stages: all` kept it.

`resume: true` semantics: completed -> skip (in `pruning.task.Job.start`); running or failed with a state ->
resume; no state, `resume: false`, or a state saved for a different configuration -> from the start.
The directory is removed when the run completes.

Integrity: the file holds tensors and plain containers only (numbers, strings, lists, dicts: the
numpy RNG state as a tensor, a structurally shrunk model as its state dict, whose shapes rebuild
it) and is read with `torch.load(weights_only=True)`, so no code runs from it. It is written with
a sha256 sidecar (`state.pt.sha256`, `pruning.record.atomic_write(digest=True)`) that is checked
before the file is opened; a missing or wrong digest, a short file or an unreadable one is
discarded with a warning (console and the record's `warnings`) and the run starts from scratch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig, OmegaConf

from pruning.config import NON_RESULT_KEYS
from pruning.record import RunRecord, atomic_write, verify_digest
from pruning.state import RunState

STATE_VERSION = 2  # 2: plain containers only (weights_only loading), sha256 sidecar
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


def _plain(obj: Any) -> Any:
    """`obj` with numpy scalars and other number subclasses as plain Python values and tuples kept,
    so that `torch.load(weights_only=True)` reads it back (records may carry e.g. numpy floats)."""
    if isinstance(obj, torch.Tensor) or obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, OrderedDict):  # state dicts: keep the type and the modules' version metadata
        out = OrderedDict((k, _plain(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy scalar
        return obj.item()
    if hasattr(obj, "__array__"):
        return torch.as_tensor(obj)
    return obj  # anything else: torch.save keeps it and loading reports it (the state is then a miss)


def atomic_torch_save(obj: Any, path: Path, digest: bool = False) -> None:
    """torch.save, atomically (temp file, fsync, rename); digest=True adds the sha256 sidecar."""
    atomic_write(path, lambda f: torch.save(obj, f), binary=True, digest=digest)


class StageCheckpoint:
    """Saves and restores a run (`pruning.state.RunState` and the record's progress) at stage
    boundaries (see the module docstring).

    A run calls, in order: `begin(cfg, record, say)` before the record starts, `restore(state)`
    after setup, `passed(key)` / `resume_loop(...)` to skip finished work, `save(state, key, ...)`
    after each boundary and `clear()` once the run is completed.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / CKPT_DIR
        self.path = self.dir / STATE_FILE
        self.state: dict[str, Any] | None = None   # loaded state when resuming
        self.boundaries: list[str] = []            # passed boundaries, in order
        self.fingerprint: str | None = None
        self.record: RunRecord | None = None       # the record whose progress is saved with the state

    # ------------------------------------------------------------------ reading
    def load(self, warn: Callable[[str], None] | None = None) -> dict[str, Any] | None:
        """The saved state, or None when there is none or it is not trusted: then `warn(message)`
        (default: print) says why. The digest is checked before the file is opened, and it is
        opened with weights_only=True: a planted pickle is neither trusted nor run."""
        if not self.path.is_file():
            return None
        warn = warn or (lambda msg: print(f"warning: {msg}", flush=True))
        problem = verify_digest(self.path)
        if problem is None:
            try:
                state = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception as exc:  # a foreign file with a matching digest: start over, never fail
                problem = f"it cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
            else:
                if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
                    problem = "it has an unknown format"
        if problem is not None:
            warn(f"discarded the saved state {self.path}: {problem}; the run starts from scratch")
            return None
        return state

    def passed(self, key: str) -> bool:
        """Whether boundary `key` was passed (in a previous attempt or in this one)."""
        return key in self.boundaries

    @property
    def last(self) -> str | None:
        return self.boundaries[-1] if self.boundaries else None

    # ------------------------------------------------------------------ lifecycle
    def begin(self, cfg: DictConfig, record: RunRecord, say: Callable[[str], None]) -> None:
        """Decide between resuming and starting over; called before the run record starts.

        Resuming truncates `metrics.jsonl` to what it held at the saved boundary (rows logged
        after it will be logged again); starting over removes it and any stale state.
        """
        self.record = record
        self.fingerprint = config_fingerprint(cfg)
        metrics = self.run_dir / "metrics.jsonl"
        resume = cfg.get("resume", True) and cfg.get("task", "prune") == "prune"
        state = self.load(record.warn) if resume else None
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
        record.set_resumed_from(self.last)
        say(f"resume: {self.run_dir} continues after '{self.last}' (state saved in {self.path})")

    def restore(self, state: RunState) -> None:
        """Load the saved run state and the record's progress (after the setup stage)."""
        if self.state is None:
            return
        state.load_state_dict(self.state)
        self.record.resume(self.state["record"])
        self.record.save()

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

    def save(self, state: RunState, key: str, loader: Any = None, *stateful: _Stateful) -> None:
        """Record that boundary `key` was passed and persist the state to continue from it.

        Pass the loop's `loader` and optimizer (and scheduler) for an epoch boundary."""
        if key not in self.boundaries:
            self.boundaries.append(key)
        loop = None
        if loader is not None or stateful:
            gen = getattr(loader, "generator", None)
            loop = {"phase": key.rsplit("/", 1)[0], "epoch": int(key.rsplit("/", 1)[1]),
                    "generator": gen.get_state() if gen is not None else None,
                    "stateful": [obj.state_dict() for obj in stateful]}
        metrics = self.run_dir / "metrics.jsonl"
        saved = {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "boundaries": list(self.boundaries),
            **state.state_dict(),  # model, arch, mask, step, rng, noise
            "record": self.record.resumable(),
            "metrics_bytes": metrics.stat().st_size if metrics.is_file() else 0,
            "loop": loop,
        }
        atomic_torch_save(_plain(saved), self.path, digest=True)

    def clear(self) -> None:
        """Remove the saved state (the run completed, or it starts over)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.state = None
        self.boundaries = []


class LoopCheckpoint:
    """A training loop's view of the stage checkpoint (`pruning.train.LoopCheckpoint`): loop
    `phase` saves boundaries "<prefix><phase>/<epoch>" with the loop's state, and a restarted
    attempt resumes after the last. prefix "method/" serves a train-time method's loops
    (`TrainContext.checkpoint`), whose resumption is announced with `say`."""

    def __init__(self, ckpt: StageCheckpoint, state: RunState, prefix: str = "",
                 say: Callable[[str], None] | None = None):
        self.ckpt, self.state, self.prefix, self.say = ckpt, state, prefix, say

    def resume(self, phase: str, loader: Any, *stateful: Any) -> int:
        start = self.ckpt.resume_loop(self.prefix + phase, loader, *stateful)
        if start and self.say is not None:
            self.say(f"resume: method loop '{phase}' continues after epoch {start}")
        return start

    def save(self, phase: str, epoch: int, loader: Any, *stateful: Any) -> None:
        self.ckpt.save(self.state, f"{self.prefix}{phase}/{epoch}", loader, *stateful)
