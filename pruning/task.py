"""The task that `launch.py` runs: one run = one (model, dataset, method, noise, schedule,
sparsity, seed) cell, executed as named stages that each record their timing:

  setup       validate the config, pick the device, load data, build the model, load or
              train-and-cache the dense weights                          pruning.dense
  dense_eval  test accuracy and loss of the dense model                  pruning.evaluation
  prune       the schedule: oneshot | multistage | gradual, or a train-time method's own
              training (each step computes G when the method needs it)   pruning.schedules
  finetune    optional masked fine-tuning                                pruning.finetune
  eval        final test metrics, plus the noise model's evaluation      pruning.evaluation

The run's state (`pruning.state.RunState`) is saved at every stage boundary and restored by a
resumed attempt (`pruning.checkpoint`); the record (`pruning.record.RunRecord`) is the result.
`run(cfg, run_dir, overrides)` is usable without Hydra; `main(cfg)` is the Hydra entry.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pruning import config as config_mod
from pruning import dense, evaluation, finetune, schedules
from pruning.artifacts import save_pruned
from pruning.context import RunContext
from pruning.errors import ConfigError, RunCheckError
from pruning.lock import describe
from pruning.record import ERROR_FILE, atomic_write_json
from pruning.runconfig import index, method_params, validate
from pruning.tracking import build_tracker

__all__ = ["Job", "main", "method_params", "run"]

log = logging.getLogger(__name__)


class Job(RunContext):
    """One run as named stages (see the module docstring)."""

    # ------------------------------------------------------------------ the sequence
    def run(self) -> dict[str, Any]:
        cfg, ckpt = self.cfg, self.ckpt
        if not self.start():
            return self.record.data
        t_all = time.perf_counter()
        with self.stage("setup"):
            self.setup()
        ckpt.restore(self.state)
        if cfg.task == "train":
            with self.stage("dense_eval"):
                metrics = self.evaluate()
            dense.save_checkpoint(self, metrics)
        else:
            self.once("dense_eval", lambda: evaluation.dense_eval(self))
            self.once("prune", self.prune)
            self.once("finetune", lambda: finetune.run(self))
            with self.stage("eval"):
                evaluation.final_eval(self)
        if cfg.get("save_model", True):
            self.save_model()
        self.record.set_timing("total", time.perf_counter() - t_all)
        self.record.complete()
        ckpt.clear()
        self.say(evaluation.summary(self))
        return self.record.data

    def start(self) -> bool:
        """Skip a completed run or one another process holds; else validate, pin threads, write the
        resolved config, decide between resuming and starting over, start the record and tracker."""
        cfg = self.cfg
        existing = self.record.existing()
        if cfg.get("resume", True) and existing and existing.get("status") == "completed":
            self.say(f"skip: {self.run_dir} is already completed")
            self.record.adopt(existing)
            return False
        if not self.lock.acquire():  # another process computes this cell right now
            self.skipped = True
            self.say(f"skip: {self.run_dir} is being run by another process ({describe(self.lock.holder or {})}); "
                     f"not computing it twice (if that process is gone, delete {self.lock.path})")
            self.record.adopt(self.record.existing() or {"status": "running", "run_dir": str(self.run_dir)})
            return False
        self.state.noise = validate(cfg)
        threads = config_mod.effective_threads(cfg)
        if threads is not None:  # under deterministic=true results must not depend on OMP_NUM_THREADS
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(threads)
        self.record.set_index(index(cfg, self.state.noise))
        self.record.set_noise(self.state.noise.record())
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        atomic_write_json(self.run_dir / "config.resolved.json", resolved)
        self.ckpt.begin(cfg, self.record, self.say)  # resume from ckpt/state.pt, or start over
        self.record.set_ids(wandb_id=wandb_id(self.record.run_id, existing, self.ckpt.state is not None))
        self.record.start()
        self.record.set_ids(cell_id=config_mod.cell_id(resolved, method_params(cfg)))
        self.record.set_env(torch_threads=torch.get_num_threads())
        self.tracker = build_tracker(cfg.logger)
        self.guard("start", lambda: self.tracker.start(self.record, resolved))
        if cfg.task == "prune" and self.ckpt.state is None:  # a resumed attempt keeps the first one's warnings
            idle = idle_noise(cfg, self.state.noise)
            if idle:
                self.record.warn(idle)
        return True

    def setup(self) -> None:
        dense.setup(self)

    def prune(self) -> None:
        target = float(self.cfg.sparsity)
        schedules.select(self.cfg).run(self, target)
        evaluation.pruned_eval(self, target)

    def save_model(self) -> None:
        """The pruned (and fine-tuned) weights and mask as `<run_dir>/model.pt` (see pruning.artifacts),
        its digest in result.json, and the W&B model artifact with `logger.log_model`."""
        data, st = self.record.data, self.state
        meta = {"run_id": data["run_id"], "task": self.cfg.task, "index": data["index"],
                "metrics": {k: v for k, v in data["metrics"].items()
                            if v is None or isinstance(v, (int, float, str, bool))}}
        entry = save_pruned(self.run_dir, st.model, st.mask if self.cfg.task == "prune" else None,
                            list(st.layout.names), meta)
        self.record.set_model_file(entry)
        self.guard("log_model", lambda: self.tracker.log_model(self.run_dir / entry["path"], self.record))

    def finish(self) -> None:
        """Always, on success and failure: finish the tracker, unpin threads, release the lock."""
        if not self.skipped:
            self.guard("finish", lambda: self.tracker.finish(self.record))
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None
        self.lock.release()


def _noise_hooks_on(node: Any) -> bool:
    """Whether any training recipe under `node` (finetune, schedule stages) sets noise_hooks: true."""
    if isinstance(node, dict):
        return bool(node.get("noise_hooks")) or any(_noise_hooks_on(v) for v in node.values())
    return False


def idle_noise(cfg: DictConfig, noise: Any) -> str | None:
    """`pruning.noise.idle_reason` for this run's method and training recipes."""
    from pruning import methods
    from pruning.noise import idle_reason

    name = str(cfg.method.name)
    trains = methods.kind(name) == "train" or any(
        _noise_hooks_on(OmegaConf.to_container(cfg[k], resolve=True)) for k in ("finetune", "schedule") if k in cfg)
    return idle_reason(noise, name, methods.needs_gradients(name), trains)


