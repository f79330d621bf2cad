"""Trackers mirror the run record to a dashboard. The local record is the source of truth, so a
tracker never fails a run: `logger=local` is the no-op tracker below, `logger=wandb` mirrors the
run to Weights & Biases (`WandbTracker`).

W&B mapping (one W&B run per job, created and finished inside the task):
  id        the record's `wandb_id`: its `run_id` (sha1 of sweep, result-relevant overrides, seed)
            for the first attempt; a requeued job that resumes from its saved state continues that
            W&B run (`resume="allow"`); an attempt that starts over (resume=false, no usable state)
            gets `<run_id>-a<attempt>`, a new W&B run, since its steps start again from 1
  group     the sweep name;  job_type  the method;  tags  model, dataset, noise kind (+ logger.tags)
  name      a short label, e.g. `swap-s0.95-gradient1.0-seed3`
  config    flat index keys (model, dataset, method, schedule, noise, noise_level, sparsity, seed,
            sweep, run_id, cell_id, overrides) for grouping/filtering, plus the resolved config under `cfg`
  history   each logged row as `<phase>/<key>` (e.g. `prune/acc`, `finetune/loss`) at the task's
            own step counter, so steps re-logged after a resume are dropped, not duplicated.
            Each phase has its own x-axis (`wandb.define_metric`, on its first row): `<phase>/epoch`
            for training loops (dense_train, finetune, stage<t>_finetune, gradual, train-time
            methods), `<phase>/stage` for pruning stages; in loops `<phase>/acc` summarises as
            `max` and `<phase>/loss` as `min` (best epoch), other keys as their last value
  summary   the record's final metrics under their record names (`final_acc`, `dense_acc`, ...),
            `status`, `time/<stage>` and `metric_names` (which keys are record metrics, some with a
            `/` like `analog/acc_mean@t=1d`); the same flat schema `pruning.report` reads back
  artifact  with `logger.log_model: true`, `<run_dir>/model.pt` as a "model" artifact named
            `model-<run_id>` (one name across attempts: each upload is a new version), metadata
            = index keys, run_id, sha256 and the final metrics
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pruning.errors import ConfigError, choice

WANDB_MODES = ("online", "offline", "disabled")
# x-axis of a phase: the first of these keys its rows carry (gradual's prune rows carry both)
_PHASE_AXES = ("stage", "epoch")

log = logging.getLogger(__name__)


class Tracker:
    """No-op tracker (`logger=local`): result.json and metrics.jsonl are all there is."""

    def start(self, record: Any, config: Mapping[str, Any]) -> None:
        pass

    def log(self, row: Mapping[str, Any], step: int) -> None:
        pass

    def log_model(self, path: Path, record: Any) -> None:
        pass

    def finish(self, record: Any) -> None:
        pass


def _warn(msg: str) -> None:
    log.warning(msg)


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


def model_artifact_name(run_id: str) -> str:
    """W&B artifact name of a run's model: the same for every attempt of the run."""
    return f"model-{run_id}"


def wandb_config(record_data: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """Flat index keys for grouping and filtering, plus the plain resolved config under `cfg`.

    The group names (model, dataset, method, noise) are both index keys and config groups, so the
    full config is nested under `cfg` instead of being merged at the top level."""
    index = dict(record_data.get("index") or {})
    flat = {k: index.get(k) for k in ("model", "dataset", "method", "schedule", "noise", "noise_level",
                                      "sparsity", "seed", "sweep")}
    flat["run_id"] = record_data.get("run_id")
    flat["cell_id"] = record_data.get("cell_id")  # what is computed: the report keeps one run per cell
    flat["overrides"] = list(record_data.get("overrides") or [])
    flat["cfg"] = dict(config)
    return flat


def wandb_summary(record_data: Mapping[str, Any]) -> dict[str, Any]:
    """The run summary: final metrics under their record names (listed in `metric_names`),
    `time/<stage>`, status, attempt, error. `pruning.report.record_from_wandb` reads it back into the run-record shape."""
    summary: dict[str, Any] = {k: n for k, v in (record_data.get("metrics") or {}).items()
                               if (n := _number(v)) is not None}
    summary.update({f"time/{k}": v for k, v in (record_data.get("timings") or {}).items()})
    # which keys are record metrics (names may hold a `/`, like history keys): pruning.report reads it
    summary["metric_names"] = sorted(str(k) for k in (record_data.get("metrics") or {}))
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
        self._phases: set[str] = set()  # phases whose metrics are defined

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
                id=data.get("wandb_id") or data["run_id"],
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
            if phase not in self._phases:
                self._define(phase, row)
            self.run.log(metrics, step=int(step))
        except Exception as exc:
            self._fail("log", exc)

    def _define(self, phase: str, row: Mapping[str, Any]) -> None:
        """The phase's x-axis and summaries, declared before its first row is logged."""
        self._phases.add(phase)
        axis = next((k for k in _PHASE_AXES if _number(row.get(k)) is not None), None)
        if axis is None:
            return  # single rows (dense, pruned, final): the global step is their axis
        x = f"{phase}/{axis}"
        self.run.define_metric(x, hidden=False)
        self.run.define_metric(f"{phase}/*", step_metric=x)
        if axis == "epoch":  # the best epoch; the record's final metrics stay the final values
            self.run.define_metric(f"{phase}/acc", step_metric=x, summary="max")
            self.run.define_metric(f"{phase}/loss", step_metric=x, summary="min")

    def log_model(self, path: Path, record: Any) -> None:
        """`model.pt` as a W&B "model" artifact (with `logger.log_model: true`)."""
        if self.run is None or self._failed or not self.cfg.get("log_model", True):
            return
        data = record.data
        try:
            import wandb

            meta = {**(data.get("index") or {}), "run_id": data.get("run_id"),
                    "sha256": (data.get("model_file") or {}).get("sha256"),
                    **{k: n for k, v in (data.get("metrics") or {}).items() if (n := _number(v)) is not None}}
            art = wandb.Artifact(model_artifact_name(data.get("run_id") or "run"), type="model", metadata=meta)
            art.add_file(str(path), name=Path(path).name)
            self.run.log_artifact(art, aliases=["latest", f"attempt{data.get('attempt', 1)}"])
        except Exception as exc:
            self._fail("log_model", exc)

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
