"""Analog in-memory-computing weight noise (`noise=analog`): the statistical phase-change-memory
(PCM) model of Nandakumar et al., "Phase-change memory models for deep learning training and
inference", ICECS 2019 (fitted on about one million IBM PCM devices), as implemented by IBM
aihwkit's `PCMLikeNoiseModel` (`inference/noise/pcm.py`) with its `SinglePairConductanceConverter`
and `GlobalDriftCompensation` (Joshi et al., "Accurate deep neural network inference using
computational phase-change memory", Nature Communications 2020). See ecosystem.md section 5.1.
Written in-house (aihwkit is not a dependency); every constant is in `PCMParams` /
`conf/noise/analog.yaml: pcm` with the published value as its default.

Per prunable tensor W (conductances in microsiemens, g^ = g / g_max, clipped to >= 1e-7 inside logs):

  mapping       s = (g_max - g_min) / max|W|,  g+ = clip(s W, 0, g_max) + g_min,
                g- = clip(-s W, 0, g_max) + g_min; both devices get independent noise;
                W~ = (g~+ - g~-) / s
  programming   sigma_prog = (g_max / 25) (c0 + c1 g^_T + c2 g^_T^2),  (c0, c1, c2) = (0.26348, 1.9650, -1.1731)
                fitted at 25 uS (`prog_coeff_g_max`, the reference g_max of user coefficients)
                g_prog = max(0, g_T + prog_noise_scale sigma_prog xi)
  drift         nu = |N(mu_nu, sigma_nu)| drift_scale, sampled once at programming, with
                mu_nu = clip(-0.0155 ln g^_T + 0.0244, 0.049, 0.1),
                sigma_nu = clip(-0.0125 ln g^_T - 0.0059, 0.008, 0.045);
                t = t_inference + t0 (t0 = 20 s), g_drift = g_prog (t / t0)^(-nu)
  read noise    Q_s = min(0.0088 / max(g^_prog^0.65, 1e-3), 0.2),
                sigma_read = |g_drift| Q_s sqrt(ln((t + t_read) / (2 t_read))), t_read = 250 ns,
                g(t) = max(0, g_drift + read_noise_scale sigma_read xi')
  compensation  global drift compensation, weight-only form: alpha = mean|W~_prog| / mean|W~(t)|
                per tensor, W_eff = alpha W~(t) (`drift_compensation: global`), or none

`t_inference = 0` is a read at t0 = 20 s after programming: programming and read noise, no drift
(as aihwkit's formulas give). `respect_mask: true` (default) means pruned cells are not programmed:
the mask is re-applied after the noise, so pruned weights stay exactly zero (a weight at exactly
zero counts as pruned, e.g. gRDA's emergent sparsity); `false` programs them at g+ = g- = g_min
like aihwkit does, so most of them become non-zero. The mapping scale is
computed from the weights being perturbed (the pruned, possibly fine-tuned ones).

Hook points (`apply_to`): `calibration` perturbs the weights used to compute G (one programming,
read at `t_calibration`, restored afterwards); `eval` reports accuracy over `n_draws`
programmings, each read at every t in `t_inference` (flat keys `analog/acc_mean@t=<t>`,
`analog/acc_std@t=<t>` (sample std over draws, 0 for one draw), `analog/loss_mean@t=<t>`,
`analog/loss_std@t=<t>`, `analog/weight_rel_err@t=<t>` = mean over draws of
||W_eff - W|| / ||W|| over all prunable tensors). `level` is prog_noise_scale.

Paired draws: per tensor, programming draws 2 x numel normals (xi for g+, g-) then 2 x numel for
nu, every read 2 x numel; always for every weight, masked or not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from pruning.errors import choice, flag, integer, number, numbers, require
from pruning.layout import ParamLayout, get_flat, set_flat
from pruning.noise import (
    NoiseModel,
    apply_to,
    draw_normal,
    metric_number,
    parse_config,
)
from pruning.train import evaluate as evaluate_model

COMPENSATIONS = ("global", "none")


@dataclass(frozen=True)
class PCMParams:
    """Device constants of the PCM model (Nandakumar et al. 2019; aihwkit PCMLikeNoiseModel defaults)."""

    g_max: float = 25.0          # uS, max conductance of one device (weight max|W| maps to g_max)
    g_min: float = 0.0           # uS, conductance of a device at weight 0
    # sigma_prog = (g_max / prog_coeff_g_max) * sum_k c_k (g_T/g_max)^k, uS
    prog_coeff: tuple[float, ...] = (0.26348, 1.9650, -1.1731)
    # uS, the g_max the prog_coeff were fitted at (aihwkit's prog_coeff_g_max_reference: 25 for the
    # published fit); set it with your own coefficients, so they are not rescaled
    prog_coeff_g_max: float = 25.0
    t0: float = 20.0             # s, first read after programming; drift (t/t0)^-nu with t = t_inference + t0
    # s, read duration: sigma_read = |g_drift| Q_s sqrt(ln((t + t_read) / (2 t_read)))
    t_read: float = 2.5e-7
    nu_mean: tuple[float, float] = (-0.0155, 0.0244)      # mu_nu = clip(slope * ln(g_T/g_max) + intercept, nu_mean_clip)
    nu_mean_clip: tuple[float, float] = (0.049, 0.1)
    nu_std: tuple[float, float] = (-0.0125, -0.0059)      # sigma_nu = clip(slope * ln(g_T/g_max) + intercept, nu_std_clip)
    nu_std_clip: tuple[float, float] = (0.008, 0.045)
    # Q_s = min(read_q / max((g_prog/g_max)^read_q_exponent, read_q_floor), read_q_max)
    read_q: float = 0.0088
    read_q_exponent: float = 0.65
    read_q_floor: float = 1e-3
    read_q_max: float = 0.2
    g_clip: float = 1e-7         # g/g_max clipped to >= this inside logs (and max|W| in the mapping)

    def validate(self, prefix: str = "noise.pcm") -> PCMParams:
        def pair(v: Any, key: str) -> tuple[float, float]:
            vals = numbers(v, f"{prefix}.{key}")
            require(len(vals) == 2, f"{prefix}.{key}", v, "a list of two numbers")
            return (vals[0], vals[1])

        out = PCMParams(
            g_max=number(self.g_max, f"{prefix}.g_max", lo=0.0, lo_open=True),
            g_min=number(self.g_min, f"{prefix}.g_min", lo=0.0),
            prog_coeff=numbers(self.prog_coeff, f"{prefix}.prog_coeff"),
            prog_coeff_g_max=number(self.prog_coeff_g_max, f"{prefix}.prog_coeff_g_max", lo=0.0, lo_open=True),
            t0=number(self.t0, f"{prefix}.t0", lo=0.0, lo_open=True),
            t_read=number(self.t_read, f"{prefix}.t_read", lo=0.0, lo_open=True),
            nu_mean=pair(self.nu_mean, "nu_mean"),
            nu_mean_clip=pair(self.nu_mean_clip, "nu_mean_clip"),
            nu_std=pair(self.nu_std, "nu_std"),
            nu_std_clip=pair(self.nu_std_clip, "nu_std_clip"),
            read_q=number(self.read_q, f"{prefix}.read_q", lo=0.0),
            read_q_exponent=number(self.read_q_exponent, f"{prefix}.read_q_exponent"),
            read_q_floor=number(self.read_q_floor, f"{prefix}.read_q_floor", lo=0.0, lo_open=True),
            read_q_max=number(self.read_q_max, f"{prefix}.read_q_max", lo=0.0),
            g_clip=number(self.g_clip, f"{prefix}.g_clip", lo=0.0, lo_open=True),
        )
        require(out.g_min < out.g_max, f"{prefix}.g_min", out.g_min, f"a number below g_max={out.g_max}")
        return out


PCM = PCMParams()


# ---------------------------------------------------------------------------- pure maths
def programming_noise_std(g_target: torch.Tensor, pcm: PCMParams = PCM) -> torch.Tensor:
    """sigma_prog(g_T) = (g_max / prog_coeff_g_max) sum_k c_k (g_T / g_max)^k, in uS (the published
    coefficients were fitted at g_max = 25 uS and scale with the device's g_max)."""
    gh = g_target / pcm.g_max
    sig = torch.zeros_like(g_target)
    for k, c in enumerate(pcm.prog_coeff):
        sig = sig + c * gh ** k
    return sig * (pcm.g_max / pcm.prog_coeff_g_max)


def drift_nu_moments(g_target: torch.Tensor, pcm: PCMParams = PCM) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu_nu, sigma_nu) of the drift exponent at target conductance g_T."""
    log_g = torch.log((g_target / pcm.g_max).abs().clamp(min=pcm.g_clip))
    mu = (pcm.nu_mean[0] * log_g + pcm.nu_mean[1]).clamp(*pcm.nu_mean_clip)
    sigma = (pcm.nu_std[0] * log_g + pcm.nu_std[1]).clamp(*pcm.nu_std_clip)
    return mu, sigma


def drift_factor(t_inference: float, nu: torch.Tensor | float, t0: float = PCM.t0) -> torch.Tensor:
    """g_drift / g_prog = ((t_inference + t0) / t0)^(-nu); 1 at t_inference <= 0."""
    nu = torch.as_tensor(nu, dtype=torch.float64 if not isinstance(nu, torch.Tensor) else nu.dtype)
    if t_inference <= 0:
        return torch.ones_like(nu)
    return torch.pow(torch.as_tensor((t_inference + t0) / t0, dtype=nu.dtype, device=nu.device), -nu)


def read_noise_q(g_prog: torch.Tensor, pcm: PCMParams = PCM) -> torch.Tensor:
    """Q_s(g_prog) = min(read_q / max((|g_prog| / g_max)^e, floor), read_q_max)."""
    base = ((g_prog.abs() / pcm.g_max) ** pcm.read_q_exponent).clamp(min=pcm.read_q_floor)
    return (pcm.read_q / base).clamp(max=pcm.read_q_max)


def read_noise_std(g_prog: torch.Tensor, g_drift: torch.Tensor, t_inference: float,
                   pcm: PCMParams = PCM) -> torch.Tensor:
    """sigma_read = |g_drift| Q_s(g_prog) sqrt(ln((t + t_read) / (2 t_read))), t = t_inference + t0."""
    t = t_inference + pcm.t0
    return g_drift.abs() * read_noise_q(g_prog, pcm) * math.sqrt(math.log((t + pcm.t_read) / (2 * pcm.t_read)))


def weights_to_conductances(w: torch.Tensor, pcm: PCMParams = PCM
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g+, g-, s) of one tensor: s = (g_max - g_min) / max|W| (max|W| clipped to >= g_clip)."""
    span = pcm.g_max - pcm.g_min
    scale = span / w.abs().max().clamp(min=pcm.g_clip)
    g_plus = (scale * w).clamp(0.0, span) + pcm.g_min
    g_minus = (-scale * w).clamp(0.0, span) + pcm.g_min
    return g_plus, g_minus, scale


