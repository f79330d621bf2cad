"""Trackers mirror the run record to a dashboard. The local record is the source of truth, so a
tracker never fails a run: `logger=local` is the no-op tracker below, `logger=wandb` mirrors the
run to Weights & Biases (`WandbTracker`).

W&B mapping (one W&B run per job, created and finished inside the task):
  id        the record's `run_id` (sha1 of sweep, result-relevant overrides, seed): a requeued job
            re-enters the same run directory and resumes the same W&B run (`resume="allow"`)
  group     the sweep name;  job_type  the method;  tags  model, dataset, noise kind (+ logger.tags)
  name      a short label, e.g. `swap-s0.95-gradient1.0-seed3`
  config    flat index keys (model, dataset, method, schedule, noise, noise_level, sparsity, seed,
            sweep, run_id, overrides) for grouping/filtering, plus the resolved config under `cfg`
  history   each logged row as `<phase>/<key>` (e.g. `prune/acc`, `finetune/loss`) at the task's
            own step counter, so steps re-logged after a resume are dropped, not duplicated
  summary   the record's final metrics under their record names (`final_acc`, `dense_acc`, ...),
            `status`, and `time/<stage>`; the same flat schema `pruning.report` reads back
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pruning.errors import ConfigError, choice

WANDB_MODES = ("online", "offline", "disabled")


class Tracker:
    """No-op tracker (`logger=local`): result.json and metrics.jsonl are all there is."""

    def start(self, record: Any, config: Mapping[str, Any]) -> None:
        pass

    def log(self, row: Mapping[str, Any], step: int) -> None:
        pass

    def finish(self, record: Any) -> None:
        pass


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _number(v: Any) -> float | int | None:
    """A finite int/float (bools as 0/1), else None."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float)) and math.isfinite(v):
        return v
    return None


def _fmt_num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def run_label(index: Mapping[str, Any]) -> str:
    """Short readable W&B run name: `<method>-s<sparsity>[-<noise><level>][-<schedule>]-seed<k>`."""
    parts = [str(index.get("method", "run"))]
    if index.get("sparsity") is not None:
        parts.append(f"s{_fmt_num(index['sparsity'])}")
    noise = index.get("noise")
    if noise and noise != "none":
        parts.append(f"{noise}{_fmt_num(index.get('noise_level', ''))}")
    schedule = index.get("schedule")
    if schedule and schedule != "oneshot":
        parts.append(str(schedule))
    parts.append(f"seed{index.get('seed', 0)}")
    return "-".join(parts)


def wandb_config(record_data: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """Flat index keys for grouping and filtering, plus the plain resolved config under `cfg`.

    The group names (model, dataset, method, noise) are both index keys and config groups, so the
    full config is nested under `cfg` instead of being merged at the top level."""
    index = dict(record_data.get("index") or {})
    flat = {k: index.get(k) for k in ("model", "dataset", "method", "schedule", "noise", "noise_level",
                                      "sparsity", "seed", "sweep")}
    flat["run_id"] = record_data.get("run_id")
    flat["overrides"] = list(record_data.get("overrides") or [])
    flat["cfg"] = dict(config)
    return flat


def wandb_summary(record_data: Mapping[str, Any]) -> dict[str, Any]:
    """The run summary: final metrics under their record names, `time/<stage>`, status, attempt,
    error. `pruning.report.record_from_wandb` reads it back into the run-record shape."""
    summary: dict[str, Any] = {k: n for k, v in (record_data.get("metrics") or {}).items()
                               if (n := _number(v)) is not None}
    summary.update({f"time/{k}": v for k, v in (record_data.get("timings") or {}).items()})
    summary["status"] = record_data.get("status")
    summary["attempt"] = record_data.get("attempt")
    if record_data.get("error"):
        summary["error"] = str(record_data["error"])[:1000]
    return summary


class WandbTracker(Tracker):
    """Mirror of one run in W&B; every W&B error is turned into a warning and disables the tracker."""

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = dict(cfg)
        self.mode = str(self.cfg.get("mode") or "offline")
        self.run: Any = None
        self._failed = False

    def _fail(self, what: str, exc: BaseException) -> None:
        self._failed = True
        _warn(f"W&B {what} failed, continuing without W&B (the local run record is complete): "
              f"{type(exc).__name__}: {exc}")

    def start(self, record: Any, config: Mapping[str, Any]) -> None:
        data = record.data
        index = data.get("index") or {}
        tags = [str(index[k]) for k in ("model", "dataset", "noise") if index.get(k) is not None]
        tags += [str(t) for t in (self.cfg.get("tags") or [])]
        try:
            import wandb

            settings = wandb.Settings(**dict(self.cfg.get("settings") or {}))
            self.run = wandb.init(
                project=self.cfg.get("project") or "pruning-noise",
                entity=self.cfg.get("entity") or None,
                id=data["run_id"],
                resume="allow",
                group=data.get("sweep") or index.get("sweep"),
                job_type=str(index.get("method", "run")),
                name=run_label(index),
                tags=list(dict.fromkeys(tags)),
                config=wandb_config(data, config),
                dir=str(Path(record.run_dir)),
                mode=self.mode,
                reinit="create_new",
                settings=settings,
            )
        except Exception as exc:
            self._fail("init", exc)
            self.run = None

    def log(self, row: Mapping[str, Any], step: int) -> None:
        if self.run is None or self._failed:
            return
        phase = str(row.get("phase", "run"))
        metrics = {f"{phase}/{k}": n for k, v in row.items()
                   if k not in ("phase", "step") and (n := _number(v)) is not None}
        if not metrics:
            return
        try:
            self.run.log(metrics, step=int(step))
        except Exception as exc:
            self._fail("log", exc)

    def finish(self, record: Any) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        data = record.data
        completed = data.get("status") == "completed"
        try:
            run.summary.update(wandb_summary(data))
        except Exception as exc:
            _warn(f"W&B summary update failed: {type(exc).__name__}: {exc}")
        try:
            run.finish(exit_code=0 if completed else 1)
        except Exception as exc:
            _warn(f"W&B finish failed (the local run record is complete): {type(exc).__name__}: {exc}")


def build_tracker(cfg: Mapping[str, Any]) -> Tracker:
    """`logger.name`: local (no-op) or wandb (`logger.mode`: online | offline | disabled)."""
    name = cfg.get("name", "local")
    if name == "local":
        return Tracker()
    if name == "wandb":
        mode = str(cfg.get("mode") or "offline")
        choice(mode, "logger.mode", WANDB_MODES)
        if mode == "disabled":
            return Tracker()
        return WandbTracker(cfg)
    raise ConfigError("logger", name, "local, wandb")
