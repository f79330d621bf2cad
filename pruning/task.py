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
import math
import sys
import time
import traceback
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pruning import config as config_mod
from pruning import methods
from pruning import noise as noise_mod
from pruning.calibration import DatasetRows
from pruning.checkpoint import StageCheckpoint, atomic_torch_save
from pruning.data import DataBundle, build_dataset
from pruning.errors import ConfigError
from pruning.gradients import GradientMatrix, apply_row_noise, build_gradient_matrix, noise_cache_key
from pruning.layout import ParamLayout, apply_mask, get_flat, make_layout, set_flat, sparsity_stats
from pruning.methods.base import PruneResult, PruningProblem, TrainContext
from pruning.models import Classifier, build_model, load_weights
from pruning.record import RunRecord, atomic_write_json, run_id_for
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


def derive_seed(seed: int, stream: str) -> int:
    """Independent seed per random stream, so changing one axis (e.g. the noise level) does not
    change the draws of another (e.g. the calibration subset)."""
    return int(hashlib.sha256(f"{seed}:{stream}".encode()).hexdigest()[:15], 16)


def generator(seed: int, stream: str, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, stream))
    return g


def cubic_sparsity(t: int, t0: int, t_end: int, s_init: float, s_final: float) -> float:
    """s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t_end - t0))^3 (Zhu & Gupta; WoodFisher, SWAP)."""
    if t_end <= t0:
        return s_final
    frac = min(max((t - t0) / (t_end - t0), 0.0), 1.0)
    return s_final + (s_init - s_final) * (1.0 - frac) ** 3