def conductances_to_weights(g_plus: torch.Tensor, g_minus: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (g_plus - g_minus) / scale


def program_devices(g_target: torch.Tensor, gen: torch.Generator, pcm: PCMParams = PCM,
                    prog_noise_scale: float = 1.0, drift_scale: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Program devices to g_T: (g_prog, nu). Draws numel normals for g_prog, then numel for nu."""
    xi = draw_normal(g_target.shape, gen, g_target)
    g_prog = (g_target + prog_noise_scale * programming_noise_std(g_target, pcm) * xi).clamp(min=0.0)
    mu, sigma = drift_nu_moments(g_target, pcm)
    nu = (mu + sigma * draw_normal(g_target.shape, gen, g_target)).abs() * drift_scale
    return g_prog, nu


def read_devices(g_prog: torch.Tensor, nu: torch.Tensor, t_inference: float, gen: torch.Generator,
                 pcm: PCMParams = PCM, read_noise_scale: float = 1.0) -> torch.Tensor:
    """Conductance read t_inference seconds after programming (drift, then read noise); numel normals."""
    g_drift = g_prog * drift_factor(t_inference, nu, pcm.t0)
    xi = draw_normal(g_prog.shape, gen, g_prog)
    return (g_drift + read_noise_scale * read_noise_std(g_prog, g_drift, t_inference, pcm) * xi).clamp(min=0.0)


@dataclass
class _Programmed:
    g_prog: tuple[torch.Tensor, torch.Tensor]   # (g+, g-) after programming
    nu: tuple[torch.Tensor, torch.Tensor]
    scale: torch.Tensor
    mask: torch.Tensor | None                   # re-applied after noise (respect_mask)
    mean_abs_prog: torch.Tensor                 # compensation baseline: mean|W~_prog|


class PCMArray:
    """A set of weight tensors programmed once onto PCM device pairs; `read(t)` gives noisy weights.

    `masks` (bool, same shapes) are re-applied after the noise when given (respect_mask).
    """

    def __init__(self, weights: Sequence[torch.Tensor], gen: torch.Generator, pcm: PCMParams = PCM,
                 masks: Sequence[torch.Tensor] | None = None, prog_noise_scale: float = 1.0,
                 drift_scale: float = 1.0, read_noise_scale: float = 1.0, compensation: str = "global"):
        self.pcm, self.read_noise_scale, self.compensation = pcm, read_noise_scale, compensation
        self.tensors: list[_Programmed] = []
        for i, w in enumerate(weights):
            m = masks[i] if masks is not None else None
            w = w.detach() * m if m is not None else w.detach()
            g_plus, g_minus, scale = weights_to_conductances(w, pcm)
            gp, nup = program_devices(g_plus, gen, pcm, prog_noise_scale, drift_scale)
            gm, num = program_devices(g_minus, gen, pcm, prog_noise_scale, drift_scale)
            w_prog = conductances_to_weights(gp, gm, scale)
            if m is not None:
                w_prog = w_prog * m
            self.tensors.append(_Programmed((gp, gm), (nup, num), scale, m, w_prog.abs().mean()))

    def programmed(self) -> list[torch.Tensor]:
        """The weights right after programming (no drift, no read noise)."""
        out = []
        for p in self.tensors:
            w = conductances_to_weights(p.g_prog[0], p.g_prog[1], p.scale)
            out.append(w * p.mask if p.mask is not None else w)
        return out

    def read(self, t_inference: float, gen: torch.Generator) -> list[torch.Tensor]:
        out = []
        for p in self.tensors:
            gp = read_devices(p.g_prog[0], p.nu[0], t_inference, gen, self.pcm, self.read_noise_scale)
            gm = read_devices(p.g_prog[1], p.nu[1], t_inference, gen, self.pcm, self.read_noise_scale)
            w = conductances_to_weights(gp, gm, p.scale)
            if p.mask is not None:
                w = w * p.mask
            if self.compensation == "global":
                mean_abs = w.abs().mean()
                if float(mean_abs) > 0:
                    w = w * (p.mean_abs_prog / mean_abs)
            out.append(w)
        return out


# ---------------------------------------------------------------------------- noise model
@dataclass(frozen=True)
class Config:
    apply_to: Any = ("calibration", "eval")     # calibration: weights used to compute G; eval: accuracy under noise
    # true: pruned cells not programmed (stay exactly 0); false: programmed at g_min (aihwkit)
    respect_mask: bool = True
    n_draws: int = 10                           # independent programmings per evaluation (mean and std over them)
    # s after programming: 0 (read at t0), 1 h, 1 day, 1 year
    t_inference: Any = (0.0, 3600.0, 86400.0, 31536000.0)
    t_calibration: float = 0.0                  # s, read time of the weights used to compute G
    drift_compensation: str = "global"          # global (alpha = mean|W_prog| / mean|W(t)| per tensor) | none
    prog_noise_scale: float = 1.0               # multiplies sigma_prog (the level)
    read_noise_scale: float = 1.0               # multiplies sigma_read
    drift_scale: float = 1.0                    # multiplies nu
    pcm: PCMParams = field(default_factory=PCMParams)  # device constants

    def validate(self) -> Config:
        return dataclasses.replace(
            self,
            respect_mask=flag(self.respect_mask, "noise.respect_mask"),
            apply_to=apply_to(self.apply_to, "noise.apply_to"),
            n_draws=integer(self.n_draws, "noise.n_draws", lo=1),
            t_inference=numbers(self.t_inference, "noise.t_inference", lo=0.0),
            t_calibration=number(self.t_calibration, "noise.t_calibration", lo=0.0),
            drift_compensation=choice(self.drift_compensation, "noise.drift_compensation", COMPENSATIONS),
            prog_noise_scale=number(self.prog_noise_scale, "noise.prog_noise_scale", lo=0.0),
            read_noise_scale=number(self.read_noise_scale, "noise.read_noise_scale", lo=0.0),
            drift_scale=number(self.drift_scale, "noise.drift_scale", lo=0.0),
            pcm=self.pcm.validate(),
        )


class AnalogNoise(NoiseModel):
    """PCM weight noise at `calibration_weights` and/or `evaluate`."""

    kind = "analog"
    ACTS_ON = frozenset({"weights", "evaluation"})

    def __init__(self, cfg: Config):
        self.cfg = cfg.validate()

    @property
    def level(self) -> float:
        return float(self.cfg.prog_noise_scale)

    def program(self, weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor] | None,
                gen: torch.Generator) -> PCMArray:
        c = self.cfg
        return PCMArray(weights, gen, c.pcm, masks if c.respect_mask else None, c.prog_noise_scale,
                        c.drift_scale, c.read_noise_scale, c.drift_compensation)

    @staticmethod
    def _split(layout: ParamLayout, w: torch.Tensor, mask: torch.Tensor
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-tensor weights and masks; a weight at exactly zero counts as pruned (e.g. gRDA's
        emergent sparsity, where the mask is all ones)."""
        if mask.numel() != layout.numel:
            raise ValueError(f"mask has {mask.numel()} entries, the layout {layout.numel}")
        keep = mask.to(device=w.device, dtype=torch.bool) & (w != 0)
        return layout.unflatten(w), layout.unflatten(keep)

    @contextlib.contextmanager
    def calibration_weights(self, model: nn.Module, layout: ParamLayout, mask: torch.Tensor,
                            gen: torch.Generator) -> Iterator[None]:
        if "calibration" not in self.cfg.apply_to:
            yield
            return
        w = get_flat(model, layout)
        array = self.program(*self._split(layout, w, mask), gen)
        set_flat(model, layout, layout.flatten(array.read(self.cfg.t_calibration, gen)))
        try:
            yield
        finally:
            set_flat(model, layout, w)

    def evaluate(self, model: nn.Module, data: Any, layout: ParamLayout, mask: torch.Tensor,
                 device: torch.device, gen: torch.Generator, batch_size: int = 512,
                 num_workers: int = 0) -> dict[str, Any]:
        c = self.cfg
        if "eval" not in c.apply_to:
            return {}
        w = get_flat(model, layout)
        weights, masks = self._split(layout, w, mask)
        norm = float(w.norm()) or 1.0
        rows: dict[float, list[tuple[float, float, float]]] = {t: [] for t in c.t_inference}
        try:
            for _ in range(c.n_draws):
                array = self.program(weights, masks, gen)
                for t in c.t_inference:
                    noisy = layout.flatten(array.read(t, gen))
                    set_flat(model, layout, noisy)
                    ev = evaluate_model(model, data.test, device, batch_size, num_workers=num_workers)
                    rows[t].append((ev["acc"], ev["loss"], float((noisy - w).norm()) / norm))
        finally:
            set_flat(model, layout, w)
        out: dict[str, Any] = {}
        for t, vals in rows.items():
            acc, loss, err = (torch.tensor(v, dtype=torch.float64) for v in zip(*vals))
            key = metric_number(t)
            out[f"analog/acc_mean@t={key}"] = float(acc.mean())
            out[f"analog/acc_std@t={key}"] = float(acc.std()) if len(acc) > 1 else 0.0
            out[f"analog/loss_mean@t={key}"] = float(loss.mean())
            out[f"analog/loss_std@t={key}"] = float(loss.std()) if len(loss) > 1 else 0.0
            out[f"analog/weight_rel_err@t={key}"] = float(err.mean())
        return out

    def record(self) -> dict[str, Any]:
        c = self.cfg
        return {"kind": self.kind, "model": "pcm (Nandakumar et al. 2019; aihwkit PCMLikeNoiseModel)",
                "apply_to": list(c.apply_to), "respect_mask": c.respect_mask, "n_draws": c.n_draws,
                "t_inference": list(c.t_inference), "t_calibration": c.t_calibration,
                "drift_compensation": c.drift_compensation, "prog_noise_scale": c.prog_noise_scale,
                "read_noise_scale": c.read_noise_scale, "drift_scale": c.drift_scale,
                "pcm": dataclasses.asdict(c.pcm)}


def build(cfg: DictConfig | dict[str, Any]) -> AnalogNoise:
    return AnalogNoise(parse_config(Config, cfg))
