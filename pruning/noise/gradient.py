"""Gradient noise on the rows of G (`noise=gradient`): the noisy-gradient model of SWAP
(You & Cheng, "SWAP: Sparse Entropic Wasserstein Regression for Robust Network Pruning",
ICLR 2024; code `utils/utils.py::add_noise_to_grads`, see algorithms.md section 7).

For each row g_i in R^d of G (one fisher mini-batch, concatenated over the prunable tensors):

  granularity=entry (SWAP):   sigma_i = kappa * ref(g_i)
                              S_i subset of {1..d}, |S_i| = floor(p d), uniform without replacement
                              g~_i[j] = g_i[j] + sigma_i xi_ij  for j in S_i, xi ~ N(0, 1)
  granularity=sample:         floor(p N) whole rows, uniform without replacement, get
                              g~_i = g_i + sigma_i xi_i (every entry): outlier samples

with ref = torch's unbiased std of the row over its d entries (`reference: per_sample_std`, the
SWAP code), the std over all entries of G (`global_std`), or the row's root-mean-square (`rms`).
Either way the noise-to-signal power is about p kappa^2 (exactly kappa^2 floor(p d)/d with rms),
so the record carries SNR_dB = -10 log10(p kappa^2) as a derived axis.

Defaults kappa = 1, p = 0.1: the paper sets the noise std to the std of the gradients (kappa 1),
and (1, 0.1) is the setting of the SWAP ResNet20 studies 2, 5, 6 and MobileNetV1 study 3. Other
published settings: the function's own default (2, 0.1) and the ResNet20 sweep default (4, 0.25).
`level` (the index's noise_level) is kappa.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from pruning.errors import choice, number
from pruning.noise import NoiseModel, draw_normal, parse_config

GRANULARITIES = ("entry", "sample")
REFERENCES = ("per_sample_std", "global_std", "rms")


@dataclass(frozen=True)
class Config:
    """Defaults (1, 0.1): noise std = gradient std as in the paper, the setting of SWAP's ResNet20
    studies 2/5/6 and MobileNetV1 study 3. Also published: (2, 0.1) (add_noise_to_grads default),
    (4, 0.25) (ResNet20 sweep default); grids kappa in {1, 2, 4}, fraction in {0.1, 0.2, 0.25, 0.5, 1}."""

    kappa: float = 1.0                  # noise std / reference std of the row (amplitude NSR); >= 0
    fraction: float = 0.1               # p: share of entries per row (entry) or of rows (sample), in [0, 1]
    granularity: str = "entry"          # entry (SWAP) | sample (whole outlier rows)
    # per_sample_std (torch unbiased std of the row, SWAP) | global_std (of all of G) | rms (of the row)
    reference: str = "per_sample_std"

    def validate(self) -> Config:
        return Config(
            kappa=number(self.kappa, "noise.kappa", lo=0.0),
            fraction=number(self.fraction, "noise.fraction", lo=0.0, hi=1.0),
            granularity=choice(self.granularity, "noise.granularity", GRANULARITIES),
            reference=choice(self.reference, "noise.reference", REFERENCES),
        )


def snr_db(kappa: float, p: float) -> float:
    """Implied power SNR in dB, -10 log10(p kappa^2) (+inf without noise)."""
    nsr = p * kappa ** 2
    return math.inf if nsr <= 0 else -10.0 * math.log10(nsr) + 0.0  # + 0.0: 0 dB, never -0.0


def _reference(G: torch.Tensor, reference: str) -> torch.Tensor:
    """Per-row reference scale, shape (N,)."""
    if reference == "per_sample_std":
        return G.std(dim=1, unbiased=True) if G.shape[1] > 1 else torch.zeros(G.shape[0], dtype=G.dtype,
                                                                             device=G.device)
    if reference == "global_std":
        return G.std(unbiased=True).expand(G.shape[0]) if G.numel() > 1 else torch.zeros(
            G.shape[0], dtype=G.dtype, device=G.device)
    return G.pow(2).mean(dim=1).sqrt()


@torch.no_grad()
def add_gradient_noise(G: torch.Tensor, kappa: float, p: float, gen: torch.Generator,
                       granularity: str = "entry", reference: str = "per_sample_std",
                       inplace: bool = False, stats: dict[str, float] | None = None) -> torch.Tensor:
    """G with SWAP entry noise (or outlier rows); see the module docstring.

    Draws from `gen` only, in an order that depends only on G's shape (paired draws): entry:
    for each row, randperm(d) then floor(p d) normals; sample: randperm(N) then d normals for
    each of the floor(p N) rows. `inplace` modifies G itself (G can be large);
    `stats["noise_power"]` accumulates the squared norm of the added noise.
    """
    out = G if inplace else G.clone()
    N, d = out.shape
    if kappa == 0.0 or p == 0.0 or N == 0 or d == 0:
        return out
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not one of {GRANULARITIES}")
    sigma = kappa * _reference(out, reference)  # from the clean rows, before any noise is added
    power = torch.zeros((), dtype=torch.float64, device=out.device)
    if granularity == "entry":
        m = int(math.floor(p * d + 1e-9))
        for i in range(N if m > 0 else 0):
            idx = torch.randperm(d, generator=gen, device=gen.device)[:m].to(out.device)
            noise = sigma[i] * draw_normal((m,), gen, out)
            out[i, idx] += noise
            power += noise.double().pow(2).sum()
    else:
        k = int(math.floor(p * N + 1e-9))
        rows = torch.randperm(N, generator=gen, device=gen.device)[:k].tolist() if k > 0 else []
        for i in rows:  # row by row: k x d normals at once may be large
            noise = sigma[i] * draw_normal((d,), gen, out)
            out[i] += noise
            power += noise.double().pow(2).sum()
    if stats is not None:
        stats["noise_power"] = stats.get("noise_power", 0.0) + float(power)
    return out


class GradientNoise(NoiseModel):
    """SWAP gradient noise at the `gradients` hook; identity elsewhere."""

    kind = "gradient"
    ACTS_ON = frozenset({"gradient_rows", "evaluation"})
    EVALUATION_PERTURBS = False  # evaluate only reports the measured SNR of the rows it noised

    def __init__(self, cfg: Config):
        self.cfg = cfg.validate()
        self._noise_power = 0.0
        self._signal_power = 0.0
        self._rows = 0

    @property
    def level(self) -> float:
        return float(self.cfg.kappa)

    def state_dict(self) -> dict[str, Any]:
        # the measured SNR accumulates over every noised row of the run, across resumed attempts
        return {"_noise_power": self._noise_power, "_signal_power": self._signal_power, "_rows": self._rows}

    def gradients(self, G: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Noise added to G in place (the task's G is a fresh tensor nobody else holds)."""
        c = self.cfg
        with torch.no_grad():
            for s in range(0, G.shape[0], 64):  # in row chunks: G may be large
                self._signal_power += float(G[s:s + 64].double().pow(2).sum())
        stats: dict[str, float] = {}
        G = add_gradient_noise(G, c.kappa, c.fraction, gen, c.granularity, c.reference, inplace=True, stats=stats)
        self._noise_power += stats.get("noise_power", 0.0)
        self._rows += int(G.shape[0])
        return G

    def evaluate(self, model: Any, data: Any, layout: Any, mask: torch.Tensor, device: torch.device,
                 gen: torch.Generator, batch_size: int = 512,
                 num_workers: int = 0) -> dict[str, Any]:
        """Measured noise-to-signal power over every G drawn in the run (nothing if none was)."""
        if self._rows == 0:
            return {}
        nsr = self._noise_power / self._signal_power if self._signal_power > 0 else math.nan
        return {
            "gradient/nsr_measured": nsr,
            "gradient/snr_db_measured": -10.0 * math.log10(nsr) if nsr > 0 else math.inf,
            "gradient/rows_noised": self._rows,
        }

    def record(self) -> dict[str, Any]:
        c = self.cfg
        # keys as the config names them (noise.fraction), so a record reads like the command that made it
        return {"kind": self.kind, "kappa": c.kappa, "fraction": c.fraction, "snr_db": snr_db(c.kappa, c.fraction),
                "granularity": c.granularity, "reference": c.reference}


def build(cfg: DictConfig | dict[str, Any]) -> GradientNoise:
    return GradientNoise(parse_config(Config, cfg))