def _index(cfg: DictConfig, noise: noise_mod.NoiseModel) -> dict[str, Any]:
    return {
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "method": cfg.method.name,
        "schedule": cfg.schedule.name,
        "noise": noise.kind if noise is not None else cfg.noise.get("kind", "none"),
        "noise_level": noise.level if noise is not None else 0.0,
        "sparsity": float(cfg.sparsity),
        "seed": int(cfg.seed),
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
_DATA_KEYS_NOT_IN_DENSE = ("download", "verify_checksums", "batch_size", "num_workers")


def _cfg_hash(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


class Job:
    """One run, as named stages. State lives on the object so stages can be resumed."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] = ()):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.overrides = config_mod.result_overrides(overrides)
        self.progress = bool(cfg.get("progress", True))
        self.noise: noise_mod.NoiseModel | None = None
        self.record = RunRecord(
            self.run_dir,
            run_id=run_id_for(cfg.sweep_name, self.overrides, int(cfg.seed)),
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

    # ----------------------------------------------------------------- plumbing
    def say(self, msg: str) -> None:
        print(msg, flush=True)

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
            print(f"warning: tracker.log failed: {exc}", file=sys.stderr)

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
        config_mod.validate(cfg)
        self.noise = noise_mod.build(cfg.noise)
        self.record.data["index"] = _index(cfg, self.noise)
        self.record.data["noise"] = self.noise.record()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        atomic_write_json(self.run_dir / "config.resolved.json", resolved)
        self.ckpt.begin(self)  # resume from ckpt/state.pt, or start over (clears metrics.jsonl)
        self.record.start()
        self.tracker = build_tracker(cfg.logger)
        try:
            self.tracker.start(self.record, resolved)
        except Exception as exc:
            print(f"warning: tracker.start failed: {exc}", file=sys.stderr)
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
        self.record.set_timing("total", time.perf_counter() - t_all)
        self.record.complete()
        self.ckpt.clear()
        self.summary()
        return self.record.data

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.device = config_mod.resolve_device(cfg.device)
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
        else:
            self.train_dense(model)
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
        """Train with the model's recipe, or reuse the cached result of the same recipe."""
        cache = self.dense_cache_path()
        if cache.is_file() and self.cfg.task == "prune":
            load_weights(model, cache)
            self.say(f"dense model: cached {cache}")
            return
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
        atomic_torch_save(model.state_dict(), cache)  # concurrent jobs may train the same recipe
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
    def calibration_indices(self, stage: int) -> torch.Tensor:
        """(N, m) calibration example indices drawn with the run's calibration stream (fresh per stage)."""
        cal = self.cfg.calibration
        n = int(cal.num_samples) * int(cal.mini_batch)
        pool = len(self.data.calib)
        g = generator(int(self.cfg.seed), f"calibration/{stage}")
        if n <= pool:
            idx = torch.randperm(pool, generator=g)[:n]
        else:
            idx = torch.randint(pool, (n,), generator=g)
        return idx.view(int(cal.num_samples), int(cal.mini_batch))

    def calibration_rows(self, stage: int) -> DatasetRows:
        """The calibration examples of stage `stage`, read a block at a time while G is built (the
        N x m inputs are never all in memory), with the noise model's calibration-input hook
        applied per block (its draws seeded by the block number)."""
        seed, cal = int(self.cfg.seed), self.cfg.calibration
        data_cfg = OmegaConf.to_container(self.cfg.dataset, resolve=True)
        key: dict[str, Any] = {"dataset": {k: v for k, v in data_cfg.items() if k not in _DATA_KEYS_NOT_IN_DENSE},
                               "size": len(self.data.calib)}
        prepare = None
        if type(self.noise).calibration_inputs is not noise_mod.NoiseModel.calibration_inputs:
            noise, model = self.noise, self.model

            def prepare(x: torch.Tensor, y: torch.Tensor, block: int) -> torch.Tensor:
                return noise.calibration_inputs(model, x, y, generator(seed, f"noise/{stage}/inputs/{block}"))

            key["input_noise"] = {"noise": self.noise.record(), "draw": derive_seed(seed, f"noise/{stage}/inputs")}
        return DatasetRows(self.data.calib, self.calibration_indices(stage), key=key, prepare=prepare,
                           device=self.device, num_workers=self.num_workers if cal.get("num_workers") is None
                           else int(cal.num_workers))

    def gradient_matrix(self, stage: int) -> GradientMatrix:
        cal = self.cfg.calibration
        rows = self.calibration_rows(stage)
        seed = int(self.cfg.seed)  # one stream per hook: paired draws across methods and noise settings
        try:
            with self.noise.calibration_weights(self.model, self.layout, self.mask,
                                                generator(seed, f"noise/{stage}/weights")):
                # blocked G through the disk cache, keyed inside the weight-noise context
                G = build_gradient_matrix(self.model, self.layout, rows, None, rows.indices, cal,
                                          cache_dir=Path(self.cfg.paths.cache_dir) / "grads", seed=seed,
                                          key_extra=noise_cache_key(self.noise, derive_seed(seed, f"noise/{stage}/weights")),
                                          progress=self.progress)
        finally:
            rows.close()
        # gradient-row noise acts after the cache
        return apply_row_noise(G, self.noise, generator(seed, f"noise/{stage}/gradients"))

    def prune_step(self, sparsity: float, stage: int, num_stages: int, w_bar: torch.Tensor) -> PruneResult:
        name = self.cfg.method.name
        mcfg = methods.make_config(name, method_params(self.cfg))
        module = methods.get(name)
        w = get_flat(self.model, self.layout)
        grads = self.gradient_matrix(stage) if methods.needs_gradients(name) else None
        problem = PruningProblem(layout=self.layout, w=w, w_bar=w_bar, mask=self.mask.clone(), grads=grads,
                                 generator=generator(int(self.cfg.seed), f"method/{stage}"), stage=stage,
                                 num_stages=num_stages, progress=self.progress)
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

    def summary(self) -> None:
        m, ix = self.record.data["metrics"], self.record.data["index"]

        def f(v: Any) -> str:
            return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

        lines = [
            "",
            f"run      {self.run_dir}",
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
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            job.record.fail(f"interrupted: {type(exc).__name__}")
        else:
            job.record.fail(str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}")
            if not isinstance(exc, ConfigError):
                (job.run_dir / "error.txt").write_text(traceback.format_exc())
        raise
    finally:  # the tracker is always finished, on success and on failure
        try:
            job.tracker.finish(job.record)
        except Exception as exc:
            print(f"warning: tracker.finish failed: {exc}", file=sys.stderr)


def main(cfg: DictConfig) -> float | None:
    """Hydra entry (called by launch.py). Returns the final accuracy, or None for a failed run in a
    multirun (the other jobs go on unless fail_fast)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        data = run(cfg, hc.runtime.output_dir, list(hc.overrides.task))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        if multirun and not cfg.get("fail_fast", False):
            return None
        raise SystemExit(2) from None
    except Exception as exc:
        if multirun and not cfg.get("fail_fast", False):
            print(f"error: run failed ({type(exc).__name__}: {exc}); see {hc.runtime.output_dir}/error.txt",
                  file=sys.stderr, flush=True)
            return None
        raise
    acc = data.get("metrics", {}).get("final_acc")
    return float(acc) if acc is not None and not math.isnan(acc) else None

