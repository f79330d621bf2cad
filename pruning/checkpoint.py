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
import random
import shutil
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pruning.config import NON_RESULT_KEYS
from pruning.layout import make_layout
from pruning.record import atomic_write, verify_digest

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


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        # a tensor, not an ndarray: the state file is read with weights_only=True
        state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
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

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


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


def reshape_like(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Give `model`'s Linear / Conv2d / BatchNorm layers the shapes of `state` (a state dict of a
    structurally shrunk copy of the same architecture, `pruning.structured.shrink`), in place, so
    that `load_state_dict(state)` fits; the layers' size attributes follow their weights."""
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        local = {k[len(prefix):]: v for k, v in state.items()
                 if k.startswith(prefix) and "." not in k[len(prefix):]}
        changed = False
        for key, value in local.items():
            old = getattr(mod, key, None)
            if not isinstance(old, torch.Tensor) or old.shape == value.shape:
                continue
            changed = True
            if isinstance(old, nn.Parameter):
                setattr(mod, key, nn.Parameter(torch.empty_like(value, device=old.device, dtype=old.dtype),
                                               requires_grad=old.requires_grad))
            else:
                setattr(mod, key, torch.empty_like(value, device=old.device, dtype=old.dtype))
        if not changed:
            continue
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, nn.Conv2d):
            depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
            mod.out_channels = mod.weight.shape[0]
            if depthwise:
                mod.in_channels = mod.groups = mod.out_channels
            else:
                mod.in_channels = mod.weight.shape[1] * mod.groups
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            ref = mod.weight if mod.weight is not None else mod.running_mean
            mod.num_features = ref.shape[0]


def atomic_torch_save(obj: Any, path: Path, digest: bool = False) -> None:
    """torch.save, atomically (temp file, fsync, rename); digest=True adds the sha256 sidecar."""
    atomic_write(path, lambda f: torch.save(obj, f), binary=True, digest=digest)


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
    def begin(self, job: Any) -> None:
        """Decide between resuming and starting over; called before the run record starts.

        Resuming truncates `metrics.jsonl` to what it held at the saved boundary (rows logged
        after it will be logged again); starting over removes it and any stale state.
        """
        cfg = job.cfg
        self.fingerprint = config_fingerprint(cfg)
        metrics = job.run_dir / "metrics.jsonl"
        resume = cfg.get("resume", True) and cfg.get("task", "prune") == "prune"
        state = self.load(job.record.warn) if resume else None
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
            reshape_like(job.model, st["model"])
            job.model.load_state_dict(st["model"])
            job.model.to(device)
            job.layout = make_layout(job.model, list(st["arch"]["layout"]))
        else:
            job.model.load_state_dict(st["model"])
        job.mask = st["mask"].to(device)
        job.step = int(st["step"])
        rec = job.record.data
        rec["metrics"] = dict(st["record"]["metrics"])
        rec["stages"] = list(st["record"]["stages"])
        rec["timings"] = {**st["record"]["timings"], **rec["timings"]}  # this attempt's setup time
        rec["warnings"] = [*st["record"].get("warnings", []), *rec.get("warnings", [])]
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
            # the state dict's shapes rebuild the shrunk model (`reshape_like`); no module is pickled
            arch = {"layout": list(job.layout.names)}
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
            "model": job.model.state_dict(),
            "arch": arch,
            "mask": job.mask.detach().cpu() if job.mask is not None else None,
            "step": int(job.step),
            "record": {"metrics": rec["metrics"], "stages": rec["stages"], "timings": rec["timings"],
                       "warnings": rec.get("warnings", [])},
            "metrics_bytes": metrics.stat().st_size if metrics.is_file() else 0,
            "rng": _rng_state(),
            "loop": loop,
            "noise": job.noise.state_dict() if hasattr(job.noise, "state_dict") else {},
        }
        atomic_torch_save(_plain(state), self.path, digest=True)

    def clear(self) -> None:
        """Remove the saved state (the run completed, or it starts over)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.state = None
        self.boundaries = []
