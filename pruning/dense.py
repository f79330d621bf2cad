"""The setup stage: pick the device, load the data, build the model and give it its dense
weights (a checkpoint, or the model's training recipe, cached on disk per recipe), optionally
re-estimate its BatchNorm statistics (`model.bn_recalibrate`), filling the run's `RunState`; and
task=train's dense checkpoint."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf

from pruning import batchnorm, calibrate
from pruning import device as device_mod
from pruning.checkpoint import atomic_torch_save
from pruning.data import build_dataset
from pruning.errors import ConfigError
from pruning.layout import get_flat, make_layout
from pruning.models import Classifier, build_model, load_weights
from pruning.record import remove_with_digest, verify_digest
from pruning.seeds import derive_seed
from pruning.train import fit, loop_parts, smoothed_loss, train_config

if TYPE_CHECKING:
    from pruning.context import RunContext

log = logging.getLogger(__name__)

# dataset keys that cannot change the dense model (its recipe is model.train)
_DATA_KEYS_NOT_IN_DENSE = calibrate.DATA_KEYS_NOT_IN_EXAMPLES


def setup(job: RunContext) -> None:
    """Fill `job.state`: device, data (bound to the noise model), model, layout, dense weights,
    the all-True mask."""
    cfg, st = job.cfg, job.state
    gpus = (cfg.get("resources") or {}).get("gpus", 0) or 0
    st.device, fallback = device_mod.pick_device(cfg.device, int(gpus))
    job.record.set_env(device=device_mod.describe(st.device), device_fallback=fallback)
    if fallback:
        log.warning(fallback)
    torch.manual_seed(derive_seed(int(cfg.seed), "global"))
    if cfg.get("deterministic", False):
        torch.use_deterministic_algorithms(True, warn_only=True)
    st.data = build_dataset(cfg.dataset, cfg.paths.data_dir)
    st.noise.bind(st.data)  # e.g. the valid input range for attacks
    model = build_model(cfg.model, st.data)
    prunable = cfg.model.get("prunable")
    st.layout = make_layout(model, list(prunable) if prunable is not None else None)
    ckpt = cfg.model.get("checkpoint")
    if ckpt and cfg.task == "prune":
        load_weights(model, ckpt)
        job.say(f"loaded dense weights from {ckpt}")
        check_finite_weights(cfg, model, str(ckpt))
    else:
        train_dense(job, model)
        check_finite_weights(cfg, model, str(cache_path(cfg)))
    st.model = model.to(st.device)
    examples = dense_bn_examples(cfg)
    # a resumed attempt restores the model's buffers and the record from its saved state right after
    # setup, so re-estimating or warning here would be thrown away (and repeated in the record)
    fresh_prune = cfg.task == "prune" and job.ckpt.state is None
    if examples and fresh_prune:
        # the same examples for every run seed: all seeds prune one dense model
        batch = int((cfg.model.get("train") or {}).get("batch_size") or cfg.dataset.get("batch_size", 64))
        used = job.recalibrate_bn(examples, "model.bn_recalibrate", derive_seed(0, "dense/bn"), batch)
        job.record.update_metrics(dense_bn_examples=used)
    st.w_dense = get_flat(st.model, st.layout)
    # a weight at exactly zero counts as pruned (as in pruning.noise.analog): a model that arrives
    # sparse, e.g. a run's model.pt as model.checkpoint, keeps those weights pruned and out of G
    st.mask = (st.w_dense != 0).to(st.device)
    zeros = st.layout.numel - int(st.mask.sum())
    if zeros and fresh_prune:
        job.record.warn(f"{zeros} of the dense model's {st.layout.numel} prunable weights "
                        f"({zeros / st.layout.numel:.2%}) are exactly zero: they count as pruned and stay zero")
    st.built()
    job.record.update_metrics(numel_prunable=st.layout.numel)


def dense_bn_examples(cfg: Any) -> int:
    """model.bn_recalibrate: training examples the loaded (or trained) dense model's BatchNorm
    statistics are re-estimated on before pruning (0 = off)."""
    return batchnorm.examples_setting(cfg.model.get("bn_recalibrate", 0), "model.bn_recalibrate")


def check_finite_weights(cfg: Any, model: torch.nn.Module, source: str) -> None:
    """NaN/inf anywhere in the dense weights would be pruned as if they were numbers (magnitude
    ranks NaN unpredictably, the solvers return NaN): stop before pruning, naming the file."""
    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())}
    if bad:
        first = next(iter(bad))
        ckpt = source == cfg.model.get("checkpoint")
        raise ConfigError("model.checkpoint" if ckpt else "model.train", source,
                          "finite weights" + ("" if ckpt else " (delete the cached file; check the recipe's lr)"),
                          f"has {sum(bad.values())} NaN/inf value(s) in "
                          f"{len(bad)} tensor(s) (first: {first}, {bad[first]})")


def cache_path(cfg: Any) -> Path:
    """The dense cache of the model's recipe: keyed by the model and dataset settings that can
    change the trained weights."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("checkpoint", None)
    model_cfg.pop("prunable", None)
    data_cfg = OmegaConf.to_container(cfg.dataset, resolve=True)
    for k in _DATA_KEYS_NOT_IN_DENSE:  # how files are fetched or checked, and the fine-tuning batch
        data_cfg.pop(k, None)
    key = hashlib.sha1(json.dumps([model_cfg, data_cfg], sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(cfg.paths.cache_dir) / "dense" / f"{cfg.model.name}-{cfg.dataset.name}-{key}.pt"


def train_dense(job: RunContext, model: Classifier) -> None:
    """Train with the model's recipe, or reuse the cached result of the same recipe (only when
    it matches the sha256 written with it; otherwise it is retrained and replaced)."""
    cfg, st = job.cfg, job.state
    cache = cache_path(cfg)
    if cache.is_file() and cfg.task == "prune":
        problem = verify_digest(cache)
        if problem is None:
            try:  # our own format (a Classifier state dict): tensors only, no code runs from it
                model.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
                job.say(f"dense model: cached {cache}")
                return
            except Exception as exc:  # a matching digest over a foreign file: retrain, never fail
                problem = f"it cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
        job.record.warn(f"dense cache {cache} not used: {problem}; retraining the dense model")
        remove_with_digest(cache)
    tcfg = dict(OmegaConf.to_container(cfg.model.train, resolve=True))
    seed = int(tcfg.pop("seed", 0))
    tc = train_config(tcfg, "model.train")
    torch.manual_seed(seed)
    model.load_state_dict(build_model(cfg.model, st.data).state_dict())  # seeded init
    model.to(st.device)
    loader, opt, sched = loop_parts(model, st.data.train, tc, derive_seed(seed, "dense-order"), job.num_workers)
    job.say(f"training dense {cfg.model.name} on {st.data.name}: {tc.epochs} epochs")
    # no noise hooks: the cached dense model is shared by every noise setting
    fit(model, loader, opt, st.device, epochs=tc.epochs, phase="dense_train", scheduler=sched,
        loss_fn=smoothed_loss(tc.label_smoothing), log=job.log, progress=job.progress, desc="dense training")
    atomic_torch_save(model.state_dict(), cache, digest=True)  # concurrent jobs may train the same recipe
    job.say(f"dense model cached at {cache}")


def save_checkpoint(job: RunContext, dense: dict[str, float]) -> None:
    """task=train: the dense model's state dict in the run directory, with its test metrics."""
    path = job.run_dir / "checkpoint.pt"
    atomic_torch_save(job.state.model.state_dict(), path)
    job.record.update_metrics(dense_acc=dense["acc"], dense_loss=dense["loss"], checkpoint=str(path))
    job.say(f"dense checkpoint: {path} (test acc {dense['acc']:.4f}); prune it with \"model.checkpoint='{path}'\"")
