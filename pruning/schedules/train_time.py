"""The train-time path: a method that sparsifies while it trains (registry kind "train") runs its own
training through `methods.<name>.run(ctx, cfg)`, once, with its own schedule:

  grda    gRDA (Chao, Wang, Xing, Cheng, NeurIPS 2020): the soft threshold grows as
          g(n, gamma) = c gamma^(1/2) (n gamma)^mu over the n training steps
  sdprun  sDprun (Li et al., arXiv 2107.05328, 2021): the same threshold on channel groups
  gfs     Greedy Forward Selection (Ye et al., ICML 2020): layer by layer, channels added
          greedily up to the budget, with per-layer and final fine-tuning

The run's `sparsity` is the method's budget (gfs `budget: params`) or recorded but not imposed
(grda, sdprun); the method may return a physically smaller model (structured methods), which
replaces the state's model, layout and mask. Valid only with `schedule=oneshot`
(`pruning.schedules.validate`). Its loops save boundaries `method/<phase>/<epoch>`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from pruning import methods
from pruning.checkpoint import LoopCheckpoint
from pruning.methods.base import TrainContext
from pruning.schedules.step import record_stage
from pruning.seeds import generator

if TYPE_CHECKING:
    from pruning.context import RunContext


def validate(cfg: Any) -> None:
    """The method's keys are its Config's (validated with the method)."""


def run(job: RunContext, target: float) -> None:
    st = job.state
    ctx = TrainContext(model=st.model, layout=st.layout, data=st.data, device=st.device, sparsity=target,
                       generator=generator(int(job.cfg.seed), "method/1"), noise=st.noise, progress=job.progress,
                       log=job.log, evaluate=job.evaluate,
                       checkpoint=LoopCheckpoint(job.ckpt, st, prefix="method/", say=job.say))
    t0 = time.perf_counter()
    res = methods.get(job.cfg.method.name).run(ctx, job.method_config())
    st.model = ctx.model  # a structured method may return a physically smaller model
    if res.mask is not None and res.mask.numel() == ctx.layout.numel:
        st.mask = res.mask.to(st.device)
    elif ctx.layout is not st.layout:  # a smaller model: the old mask no longer fits
        st.mask = torch.ones(ctx.layout.numel, dtype=torch.bool, device=st.device)
    st.layout = ctx.layout
    record_stage(job, 1, target, res, time.perf_counter() - t0)
    structured = {k: v for k, v in res.info.items() if k.startswith("structured/")}
    if structured:
        job.record.update_metrics(**structured)
