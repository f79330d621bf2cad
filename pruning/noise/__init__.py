"""Noise models: one axis of a study, selected as `noise=<kind>` (config group `noise`).

Keys: `pruning.registry.NOISE` (none, gradient, analog, adversarial; one module and one
`conf/noise/<kind>.yaml` each; a module's `Config` dataclass holds its defaults).

A noise model acts at up to four hook points of a run (after `bind(data)`, called once the run's
data is loaded) and declares which in `ACTS_ON` (a subset of the keys of `HOOKS`); the callers
apply exactly the declared hooks (`pruning.calibrate` while G is computed, the task at the final
evaluation) and never probe which methods a class overrides. Each hook gets its own generator,
derived from the run seed and a stream name (`pruning.seeds.generator`):
  inputs         calibration_inputs(model, x, y, gen) -> x   inputs used to compute G,    "noise/<stage>/inputs/<block>"
                                                             one block of rows at a time
  weights        calibration_weights(model, layout, mask, gen)  context manager: weights  "noise/<stage>/weights"
                                                             used to compute G, restored after
  gradient_rows  gradients(G, gen) -> G                      rows of G (n x p, dense)     "noise/<stage>/gradients"
  evaluation     evaluate(model, data, layout, mask, device, gen, batch_size, num_workers)  final metrics  "noise/eval"
Training steps of the train-time methods and fine-tuning with noise hooks
(`pruning.optim.noisy_backward`) apply the inputs, weights and gradient_rows hooks to each
mini-batch (its gradient passed as one row of G); that is no separate hook.
Paired draws: every random number comes from the generator passed in (never the global RNG),
and how many numbers a hook draws depends only on shapes, never on the weights or the mask, so
methods compared in one sweep see the same noise for one seed.

`level` is the model's main level for the run index (`index.noise_level`): none 0, gradient
kappa, analog prog_noise_scale, adversarial eps. `record()` returns the parameters for the run
record (`result.json: noise`).

Final metric keys added by `evaluate` (flat, in `result.json: metrics`); numbers in keys are
formatted by `metric_number` (`%g`: 3600 -> "3600", one year 31536000 -> "3.1536e+07",
8/255 -> "0.0313725"):
  gradient     gradient/nsr_measured, gradient/snr_db_measured (noise power / signal power of
               all G rows drawn in the run), gradient/rows_noised
  analog       analog/acc_mean@t=<t>, analog/acc_std@t=<t>, analog/loss_mean@t=<t>,
               analog/loss_std@t=<t>, analog/weight_rel_err@t=<t> for each t in t_inference
  adversarial  robust_acc@eps=<eps>, robust_loss@eps=<eps> for each eps in eval_eps
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from pruning.errors import ConfigError
from pruning.registry import NOISE

T = TypeVar("T")


# what a noise model may act on -> the hook that does it
HOOKS = {
    "inputs": "calibration_inputs",
    "weights": "calibration_weights",
    "gradient_rows": "gradients",
    "evaluation": "evaluate",
}


class NoiseModel:
    """The identity at every hook point (`noise=none`); subclasses override what they perturb and
    list it in `ACTS_ON` (a test checks that the two agree for every registered model)."""

    kind = "none"
    ACTS_ON: frozenset[str] = frozenset()  # keys of HOOKS whose hook this model implements
    # whether its `evaluate` perturbs what is measured (analog weights, adversarial inputs) rather
    # than only reporting on the run's noise (gradient: the measured SNR)
    EVALUATION_PERTURBS = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = set(cls.ACTS_ON) - set(HOOKS)
        if unknown:
            raise TypeError(f"{cls.__name__}.ACTS_ON names {sorted(unknown)}; allowed: {', '.join(HOOKS)}")

    @property
    def level(self) -> float:
        return 0.0

    def state_dict(self) -> dict[str, Any]:
        """Running measurements a resumed run must carry on from (saved with the stage checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def bind(self, data: Any) -> None:
        """Called once the run's data is loaded (`DataBundle`), before any hook; e.g. attacks take
        the valid input range `data.bounds` from it."""

    def calibration_inputs(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                           gen: torch.Generator) -> torch.Tensor:
        return x

    @contextlib.contextmanager
    def calibration_weights(self, model: nn.Module, layout: Any, mask: torch.Tensor,
                            gen: torch.Generator) -> Iterator[None]:
        yield

    def gradients(self, G: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return G

    def evaluate(self, model: nn.Module, data: Any, layout: Any, mask: torch.Tensor,
                 device: torch.device, gen: torch.Generator, batch_size: int = 512,
                 num_workers: int = 0) -> dict[str, Any]:
        return {}

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind}


def available() -> list[str]:
    return sorted(NOISE)


def build(cfg: Mapping[str, Any]) -> NoiseModel:
    """The noise model of the `noise` config node (its `kind` names the registry entry)."""
    kind = cfg.get("kind", "none")
    if kind not in NOISE:
        raise ConfigError("noise.kind", kind, ", ".join(available()))
    spec = NOISE[kind]
    if spec.config is None:  # `none`: no settings
        return spec.build.load()()
    return spec.build.load()(cfg)


# ------------------------------------------------------------------ helpers for the noise modules
def plain(cfg: Any) -> Any:
    """A plain dict/list copy of an OmegaConf node (or of a mapping)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, Mapping):
        return {k: plain(v) for k, v in cfg.items()}
    return cfg


def parse_config(cls: type[T], cfg: Mapping[str, Any] | Any, prefix: str = "noise") -> T:
    """`cls(**cfg)` for a dataclass `cls`, without `kind`; an unknown key is a ConfigError naming
    the allowed keys. Nested dataclass fields are parsed recursively under `prefix.<field>`."""
    data = dict(plain(cfg))
    data.pop("kind", None)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    bad = sorted(set(data) - set(fields))
    if bad:
        raise ConfigError(f"{prefix}.{bad[0]}", data[bad[0]], ", ".join(sorted(fields)), "is not a known key")
    for name, value in list(data.items()):
        default = fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        if default is not None and dataclasses.is_dataclass(default):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{prefix}.{name}", value, "a mapping of " + ", ".join(
                    f.name for f in dataclasses.fields(default)))
            data[name] = parse_config(default, value, f"{prefix}.{name}")
    return cls(**data)


# hook points that act while G is computed or, under training hooks, at every training step
CALIBRATION_HOOKS = frozenset({"inputs", "weights", "gradient_rows"})


def idle_reason(noise: NoiseModel, method: str, computes_g: bool, trains_with_hooks: bool) -> str | None:
    """Why `noise` can act on nothing in a run, as one line for the record (None when it acts):
    its calibration-time hooks need a run that computes G or trains under the noise hooks, its
    evaluation hook needs `eval` in `apply_to`. Such a run is the noise-free one, labelled noisy."""
    if noise.kind == "none":
        return None
    where = set(getattr(getattr(noise, "cfg", None), "apply_to", ("calibration", "eval")))
    during = sorted(noise.ACTS_ON & CALIBRATION_HOOKS)
    if during and "calibration" in where and (computes_g or trains_with_hooks):
        return None
    if "evaluation" in noise.ACTS_ON and noise.EVALUATION_PERTURBS and "eval" in where:
        return None
    acts = f"it acts on {', '.join(during)} while G is computed or under training noise hooks" if during else \
        "it acts at evaluation only"
    return (f"noise={noise.kind} has nothing to act on in this run ({acts}; method {method} computes no G and "
            f"nothing trains with noise_hooks): the results are the noise-free ones")


def apply_to(value: Any, key: str, allowed: Iterable[str] = ("calibration", "eval")) -> tuple[str, ...]:
    """A list of hook names (a single name or an empty list are fine)."""
    allowed = tuple(allowed)
    items = [value] if isinstance(value, str) else list(value or [])
    for v in items:
        if v not in allowed:
            raise ConfigError(key, v, ", ".join(allowed) + " (a list of them)")
    return tuple(dict.fromkeys(items))


def metric_number(x: float) -> str:
    """How a number is written inside a metric key: `%g` (3600 -> 3600, 8/255 -> 0.0313725)."""
    return f"{float(x):g}"


def draw_normal(shape: tuple[int, ...] | torch.Size, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normals from `gen` (on its device), moved to `like`'s device and dtype."""
    return torch.randn(tuple(shape), generator=gen, device=gen.device,
                       dtype=torch.float64 if like.dtype == torch.float64 else torch.float32
                       ).to(device=like.device, dtype=like.dtype)


def draw_uniform(shape: tuple[int, ...] | torch.Size, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """U[0, 1) from `gen` (on its device), moved to `like`'s device and dtype."""
    return torch.rand(tuple(shape), generator=gen, device=gen.device,
                      dtype=torch.float64 if like.dtype == torch.float64 else torch.float32
                      ).to(device=like.device, dtype=like.dtype)