def wandb_id(run_id: str, previous: dict[str, Any] | None, resumed: bool) -> str:
    """The W&B run id of this attempt: a resumed attempt continues the run of the attempt it
    resumes; a fresh start (first attempt, resume=false, no or unusable state) gets a new id
    (`<run_id>-a<attempt>` after the first), so W&B never drops its rows as steps going back."""
    if resumed and previous:
        return str(previous.get("wandb_id") or run_id)
    attempt = int(previous.get("attempt", 0)) + 1 if previous else 1
    return run_id if attempt == 1 else f"{run_id}-a{attempt}"


def run(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run one cell without Hydra. Raises on failure after recording it in result.json."""
    job = Job(cfg, run_dir, overrides)
    try:
        return job.run()
    except BaseException as exc:
        if not job.lock.acquired:  # the record belongs to the process holding the lock
            raise
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            job.record.fail(f"interrupted: {type(exc).__name__}")
        else:
            one_line = isinstance(exc, ConfigError | RunCheckError)
            job.record.fail(str(exc) if one_line else f"{type(exc).__name__}: {exc}",
                            error_type="config" if isinstance(exc, ConfigError) else type(exc).__name__)
            if not one_line:
                try:
                    (job.run_dir / ERROR_FILE).write_text(traceback.format_exc())
                except OSError:  # e.g. the disk is full: the record above already says failed
                    pass
        raise
    finally:
        job.finish()


def main(cfg: DictConfig) -> float | None:
    """Hydra entry (called by launch.py). Returns the final accuracy, or None for a failed run in a
    multirun (the other jobs go on unless fail_fast)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        data = run(cfg, hc.runtime.output_dir, list(hc.overrides.task))
    except (ConfigError, RunCheckError) as exc:  # one line; exit 2 for a bad input, 1 for a failed check
        log.error(str(exc))
        if multirun and not cfg.get("fail_fast", False):
            return None
        raise SystemExit(2 if isinstance(exc, ConfigError) else 1) from None
    except Exception as exc:  # in launch.log too (Hydra prints the traceback of a single run on stderr only)
        error_txt = Path(hc.runtime.output_dir) / ERROR_FILE
        where = f"; see {error_txt}" if error_txt.is_file() else ""
        log.error(f"run failed ({type(exc).__name__}: {exc}){where}")
        if multirun and not cfg.get("fail_fast", False):
            return None
        raise
    acc = data.get("metrics", {}).get("final_acc")
    return float(acc) if acc is not None and not math.isnan(acc) else None
