"""Reading a run's configuration: every check before any data is loaded (`validate`), the
active method's settings (`method_params`) and the record's flat index (`index`)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from pruning import config as config_mod
from pruning import dense, finetune, methods, schedules
from pruning import noise as noise_mod
from pruning.errors import ConfigError
from pruning.train import train_config


def plain(value: Any, resolve: bool = True) -> Any:
    """An OmegaConf node as plain containers; anything else unchanged."""
    return OmegaConf.to_container(value, resolve=resolve) if OmegaConf.is_config(value) else value


def method_params(cfg: DictConfig) -> dict[str, Any]:
    """The method's settings: its config group, then `method_args.<name>` on top (settings that apply
    only when that method runs, so a study can sweep `method` and still tune one method)."""
    params = dict(OmegaConf.to_container(cfg.method, resolve=True))
    extra = (cfg.get("method_args") or {}).get(cfg.method.name)
    if extra:
        params.update(plain(extra))
    return params


def coerce(cast: Any, value: Any) -> Any:
    """`cast(value)`, or `value` unchanged when it is not convertible (validation reports it; the
    record must still be writable so the failure is recorded)."""
    try:
        return cast(value)
    except (TypeError, ValueError):
        return value


def index(cfg: DictConfig, noise: noise_mod.NoiseModel | None) -> dict[str, Any]:
    """The record's flat grouping keys (`pruning.record.INDEX_KEYS`)."""
    return {
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "method": cfg.method.name,
        "schedule": cfg.schedule.name,
        "noise": noise.kind if noise is not None else cfg.noise.get("kind", "none"),
        "noise_level": noise.level if noise is not None else 0.0,
        "sparsity": coerce(float, cfg.sparsity),
        "seed": coerce(int, cfg.seed),
        "sweep": cfg.sweep_name,
    }


def validate(cfg: DictConfig) -> noise_mod.NoiseModel:
    """Every setting, before any data is loaded or a model trained: the run-level keys, the
    method's dataclass config (and each `method_args` entry's), the schedule and its combination
    with the method, the noise model's config, and the training recipes that will run (dense,
    fine-tuning, per-stage fine-tuning, gradual). Returns the noise model."""
    config_mod.validate(cfg)
    if cfg.task == "prune":
        methods.make_config(cfg.method.name, method_params(cfg))
    for name, extra in (cfg.get("method_args") or {}).items():
        if name not in methods.available():
            raise ConfigError(f"method_args.{name}", plain(extra, resolve=False), ", ".join(methods.available()),
                              "is not a method")
        if name == cfg.method.name:  # the active method's entry was checked merged with its group
            continue
        try:
            methods.make_config(name, dict(plain(extra)))
        except ConfigError as exc:  # name the key as the user wrote it
            raise ConfigError(exc.key.replace("method.", f"method_args.{name}.", 1), exc.value, exc.allowed,
                              exc.problem) from None
    if cfg.task == "prune":
        schedules.validate(cfg)
    noise = noise_mod.build(cfg.noise)
    if cfg.model.get("train") is not None and not (cfg.model.get("checkpoint") and cfg.task == "prune"):
        train_config(OmegaConf.to_container(cfg.model.train, resolve=True), "model.train")
    finetune.final_recipe(cfg)
    finetune.bn_examples(cfg)
    dense.dense_bn_examples(cfg)
    return noise
