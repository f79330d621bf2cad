"""The task that `launch.py` runs: one run = one (model, dataset, method, noise, schedule,
sparsity, seed) cell, executed as named stages that each record their timing:

  setup       validate the config, pick the device, load data, build the model, load or
              train-and-cache the dense weights
  dense_eval  test accuracy and loss of the dense model
  prune       the schedule: oneshot | multistage | gradual (each step computes G when the method
              needs it, with the noise model's calibration hooks)
  finetune    optional masked fine-tuning
  eval        final test metrics, plus the noise model's evaluation (analog draws, robust acc)

`run(cfg, run_dir, overrides)` is usable without Hydra; `main(cfg)` is the Hydra entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import traceback
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pruning import calibrate, methods
from pruning import config as config_mod
from pruning import device as device_mod
from pruning import noise as noise_mod
from pruning.artifacts import save_pruned
from pruning.checkpoint import StageCheckpoint, atomic_torch_save
from pruning.data import DataBundle, build_dataset
from pruning.errors import ConfigError, RunCheckError
from pruning.gradients import GradientMatrix
from pruning.layout import ParamLayout, apply_mask, get_flat, make_layout, set_flat, sparsity_stats
from pruning.lock import RunLock, describe
from pruning.logs import ensure_console, show_progress
from pruning.methods.base import PruneResult, PruningProblem, TrainContext
from pruning.models import Classifier, build_model, load_weights
from pruning.record import RunRecord, atomic_write_json, remove_with_digest, run_id_for, verify_digest
from pruning.seeds import derive_seed, generator
from pruning.tracking import Tracker, build_tracker
from pruning.train import (
    TrainConfig,
    evaluate,
    make_loader,
    make_optimizer,
    make_scheduler,
    train_config,
    train_epoch,
)

log = logging.getLogger(__name__)


def _row_line(row: dict[str, Any]) -> str:
    """`finetune epoch 3: loss 0.4121 acc 0.9120 ...` from a metrics row."""
    items = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
             if k not in ("phase", "step", "epoch")]
    return f"{row.get('phase', '')} epoch {row.get('epoch')}: " + " ".join(items)


def cubic_sparsity(t: int, t0: int, t_end: int, s_init: float, s_final: float) -> float:
    """s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t_end - t0))^3 (Zhu & Gupta; WoodFisher, SWAP)."""
    if t_end <= t0:
        return s_final
    frac = min(max((t - t0) / (t_end - t0), 0.0), 1.0)
    return s_final + (s_init - s_final) * (1.0 - frac) ** 3


def _as(cast: Any, value: Any) -> Any:
    """`cast(value)`, or `value` unchanged when it is not convertible (validation reports it; the
    record must still be writable so the failure is recorded)."""
    try:
        return cast(value)
    except (TypeError, ValueError):
        return value


def _index(cfg: DictConfig, noise: noise_mod.NoiseModel) -> dict[str, Any]:
    return {
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "method": cfg.method.name,
        "schedule": cfg.schedule.name,
        "noise": noise.kind if noise is not None else cfg.noise.get("kind", "none"),
        "noise_level": noise.level if noise is not None else 0.0,
        "sparsity": _as(float, cfg.sparsity),
        "seed": _as(int, cfg.seed),
        "sweep": cfg.sweep_name,
    }


def method_params(cfg: DictConfig) -> dict[str, Any]:
    """The method's settings: its config group, then `method_args.<name>` on top (settings that apply
    only when that method runs, so a study can sweep `method` and still tune one method)."""
    params = dict(OmegaConf.to_container(cfg.method, resolve=True))
    extra = (cfg.get("method_args") or {}).get(cfg.method.name)
    if extra:
        params.update(OmegaConf.to_container(extra, resolve=True) if OmegaConf.is_config(extra) else extra)
    return params


# dataset keys that cannot change the dense model (its recipe is model.train)
_DATA_KEYS_NOT_IN_DENSE = calibrate.DATA_KEYS_NOT_IN_EXAMPLES


def _cfg_hash(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


class Job:
    """One run, as named stages. State lives on the object so stages can be resumed."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] = ()):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.overrides = config_mod.result_overrides(overrides)
        ensure_console()
        # tqdm bars only on a terminal; elsewhere (Slurm logs) one log line per epoch instead
        self.progress = show_progress(bool(cfg.get("progress", True)))
        self.epoch_lines = bool(cfg.get("progress", True)) and not self.progress
        self.noise: noise_mod.NoiseModel | None = None
        self.record = RunRecord(
            self.run_dir,
            run_id=run_id_for(cfg.sweep_name, self.overrides, _as(int, cfg.seed)),
            sweep=cfg.sweep_name,
            overrides=self.overrides,
            index=_index(cfg, None) if cfg.get("model") else {},
        )
        self.tracker: Tracker = Tracker()
        self.step = 0
        self.model: Classifier | None = None
        self.layout: ParamLayout | None = None
        self.data: DataBundle | None = None
        self.mask: torch.Tensor | None = None
        self.w_dense: torch.Tensor | None = None
        self.ckpt = StageCheckpoint(self.run_dir)  # state at stage boundaries: resume after preemption
        self.lock = RunLock(self.run_dir)  # one writer per run directory
        self.skipped = False
        self._threads_before: int | None = None

    # ----------------------------------------------------------------- plumbing
    def say(self, msg: str) -> None:
        log.info(msg)  # console and <run_dir>/<job_name>.log (Hydra's job logging)

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        yield
        self.record.set_timing(name, time.perf_counter() - t0)
        self.record.save()

    def log(self, row: dict[str, Any]) -> None:
        self.step += 1
        row = {"step": self.step, **row}
        self.record.log_step(row)
        try:
            self.tracker.log(row, self.step)
        except Exception as exc:  # a dashboard failure never fails the run
            log.warning(f"tracker.log failed: {exc}")
        if "epoch" in row and "stage" not in row:  # the plain progress line when bars are off (not a tty)
            log.log(logging.INFO if self.epoch_lines else logging.DEBUG, "  %s", _row_line(row))

    def eval_now(self) -> dict[str, float]:
        return evaluate(self.model, self.data.test, self.device, int(self.cfg.eval.batch_size),
                        num_workers=self.num_workers)

    @property
    def num_workers(self) -> int:
        """Loader processes for the dataset's examples (dataset.num_workers; 0 = in this process)."""
        return int(self.cfg.dataset.get("num_workers", 0) or 0)

    # ------------------------------------------------------------------ entry
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        existing = self.record.existing()
        if cfg.get("resume", True) and existing and existing.get("status") == "completed":
            self.say(f"skip: {self.run_dir} is already completed")
            self.record.data = existing
            return existing
        if not self.lock.acquire():  # another process computes this cell right now
            self.skipped = True
            self.say(f"skip: {self.run_dir} is being run by another process ({describe(self.lock.holder or {})}); "
                     f"not computing it twice (if that process is gone, delete {self.lock.path})")
            return self.record.existing() or {"status": "running", "run_dir": str(self.run_dir)}
        self.validate()
        self.pin_threads()
        self.record.data["index"] = _index(cfg, self.noise)
        self.record.data["noise"] = self.noise.record()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        atomic_write_json(self.run_dir / "config.resolved.json", resolved)
        self.ckpt.begin(self)  # resume from ckpt/state.pt, or start over (clears metrics.jsonl)
        self.record.data["wandb_id"] = self.wandb_id(existing)
        self.record.start()
        self.record.data["cell_id"] = config_mod.cell_id(resolved, method_params(cfg))
        self.record.data["env"]["torch_threads"] = torch.get_num_threads()
        self.tracker = build_tracker(cfg.logger)
        try:
            self.tracker.start(self.record, resolved)
        except Exception as exc:
            log.warning(f"tracker.start failed: {exc}")
        t_all = time.perf_counter()
        with self.stage("setup"):
            self.setup()
        self.ckpt.restore(self)
        if cfg.task == "train":
            self.save_dense_checkpoint()
        else:
            if not self.ckpt.passed("dense_eval"):
                with self.stage("dense_eval"):
                    dense = self.eval_now()
                    self.record.update_metrics(dense_acc=dense["acc"], dense_loss=dense["loss"])
                    self.log({"phase": "dense", **dense})
                self.ckpt.save(self, "dense_eval")
            if not self.ckpt.passed("prune"):
                with self.stage("prune"):
                    self.prune()
                self.ckpt.save(self, "prune")
            if not self.ckpt.passed("finetune"):
                with self.stage("finetune"):
                    self.finetune()
                self.ckpt.save(self, "finetune")
            with self.stage("eval"):
                self.final_eval()
        if cfg.get("save_model", True):
            self.save_model()
        self.record.set_timing("total", time.perf_counter() - t_all)
        self.record.complete()
        self.ckpt.clear()
        self.summary()
        return self.record.data

    def validate(self) -> None:
        """Every setting, before any data is loaded or a model trained: the run-level keys, the
        method's dataclass config (and each `method_args` entry's), the noise model's config."""
        cfg = self.cfg
        config_mod.validate(cfg)
        if cfg.task == "prune":
            methods.make_config(cfg.method.name, method_params(cfg))
        for name, extra in (cfg.get("method_args") or {}).items():
            if name not in methods.available():
                raise ConfigError(f"method_args.{name}", OmegaConf.to_container(extra) if OmegaConf.is_config(extra)
                                  else extra, ", ".join(methods.available()), "is not a method")
            if name == cfg.method.name:  # the active method's entry was checked merged with its group
                continue
            try:
                methods.make_config(name, OmegaConf.to_container(extra, resolve=True) if OmegaConf.is_config(extra)
                                    else dict(extra))
            except ConfigError as exc:  # name the key as the user wrote it
                raise ConfigError(exc.key.replace("method.", f"method_args.{name}.", 1), exc.value, exc.allowed,
                                  exc.problem) from None
        self.noise = noise_mod.build(cfg.noise)
        # the training recipes that will run (dense, fine-tuning, per-stage fine-tuning)
        batch = int(cfg.dataset.get("batch_size", 64))
        if cfg.model.get("train") is not None and not (cfg.model.get("checkpoint") and cfg.task == "prune"):
            train_config(OmegaConf.to_container(cfg.model.train, resolve=True), "model.train")
        if int(cfg.finetune.epochs) > 0:
            train_config({"batch_size": batch, **OmegaConf.to_container(cfg.finetune, resolve=True)}, "finetune")
        stage_ft = cfg.schedule.get("stage_finetune")
        if cfg.schedule.name == "multistage" and int(cfg.schedule.get("finetune_epochs", 0)) > 0 and stage_ft:
            train_config({"batch_size": batch, **OmegaConf.to_container(stage_ft, resolve=True),
                          "epochs": int(cfg.schedule.finetune_epochs)}, "schedule.stage_finetune")

    def pin_threads(self) -> None:
        """torch.set_num_threads(threads); under deterministic=true `threads` defaults to 1, so the
        result does not depend on the OMP_NUM_THREADS of the machine (local vs Slurm)."""
        threads = config_mod.effective_threads(self.cfg)
        if threads is not None:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(threads)

    def unpin_threads(self) -> None:
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    def check_finite_weights(self, model: torch.nn.Module, source: str) -> None:
        """NaN/inf anywhere in the dense weights would be pruned as if they were numbers (magnitude
        ranks NaN unpredictably, the solvers return NaN): stop before pruning, naming the file."""
        bad = {name: int((~torch.isfinite(t)).sum()) for name, t in model.state_dict().items()
               if t.is_floating_point() and not bool(torch.isfinite(t).all())}
        if bad:
            first = next(iter(bad))
            ckpt = source == self.cfg.model.get("checkpoint")
            raise ConfigError("model.checkpoint" if ckpt else "model.train", source,
                              "finite weights" + ("" if ckpt else " (delete the cached file; check the recipe's lr)"),
                              f"has {sum(bad.values())} NaN/inf value(s) in "
                              f"{len(bad)} tensor(s) (first: {first}, {bad[first]})")

    def wandb_id(self, previous: dict[str, Any] | None) -> str:
        """The W&B run id of this attempt: a resumed attempt continues the run of the attempt it
        resumes; a fresh start (first attempt, resume=false, no or unusable state) gets a new id
        (`<run_id>-a<attempt>` after the first), so W&B never drops its rows as steps going back."""
        run_id = self.record.data["run_id"]
        if self.ckpt.state is not None and previous:
            return str(previous.get("wandb_id") or run_id)
        attempt = int(previous.get("attempt", 0)) + 1 if previous else 1
        return run_id if attempt == 1 else f"{run_id}-a{attempt}"

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        gpus = (cfg.get("resources") or {}).get("gpus", 0) or 0
        self.device, fallback = device_mod.pick_device(cfg.device, int(gpus))
        self.record.data["env"]["device"] = device_mod.describe(self.device)
        self.record.data["env"]["device_fallback"] = fallback
        if fallback:
            log.warning(fallback)
        torch.manual_seed(derive_seed(int(cfg.seed), "global"))
        if cfg.get("deterministic", False):
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.data = build_dataset(cfg.dataset, cfg.paths.data_dir)
        if self.noise is not None:
            self.noise.bind(self.data)  # e.g. the valid input range for attacks
        model = build_model(cfg.model, self.data)
        prunable = cfg.model.get("prunable")
        self.layout = make_layout(model, list(prunable) if prunable is not None else None)
        ckpt = cfg.model.get("checkpoint")
        if ckpt and cfg.task == "prune":
            load_weights(model, ckpt)
            self.say(f"loaded dense weights from {ckpt}")
            self.check_finite_weights(model, str(ckpt))
        else:
            self.train_dense(model)
            self.check_finite_weights(model, str(self.dense_cache_path()))
        self.model = model.to(self.device)
        self.w_dense = get_flat(self.model, self.layout)
        self.mask = torch.ones(self.layout.numel, dtype=torch.bool, device=self.device)
        self.record.update_metrics(numel_prunable=self.layout.numel)

    def dense_cache_path(self) -> Path:
        cfg = self.cfg
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        model_cfg.pop("checkpoint", None)
        model_cfg.pop("prunable", None)
        data_cfg = OmegaConf.to_container(cfg.dataset, resolve=True)
        for k in _DATA_KEYS_NOT_IN_DENSE:  # how files are fetched or checked, and the fine-tuning batch
            data_cfg.pop(k, None)
        key = _cfg_hash(model_cfg, data_cfg)
        return Path(cfg.paths.cache_dir) / "dense" / f"{cfg.model.name}-{cfg.dataset.name}-{key}.pt"

    def train_dense(self, model: Classifier) -> None:
        """Train with the model's recipe, or reuse the cached result of the same recipe (only when
        it matches the sha256 written with it; otherwise it is retrained and replaced)."""
        cache = self.dense_cache_path()
        if cache.is_file() and self.cfg.task == "prune":
            problem = verify_digest(cache)
            if problem is None:
                try:  # our own format (a Classifier state dict): tensors only, no code runs from it
                    model.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
                    self.say(f"dense model: cached {cache}")
                    return
                except Exception as exc:  # a matching digest over a foreign file: retrain, never fail
                    problem = f"it cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
            self.record.warn(f"dense cache {cache} not used: {problem}; retraining the dense model")
            remove_with_digest(cache)
        tcfg = dict(OmegaConf.to_container(self.cfg.model.train, resolve=True))
        seed = int(tcfg.pop("seed", 0))
        tc: TrainConfig = train_config(tcfg, "model.train")
        torch.manual_seed(seed)
        model.load_state_dict(build_model(self.cfg.model, self.data).state_dict())  # seeded init
        model.to(self.device)
        opt = make_optimizer(model, tc)
        sched = make_scheduler(opt, tc)
        loader = make_loader(self.data.train, tc.batch_size, derive_seed(seed, "dense-order"),
                             num_workers=self.num_workers)
        self.say(f"training dense {self.cfg.model.name} on {self.data.name}: {tc.epochs} epochs")
        from tqdm.auto import trange

        for epoch in trange(tc.epochs, desc="dense training", disable=not self.progress):
            lr = opt.param_groups[0]["lr"]
            stats = train_epoch(model, loader, opt, self.device, progress=False, label_smoothing=tc.label_smoothing)
            sched.step()
            self.log({"phase": "dense_train", "epoch": epoch + 1, "lr": lr, **stats})
        atomic_torch_save(model.state_dict(), cache, digest=True)  # concurrent jobs may train the same recipe
        self.say(f"dense model cached at {cache}")

    def save_dense_checkpoint(self) -> None:
        """task=train: evaluate the dense model and save its state dict in the run directory."""
        with self.stage("dense_eval"):
            dense = self.eval_now()
        path = self.run_dir / "checkpoint.pt"
        atomic_torch_save(self.model.state_dict(), path)
        self.record.update_metrics(dense_acc=dense["acc"], dense_loss=dense["loss"], checkpoint=str(path))
        self.say(f"dense checkpoint: {path} (test acc {dense['acc']:.4f}); prune it with \"model.checkpoint='{path}'\"")

    # --------------------------------------------------------------- pruning
    def gradient_matrix(self, stage: int) -> GradientMatrix:
        """G of `stage` at the current weights, noise applied (pruning.calibrate)."""
        c = calibrate.Calibration(
            calibration=OmegaConf.to_container(self.cfg.calibration, resolve=True),
            dataset=OmegaConf.to_container(self.cfg.dataset, resolve=True),
            cache_dir=Path(self.cfg.paths.cache_dir) / "grads", seed=int(self.cfg.seed), device=self.device,
            num_workers=self.num_workers, progress=self.progress, warn=self.record.warn)
        return calibrate.gradient_matrix(c, self.data.calib, self.model, self.layout, self.mask, self.noise, stage)

    def masked_loss(self, w: torch.Tensor, n: int = 0) -> float:
        """Mean training loss (the first n examples of the un-augmented training split; 0 = all) of the
        network at prunable weights w, other parameters as they are; the model is left unchanged."""
        data = self.data.calib if n <= 0 else torch.utils.data.Subset(self.data.calib, range(min(n, len(self.data.calib))))
        saved = get_flat(self.model, self.layout).clone()
        set_flat(self.model, self.layout, w.to(saved))
        try:
            return evaluate(self.model, data, self.device, int(self.cfg.eval.batch_size),
                            num_workers=self.num_workers)["loss"]
        finally:
            set_flat(self.model, self.layout, saved)

    def prune_step(self, sparsity: float, stage: int, num_stages: int, w_bar: torch.Tensor) -> PruneResult:
        name = self.cfg.method.name
        mcfg = methods.make_config(name, method_params(self.cfg))
        module = methods.get(name)
        w = get_flat(self.model, self.layout)
        grads = self.gradient_matrix(stage) if methods.needs_gradients(name) else None
        problem = PruningProblem(layout=self.layout, w=w, w_bar=w_bar, mask=self.mask.clone(), grads=grads,
                                 generator=generator(int(self.cfg.seed), f"method/{stage}"), stage=stage,
                                 num_stages=num_stages, progress=self.progress, loss=self.masked_loss)
        result = module.prune(problem, sparsity, mcfg)
        set_flat(self.model, self.layout, result.w * result.mask)
        self.mask = result.mask.to(self.device)
        apply_mask(self.model, self.layout, self.mask)
        return result

    def record_stage(self, stage: int, target: float, result: PruneResult | None, seconds: float,
                     **extra: Any) -> None:
        ev = self.eval_now()
        stats = sparsity_stats(self.model, self.layout)
        row = {"stage": stage, "target_sparsity": target, "sparsity": stats["sparsity_prunable"],
               "acc": ev["acc"], "loss": ev["loss"], "seconds": round(seconds, 4), **extra}
        if result is not None:
            row.update({k: v for k, v in result.info.items() if isinstance(v, (int, float, str, bool))})
        self.record.add_stage(row)
        self.log({"phase": "prune", **row})
        self.say(f"  stage {stage}: target {target:.4f} achieved {row['sparsity']:.4f} acc {ev['acc']:.4f}")
        if row.get("no_progress"):  # the solver returned its start (e.g. magnitude pruning): say so
            self.say(f"  warning: stage {stage}: {self.cfg.method.name} made no progress from its starting point "
                     f"({row.get('no_progress_reason', 'no step')})")

    def prune(self) -> None:
        cfg = self.cfg
        target = float(cfg.sparsity)
        sched = cfg.schedule
        if methods.kind(cfg.method.name) == "train":
            self.run_train_time_method(target)
        elif sched.name == "oneshot":
            t0 = time.perf_counter()
            res = self.prune_step(target, 1, 1, self.w_dense)
            self.record_stage(1, target, res, time.perf_counter() - t0)
        elif sched.name == "multistage":
            T = int(sched.stages)
            s0 = float(sched.get("initial_sparsity", 0.0))
            for t in range(1, T + 1):
                s_t = cubic_sparsity(t, 1, T, s0, target)
                if not self.ckpt.passed(f"prune/{t}"):
                    t0 = time.perf_counter()
                    anchor = get_flat(self.model, self.layout) if sched.get("reanchor", False) else self.w_dense
                    res = self.prune_step(s_t, t, T, anchor)
                    self.record_stage(t, s_t, res, time.perf_counter() - t0)
                    self.ckpt.save(self, f"prune/{t}")
                if int(sched.get("finetune_epochs", 0)) > 0:
                    stage_ft = sched.get("stage_finetune")  # its own optimiser, else the finetune group's
                    self.masked_training(int(sched.finetune_epochs),
                                         stage_ft if stage_ft else (cfg.finetune if cfg.finetune.epochs else None),
                                         stream=f"stage{t}", phase=f"stage{t}_finetune",
                                         key="schedule.stage_finetune" if stage_ft else "finetune")
                    ft = self.eval_now()  # the stage row also gets the accuracy after its fine-tuning (SWAP)
                    for row in self.record.data["stages"]:
                        if row.get("stage") == t:
                            row.update(finetuned_acc=ft["acc"], finetuned_loss=ft["loss"])
                    self.record.save()
        elif sched.name == "gradual":
            self.gradual(target)
        stats = sparsity_stats(self.model, self.layout)
        pruned = self.eval_now()
        self.record.update_metrics(pruned_acc=pruned["acc"], pruned_loss=pruned["loss"], **stats)
        self.log({"phase": "pruned", **pruned, **stats})
        self.check_sparsity(target, stats)

    def check_sparsity(self, target: float, stats: dict[str, Any]) -> None:
        """A weight-space method keeps k = floor((1 - s) p) weights (per tensor for layer-wise
        rules), so the achieved sparsity is at least the target minus one weight per prunable
        tensor; exact zeros of the dense model can only raise it. Less is a broken run (e.g. NaN
        weights that never compare as small). Train-time methods (grda, sdprun: sparsity emerges
        from the regulariser and is recorded; gfs: channels by its budget) are exempt."""
        if methods.kind(self.cfg.method.name) == "train":
            return
        achieved, numel = float(stats["sparsity_prunable"]), int(stats["numel_prunable"])
        tol = len(self.layout.names) / max(numel, 1) + 1e-9
        if achieved < target - tol:
            raise RunCheckError(f"achieved sparsity {achieved:.6f} misses the target sparsity={target} "
                                f"(tolerance {tol:.2g}: one weight per prunable tensor); "
                                f"{stats['nnz_prunable']}/{numel} prunable weights are non-zero")

    def gradual(self, target: float) -> None:
        """Prune at epochs start, start+freq, ..., end on the cubic schedule; train every epoch."""
        sched = self.cfg.schedule
        start, freq, end, epochs = int(sched.start), int(sched.freq), int(sched.end), int(sched.epochs)
        if freq <= 0 or end < start or epochs <= end:
            raise ConfigError("schedule", {"start": start, "freq": freq, "end": end, "epochs": epochs},
                              "freq > 0, start <= end < epochs", "is inconsistent")
        prune_epochs = list(range(start, end + 1, freq))
        tc = train_config({"epochs": epochs, "batch_size": int(self.cfg.dataset.get("batch_size", 64)),
                           "lr": float(sched.lr), "momentum": float(sched.momentum),
                           "weight_decay": float(sched.weight_decay),
                           "lr_schedule": str(sched.get("lr_schedule", "none")),
                           "milestones": tuple(int(m) for m in sched.get("milestones", ())),
                           "gamma": float(sched.get("gamma", 0.1)),
                           "label_smoothing": float(sched.get("label_smoothing", 0.0))}, "schedule")
        opt = make_optimizer(self.model, tc)
        lr_sched = make_scheduler(opt, tc)  # per epoch; saved with the optimizer at each boundary
        loader = make_loader(self.data.train, tc.batch_size, derive_seed(int(self.cfg.seed), "gradual-order"),
                             num_workers=self.num_workers)
        for epoch in range(self.ckpt.resume_loop("gradual", loader, opt, lr_sched), epochs):
            if epoch in prune_epochs:
                s_t = cubic_sparsity(epoch, prune_epochs[0], prune_epochs[-1], float(sched.initial_sparsity), target)
                t0 = time.perf_counter()
                res = self.prune_step(s_t, len(self.record.data["stages"]) + 1, len(prune_epochs), self.w_dense)
                self.record_stage(len(self.record.data["stages"]) + 1, s_t, res, time.perf_counter() - t0,
                                  epoch=epoch)
            stats = train_epoch(self.model, loader, opt, self.device, self.layout, self.mask,
                                desc=f"gradual epoch {epoch + 1}", progress=self.progress,
                                label_smoothing=tc.label_smoothing)
            self.log({"phase": "gradual", "epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], **stats,
                      **self.eval_now()})
            lr_sched.step()
            self.ckpt.save(self, f"gradual/{epoch + 1}", loader, opt, lr_sched)

    def run_train_time_method(self, target: float) -> None:
        name = self.cfg.method.name
        mcfg = methods.make_config(name, method_params(self.cfg))
        ctx = TrainContext(model=self.model, layout=self.layout, data=self.data, device=self.device,
                           sparsity=target, generator=generator(int(self.cfg.seed), "method/1"),
                           noise=self.noise, progress=self.progress, log=self.log, evaluate=self.eval_now,
                           checkpoint=MethodCheckpoint(self))
        t0 = time.perf_counter()
        res = methods.get(name).run(ctx, mcfg)
        self.model = ctx.model  # a structured method may return a physically smaller model
        if res.mask is not None and res.mask.numel() == ctx.layout.numel:
            self.mask = res.mask.to(self.device)
        elif ctx.layout is not self.layout:  # a smaller model: the old mask no longer fits
            self.mask = torch.ones(ctx.layout.numel, dtype=torch.bool, device=self.device)
        self.layout = ctx.layout
        self.record_stage(1, target, res, time.perf_counter() - t0)
        structured = {k: v for k, v in res.info.items() if k.startswith("structured/")}
        if structured:
            self.record.update_metrics(**structured)

    # ------------------------------------------------------------ fine-tune
    def masked_training(self, epochs: int, ft_cfg: Any, stream: str, phase: str, key: str = "finetune") -> None:
        params = dict(OmegaConf.to_container(ft_cfg, resolve=True)) if ft_cfg is not None else {}
        params["epochs"] = epochs
        params.setdefault("batch_size", int(self.cfg.dataset.get("batch_size", 64)))
        tc = train_config(params, key)
        opt = make_optimizer(self.model, tc)
        lr_sched = make_scheduler(opt, tc)  # per epoch; saved with the optimizer at each boundary
        loader = make_loader(self.data.train, tc.batch_size, derive_seed(int(self.cfg.seed), f"finetune/{stream}"),
                             num_workers=self.num_workers)
        for epoch in range(self.ckpt.resume_loop(phase, loader, opt, lr_sched), tc.epochs):
            lr = opt.param_groups[0]["lr"]
            stats = train_epoch(self.model, loader, opt, self.device, self.layout, self.mask,
                                desc=f"{phase} {epoch + 1}/{tc.epochs}", progress=self.progress,
                                label_smoothing=tc.label_smoothing)
            self.log({"phase": phase, "epoch": epoch + 1, "lr": lr, **stats, **self.eval_now()})
            lr_sched.step()
            self.ckpt.save(self, f"{phase}/{epoch + 1}", loader, opt, lr_sched)

    def finetune(self) -> None:
        if int(self.cfg.finetune.epochs) > 0:
            self.masked_training(int(self.cfg.finetune.epochs), self.cfg.finetune, "final", "finetune")
            ft = self.eval_now()
            self.record.update_metrics(finetuned_acc=ft["acc"], finetuned_loss=ft["loss"])
        else:
            self.record.update_metrics(finetuned_acc=None, finetuned_loss=None)

    # ------------------------------------------------------------------ eval
    def final_eval(self) -> None:
        final = self.eval_now()
        stats = sparsity_stats(self.model, self.layout)
        extra = self.noise.evaluate(self.model, self.data, self.layout, self.mask, self.device,
                                    generator(int(self.cfg.seed), "noise/eval"), int(self.cfg.eval.batch_size),
                                    num_workers=self.num_workers)
        self.record.update_metrics(final_acc=final["acc"], final_loss=final["loss"], **stats, **extra)
        self.log({"phase": "final", **final, **stats})

    def save_model(self) -> None:
        """The pruned (and fine-tuned) weights and mask as `<run_dir>/model.pt` (see pruning.artifacts),
        its digest in result.json, and the W&B model artifact with `logger.log_model`."""
        meta = {"run_id": self.record.data["run_id"], "task": self.cfg.task, "index": self.record.data["index"],
                "metrics": {k: v for k, v in self.record.data["metrics"].items()
                            if v is None or isinstance(v, (int, float, str, bool))}}
        entry = save_pruned(self.run_dir, self.model, self.mask if self.cfg.task == "prune" else None,
                            list(self.layout.names), meta)
        self.record.data["model_file"] = entry
        self.record.save()
        try:
            self.tracker.log_model(self.run_dir / entry["path"], self.record)
        except Exception as exc:  # a dashboard failure never fails the run
            log.warning(f"tracker.log_model failed: {exc}")

    def summary(self) -> None:
        m, ix = self.record.data["metrics"], self.record.data["index"]

        def f(v: Any) -> str:
            return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

        lines = [
            "",
            f"run      {self.run_dir}",
            f"device   {self.record.data['env'].get('device', '-')}",
            f"cell     model={ix['model']} dataset={ix['dataset']} method={ix['method']} "
            f"schedule={ix['schedule']} noise={ix['noise']}({f(ix['noise_level'])}) seed={ix['seed']}",
        ]
        if self.cfg.task == "train":
            lines.append(f"dense    acc {f(m.get('dense_acc'))}  loss {f(m.get('dense_loss'))}")
        else:
            lines += [
                f"sparsity target {f(float(ix['sparsity']))}  achieved {f(m.get('sparsity_prunable'))} "
                f"(prunable, {m.get('nnz_prunable')}/{m.get('numel_prunable')} non-zero)  "
                f"{f(m.get('sparsity_total'))} (all parameters)",
                f"accuracy dense {f(m.get('dense_acc'))}  pruned {f(m.get('pruned_acc'))}  "
                f"fine-tuned {f(m.get('finetuned_acc'))}",
                f"loss     dense {f(m.get('dense_loss'))}  pruned {f(m.get('pruned_loss'))}  "
                f"fine-tuned {f(m.get('finetuned_loss'))}",
            ]
        t = self.record.data["timings"]
        lines.append("time     " + "  ".join(f"{k} {v:.1f}s" for k, v in t.items()))
        if self.record.data.get("model_file"):
            lines.append(f"model    {self.run_dir / self.record.data['model_file']['path']} "
                         "(pruning.load_pruned(run_dir))")
        lines.append(f"record   {self.record.path}")
        self.say("\n".join(lines))


