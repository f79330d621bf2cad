"""Magnitude pruning (Han et al., NeurIPS 2015; the "MP" baseline of the OBS literature).

Score s_q = |w_q|; keep the k = floor((1 - s) p) largest, with one global threshold over all
prunable tensors (`scope: global`, the "MP" column of the CBS/CHITA tables) or the same sparsity
in every tensor (`scope: layerwise`). No weight update.
"""

from __future__ import annotations

from dataclasses import dataclass

from pruning.errors import choice
from pruning.layout import select_mask
from pruning.methods.base import PruneResult, PruningProblem

SCOPES = ("global", "layerwise")


@dataclass(frozen=True)
class Config:
    scope: str = "global"   # global (one threshold over all prunable tensors) | layerwise

    def validate(self) -> None:
        choice(self.scope, "method.scope", SCOPES)


def prune(problem: PruningProblem, sparsity: float, cfg: Config) -> PruneResult:
    mask = select_mask(problem.w.abs(), problem.layout, sparsity, cfg.scope)
    return PruneResult(w=problem.w * mask, mask=mask)
