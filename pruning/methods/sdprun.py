"""Structured directional pruning, sDprun (Li, Liu, Shao, Wang, Geng, "Structured Directional
Pruning via Perturbation Orthogonal Projection", arXiv 2107.05328, 2021; algorithms.md 8.2).

No public code exists; only the abstract could be read. The abstract describes structured pruning
that projects the sparsifying perturbation orthogonally onto the flat minimum valley, reached
asymptotically by a fast solver, with no retraining. This module implements the design proposed in
algorithms.md section 8.2: gRDA (pruning/methods/grda.py, Chao et al. 2020) with its l1 penalty
replaced by a group-lasso penalty over output channels / neurons.

  a_0 = w_0,  a_n = a_{n-1} - gamma_n grad f(w_{n-1}; Z_n)                   (dual averaging)
  g(n, gamma) = c gamma^(1/2) (n gamma)^mu   (accumulated increments, as in gRDA)
  w_G = a_G max(0, 1 - g(n, gamma) sqrt(|G|) / ||a_G||_2)                    (group soft threshold)

Design choices (documented because the paper's own could not be checked):
  * Groups: one group per removable channel (pruning/structured.py): the producer's output row
    (Linear row or conv filter W[o, :, :, :]) and bias, together with every per-channel parameter
    on the way to the consumer: BN gamma/beta (tied, as 8.2 suggests optionally) and, in
    MobileNet blocks, the depthwise filter. Tying them makes a zero group an exactly zero channel
    at the consumer (every activation on the path maps 0 to 0), so it can be removed physically
    without changing the function: "without retraining" holds by construction.
  * Channels that cannot be removed (outputs feeding residual additions, the logits) are not
    grouped: they follow the plain dual-averaging step (= SGD), or gRDA's elementwise soft
    threshold with `rest: l1`.
  * Weight sqrt(|G|) (group-lasso convention, `group_weight: sqrt_size`), or 1 (`one`). A group
    is removed when the RMS of its accumulator entries falls below g(n, gamma).
  * The structured DP target s_G = <P_0 u, u_G> of 8.2 is not computed (it needs the Hessian's
    flat subspace); the asymptotic argument of gRDA carries over to the group penalty because the
    update is the proximal step of a separable convex penalty.

Default c = 0.1 (`Config.c`; lr 0.1, mu 0.55, 10 epochs, batch 64): gRDA's c = 0.005
leaves every channel on the embedded digits MLP (the threshold g(n, gamma) ~ 0.009 is far below the
groups' RMS). Measured there (one seed, channel sparsity / accuracy, dense 0.975): c = 0.005: 0 /
0.975; 0.05: 0.07 / 0.969; 0.1: 0.35 / 0.928; 0.2: 0.99 / 0.10. 0.1 is the largest of these that
removes a substantial share of channels without collapsing the model. g grows like (n gamma)^mu, so
on a longer run (MLPNet on full MNIST: ~9,400 steps) the same c thresholds harder (not measured here).

Output: with `shrink: true` a physically smaller model (dead channels removed, exact), else the
same shapes with the dead channels' producer rows, BN parameters, depthwise filters and consumer
columns zero and masked. Reported: channels kept per layer, channel sparsity, MACs and parameters
kept and their ratios (`structured/...`), the threshold and the achieved weight sparsity; the run's
`sparsity` is recorded but not imposed. Noise hooks apply to every step as in gRDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pruning import structured
from pruning.dual_averaging import DualAveragingSettings, reinit, validate_settings
from pruning.errors import choice
from pruning.layout import get_flat
from pruning.methods.base import PruneResult, TrainContext
from pruning.optim import GRDA, stream_generators, train_loop
from pruning.structured import example_input, find_groups

RESTS = ("none", "l1")
GROUP_WEIGHTS = ("sqrt_size", "one")


@dataclass(frozen=True)
class Config(DualAveragingSettings):
    # removes channels with the other defaults: on the digits MLP 35 % (68 of 192, acc 0.928 vs dense
    # 0.975); c = 0.005 (gRDA's) removed none, 0.05 removed 7 %, 0.2 all but 2 (see the docstring)
    c: float = 0.1
    rest: str = "none"               # parameters outside channel groups: none (SGD step) | l1 (gRDA threshold)
    group_weight: str = "sqrt_size"  # sqrt_size (group-lasso sqrt(|G|)) | one
    shrink: bool = True              # true: remove dead channels physically (exact); false: same shapes, masked

    def validate(self) -> None:
        validate_settings(self)
        choice(self.rest, "method.rest", RESTS)
        choice(self.group_weight, "method.group_weight", GROUP_WEIGHTS)


def run(ctx: TrainContext, cfg: Config) -> PruneResult:
    model = ctx.model
    gens = stream_generators(ctx.generator)
    if cfg.init == "scratch":
        reinit(model, gens["method"])
    example = example_input(ctx)
    groups = find_groups(model, example)
    members = [structured.group_members(model, g) for g in groups]
    opt = GRDA([{"params": list(model.parameters())}], lr=cfg.lr, c=cfg.c, mu=cfg.mu, penalty=cfg.rest,
               channel_groups=members, group_weight=cfg.group_weight)

    def extra() -> dict[str, float]:
        alive = sum(int(structured.alive_channels(model, g).sum()) for g in groups)
        return {"threshold": opt.threshold(0), "channel_sparsity": 1.0 - alive / sum(g.size for g in groups)}

    stats = train_loop(ctx, opt, epochs=cfg.epochs, batch_size=cfg.batch_size, phase="sdprun", gens=gens,
                       noise_hooks=cfg.noise_hooks, lr_milestones=list(cfg.lr_milestones or []),
                       lr_gamma=cfg.lr_gamma, extra=extra, resumable=True)
    report, keep = structured.zeros_report(model, example, groups)
    info: dict[str, Any] = {
        "threshold": opt.threshold(0),
        "steps": opt.step_count,
        "target_sparsity_not_imposed": float(ctx.sparsity),
        **{f"train/{k}": v for k, v in stats.items()},
    }
    dense_w = get_flat(model, ctx.layout)
    info["achieved_sparsity_same_shape"] = float((dense_w == 0).float().mean())
    if cfg.shrink:
        small = structured.shrink(model, groups, keep)
        layout = structured.relayout(small, ctx.layout)
        report["structured/prunable_params_dense"] = ctx.layout.numel
        report["structured/prunable_params_kept"] = layout.numel
        report["structured/prunable_params_ratio"] = layout.numel / max(ctx.layout.numel, 1)
        ctx.model, ctx.layout = small, layout
        w = get_flat(small, layout)
        mask = w != 0
    else:
        structured.zero_out(model, groups, keep)
        w = get_flat(model, ctx.layout)
        mask = structured.channel_mask(ctx.layout, groups, keep, w.device) & (w != 0)
    info.update(report)
    return PruneResult(w=w * mask, mask=mask, info=info)