class MethodCheckpoint:
    """A train-time method's view of the job's stage checkpoint: its loop `phase` saves boundaries
    "method/<phase>/<epoch>" with the loop's state, and a restarted attempt resumes after the last."""

    def __init__(self, job: Job):
        self.job = job

    def resume(self, phase: str, loader: Any, *stateful: Any) -> int:
        start = self.job.ckpt.resume_loop(f"method/{phase}", loader, *stateful)
        if start:
            self.job.say(f"resume: method loop '{phase}' continues after epoch {start}")
        return start

    def save(self, phase: str, epoch: int, loader: Any, *stateful: Any) -> None:
        self.job.ckpt.save(self.job, f"method/{phase}/{epoch}", loader, *stateful)


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
            job.record.data["error_type"] = "config" if isinstance(exc, ConfigError) else type(exc).__name__
            job.record.fail(str(exc) if one_line else f"{type(exc).__name__}: {exc}")
            if not one_line:
                try:
                    (job.run_dir / "error.txt").write_text(traceback.format_exc())
                except OSError:  # e.g. the disk is full: the record above already says failed
                    pass
        raise
    finally:  # the tracker is always finished, on success and on failure; then the lock is released
        try:
            if not job.skipped:
                job.tracker.finish(job.record)
        except Exception as exc:
            log.warning(f"tracker.finish failed: {exc}")
        job.unpin_threads()
        job.lock.release()


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
        error_txt = Path(hc.runtime.output_dir) / "error.txt"
        where = f"; see {error_txt}" if error_txt.is_file() else ""
        log.error(f"run failed ({type(exc).__name__}: {exc}){where}")
        if multirun and not cfg.get("fail_fast", False):
            return None
        raise
    acc = data.get("metrics", {}).get("final_acc")
    return float(acc) if acc is not None and not math.isnan(acc) else None

