"""One-shot pruning: one step from the dense weights straight to the target sparsity s,

  w_1 = prune(w_dense; s),   anchored at w_bar = w_dense,

with no fine-tuning in between (the one-shot tables of CBS, Yu et al., ICML 2022, and CHITA,
Benbaki et al., ICML 2023; the optional `finetune` stage runs afterwards for every schedule).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pruning.schedules.step import timed_step

if TYPE_CHECKING:
    from pruning.context import RunContext


def validate(cfg: Any) -> None:
    """No keys besides `name`."""


def run(job: RunContext, target: float) -> None:
    timed_step(job, target, 1, 1, job.state.w_dense)
