"""What the stages of a run share (`RunContext`): its configuration, state (`RunState`), record,
stage checkpoint and lock, and the services every stage uses: console lines, metrics rows,
stage timing, test evaluation, BatchNorm re-estimation, the method's config and the gradient matrix G."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pruning import batchnorm, calibrate, methods
from pruning import config as config_mod
from pruning.checkpoint import StageCheckpoint
from pruning.gradients import GradientMatrix
from pruning.layout import get_flat, set_flat
from pruning.lock import RunLock
from pruning.logs import ensure_console, show_progress
from pruning.record import RunRecord, run_id_for
from pruning.runconfig import coerce, index, method_params
from pruning.state import RunState
from pruning.tracking import Tracker
from pruning.train import evaluate

log = logging.getLogger("pruning.task")  # the run's lines under one logger name in launch.log


class RunContext:
    """One run's configuration, state, record, checkpoint and lock, and the services of its stages."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] = ()):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.overrides = config_mod.result_overrides(overrides)
        ensure_console()
        # tqdm bars only on a terminal; elsewhere (Slurm logs) one log line per epoch instead
        self.progress = show_progress(bool(cfg.get("progress", True)))
        self.epoch_lines = bool(cfg.get("progress", True)) and not self.progress
        self.state = RunState()
        self.record = RunRecord(self.run_dir, run_id=run_id_for(cfg.sweep_name, self.overrides, coerce(int, cfg.seed)),
                                sweep=cfg.sweep_name, overrides=self.overrides,
                                index=index(cfg, None) if cfg.get("model") else {})
        self.tracker: Tracker = Tracker()
        self.ckpt = StageCheckpoint(self.run_dir)  # state at stage boundaries: resume after preemption
        self.lock = RunLock(self.run_dir)  # one writer per run directory
        self.skipped = False
        self._threads_before: int | None = None

    # ------------------------------------------------------------------ stages
    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.record.set_timing(name, time.perf_counter() - t0)
        self.record.save()

    def once(self, name: str, body: Callable[[], None]) -> None:
        """Stage `name` unless a resumed attempt already passed it; then its boundary is saved."""
        if not self.ckpt.passed(name):
            with self.stage(name):
                body()
            self.ckpt.save(self.state, name)

    # ------------------------------------------------------------------ services
    def say(self, msg: str) -> None:
        log.info(msg)  # console and <run_dir>/<job_name>.log (Hydra's job logging)

    def log(self, row: dict[str, Any]) -> None:
        """One metrics row: numbered, streamed to metrics.jsonl and the tracker, and printed as
        one line per epoch when progress bars are off (not a terminal)."""
        self.state.step += 1
        row = {"step": self.state.step, **row}
        self.record.log_step(row)
        self.guard("log", lambda: self.tracker.log(row, self.state.step))
        if "epoch" in row and "stage" not in row:
            items = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                     if k not in ("phase", "step", "epoch")]
            log.log(logging.INFO if self.epoch_lines else logging.DEBUG, "  %s",
                    f"{row.get('phase', '')} epoch {row.get('epoch')}: " + " ".join(items))

    def guard(self, what: str, call: Callable[[], Any]) -> None:
        """A dashboard call; its failure never fails the run."""
        try:
            call()
        except Exception as exc:
            log.warning(f"tracker.{what} failed: {exc}")

    def evaluate(self) -> dict[str, float]:
        """Test accuracy and loss of the state's model."""
        return evaluate(self.state.model, self.state.data.test, self.state.device, int(self.cfg.eval.batch_size),
                        num_workers=self.num_workers)

    def recalibrate_bn(self, examples: int, key: str, seed: int, batch_size: int) -> int:
        """Re-estimate the BatchNorm statistics of the state's model on `examples` training examples
        (augmented as in training) drawn with `seed` (`pruning.batchnorm`); says so, or warns naming
        the setting `key` when the model has no BatchNorm layer. Returns the examples used."""
        st = self.state
        used = batchnorm.recalibrate(st.model, st.data.train, examples, batch_size=batch_size, device=st.device,
                                     seed=seed, num_workers=self.num_workers, progress=self.progress)
        if used == 0:
            self.record.warn(f"{key}={examples}: model {self.cfg.model.name} has no BatchNorm layer, "
                             "nothing was re-estimated")
        else:
            self.say(f"BatchNorm statistics re-estimated on {used} training examples "
                     f"({len(batchnorm.batchnorm_layers(st.model))} layers, {key})")
        return used

    @property
    def num_workers(self) -> int:
        """Loader processes for the dataset's examples (dataset.num_workers; 0 = in this process)."""
        return int(self.cfg.dataset.get("num_workers", 0) or 0)

    def masked_loss(self, w: torch.Tensor, n: int = 0) -> float:
        """Mean training loss (the first n examples of the un-augmented training split; 0 = all) of the
        network at prunable weights w, other parameters as they are; the model is left unchanged
        (the loss a method may score candidate masks with, e.g. cbs select=loss)."""
        st = self.state
        data = st.data.calib if n <= 0 else torch.utils.data.Subset(st.data.calib, range(min(n, len(st.data.calib))))
        saved = get_flat(st.model, st.layout).clone()
        set_flat(st.model, st.layout, w.to(saved))
        try:
            return evaluate(st.model, data, st.device, int(self.cfg.eval.batch_size), num_workers=self.num_workers)["loss"]
        finally:
            set_flat(st.model, st.layout, saved)

    def method_config(self) -> Any:
        return methods.make_config(self.cfg.method.name, method_params(self.cfg))

    def gradient_matrix(self, stage: int) -> GradientMatrix:
        """G of `stage` at the current weights, noise applied (pruning.calibrate)."""
        cfg, st = self.cfg, self.state
        c = calibrate.Calibration(
            calibration=OmegaConf.to_container(cfg.calibration, resolve=True),
            dataset=OmegaConf.to_container(cfg.dataset, resolve=True),
            cache_dir=Path(cfg.paths.cache_dir) / "grads", seed=int(cfg.seed), device=st.device,
            num_workers=self.num_workers, progress=self.progress, warn=self.record.warn)
        return calibrate.gradient_matrix(c, st.data.calib, st.model, st.layout, st.mask, st.noise, stage)
