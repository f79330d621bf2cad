"""Greedy Forward Selection, GFS (Ye, Gong, Nie, Zhou, Klivans, Liu, "Good Subnetworks Provably
Exist: Pruning via Greedy Forward Selection", ICML 2020; algorithms.md section 9).

Mean-field view of a layer with D channels h_1..h_D: the next layer sees sum_i D alpha_i h_i with
alpha in the simplex; dense alpha = 1/D, a subnetwork S has alpha_i = 1/|S| on S, so every kept
channel is scaled by D/|S| (kept in the network and folded into the next layer at the end).
Greedy forward selection, one layer at a time from input to output:

  S_0 = {},  S_{n+1} = S_n U { argmin_{i in C_n} L(f_{S_n U {i}}; batch_n) }

with C_n a random pool of `num_evaluate` (50) channels not yet selected and batch_n a fresh
mini-batch (128) of the calibration data. Stopping rule (`budget`):
  accuracy  when the batch top-1 reaches (1 - skip_eval_converge) init_top1, the top-1 on a fixed
            eval-train subset is measured; stop once it is >= (1 - top1_tol) init_top1, where init
            is the layer's starting network (the reference `mobile2_prune.py`). If every channel
            gets added the layer is restored to dense.
  width     exactly ceil(width D) channels per layer
  flops     a uniform width ratio chosen by bisection so that the MACs of the pruned network are
            at most flops_ratio of the dense MACs (pruning/flops.py)
  params    the same for the prunable parameters, at the run's `sparsity` (keep 1 - sparsity)
Optional SGD fine-tuning after every layer (reference: 0.1 epoch, lr 2.5e-3, wd 4e-5, no
momentum) and at the end.

Layers are the removable channel groups of pruning/structured.py (MLP hidden units; inner
channels of ResNet basic/bottleneck blocks; MobileNet expanded / pointwise channels through the
depthwise conv; VGG convs), optionally filtered with `layers` (globs over producer module names).
The alpha-mask is a forward pre-hook on the consumer's input. Scoring: the activations entering
the consumer are computed once per step (`SuffixRunner.capture`) and the part of the network
downstream of them runs once for all candidates, stacked along the batch axis; the prefix is
never re-run per candidate. Scoring runs in eval mode (BN running statistics).

Noise: the scoring batches go through the noise model's input hook and the scoring forward runs
under its weight hook; fine-tuning steps run under all hooks (pruning.optim.noisy_backward).

Output: a physically smaller model (`shrink: true`; the D/|S| scale folded into the consumer's
weights, exactly the masked function) or the same shapes with removed channels zeroed and masked,
and `structured/...` metrics: channels kept per layer, MACs and parameters kept and their ratios.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from pruning import flops, structured
from pruning.errors import ConfigError, RunCheckError, choice, integer, number
from pruning.layout import get_flat
from pruning.methods.base import PruneResult, TrainContext
from pruning.optim import generators_state, load_generators_state, stream_generators, train_loop
from pruning.structured import example_input, find_groups
from pruning.train import evaluate

BUDGETS = ("accuracy", "width", "flops", "params")


@dataclass(frozen=True)
class Config:
    """Defaults: the reference mobile2_prune.py."""

    budget: str = "accuracy"           # accuracy (top1_tol) | width | flops (flops_ratio) | params (run's sparsity)
    top1_tol: float = 0.02             # accuracy: stop at top-1 >= (1 - tol) x the layer's initial top-1 (eval subset)
    skip_eval_converge: float = 0.05   # accuracy: evaluate the subset only once the batch top-1 is within this
    width: float = 0.5                 # width: fraction of channels kept per layer
    flops_ratio: float = 0.5           # flops: MACs kept / dense MACs (uniform width ratio found by bisection)
    batch_size: int = 128              # fresh scoring mini-batch per greedy step
    num_evaluate: int = 50             # random candidates scored per step (one batched forward of the suffix)
    eval_size: int = 1024              # eval-train subset for the accuracy rule (every k-th calibration example)
    candidate_chunk: int = 0           # candidates per batched forward (0 = all; lower it to save memory)
    layers: Any = None                 # globs over group names (producer modules), e.g. ["net.layer*.conv1"]; null = all
    layer_finetune_epochs: float = 0.1  # SGD after each layer (fraction of an epoch; 0 = none)
    final_finetune_epochs: float = 0.0  # SGD at the end (the finetune group can also do this)
    lr: float = 2.5e-3
    momentum: float = 0.0
    weight_decay: float = 4e-5
    finetune_batch_size: int = 128
    shrink: bool = True                # true: physically smaller model; false: same shapes, removed channels masked
    noise_hooks: bool = True           # scoring under the input/weight hooks; fine-tuning under all hooks

    def validate(self) -> None:
        choice(self.budget, "method.budget", BUDGETS)
        for key in ("top1_tol", "skip_eval_converge"):
            number(getattr(self, key), f"method.{key}", lo=0.0, hi=1.0, hi_open=True,
                   allowed="a number in [0, 1)", fractions=False)
        for key in ("width", "flops_ratio"):
            number(getattr(self, key), f"method.{key}", lo=0.0, lo_open=True, hi=1.0,
                   allowed="a number in (0, 1]", fractions=False)
        for key in ("batch_size", "num_evaluate", "eval_size", "finetune_batch_size"):
            integer(getattr(self, key), f"method.{key}", lo=1, allowed="a positive integer")
        integer(self.candidate_chunk, "method.candidate_chunk", lo=0, allowed="an integer >= 0 (0 = all)")
        for key in ("layer_finetune_epochs", "final_finetune_epochs", "momentum", "weight_decay"):
            number(getattr(self, key), f"method.{key}", lo=0.0, allowed="a number >= 0", fractions=False)
        number(self.lr, "method.lr", lo=0.0, lo_open=True, allowed="a number > 0", fractions=False)


# ------------------------------------------------------------------------------ scoring
class LayerScorer:
    """Loss and top-1 of the network with one group's channels scaled by alpha vectors, many at
    once, from the cached activations entering the group's consumer."""

    def __init__(self, gm: fx.GraphModule, group: structured.ChannelGroup,
                 loss_fn: Callable[..., torch.Tensor] = F.cross_entropy, chunk: int = 0):
        modules = dict(gm.named_modules())
        self.group = group
        self.runner = structured.SuffixRunner(gm, group, isinstance(modules[group.consumer], nn.Linear))
        self.loss_fn = loss_fn
        self.chunk = chunk

    def capture(self, x: torch.Tensor) -> dict[Any, Any]:
        return self.runner.capture(x)

    @torch.no_grad()
    def score(self, values: dict[Any, Any], y: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss and top-1 on (values, y) for each row of `scales` (K, D)."""
        k = scales.shape[0]
        step = self.chunk if self.chunk > 0 else k
        losses, top1 = [], []
        b = int(y.shape[0])
        for s in range(0, k, step):
            sc = scales[s:s + step]
            out = self.runner.run_suffix(values, sc)
            yk = y.repeat(sc.shape[0], *([1] * (y.dim() - 1)))
            losses.append(self.loss_fn(out, yk, reduction="none").reshape(sc.shape[0], b, -1).mean((1, 2)))
            if y.dtype in (torch.int64, torch.int32) and out.dim() == 2:
                top1.append((out.argmax(1) == yk).float().view(sc.shape[0], b).mean(1))
            else:  # not a classification target
                top1.append(torch.zeros(sc.shape[0], device=out.device))
        return torch.cat(losses), torch.cat(top1)


def alpha_scale(selected: Sequence[int], size: int, extra: int | None = None) -> torch.Tensor:
    """D alpha for S = selected (+ extra): D/|S| on S, 0 elsewhere."""
    s = torch.zeros(size)
    idx = list(selected) + ([extra] if extra is not None else [])
    s[idx] = size / len(idx)
    return s


def candidate_scales(selected: Sequence[int], candidates: Sequence[int], size: int) -> torch.Tensor:
    """(K, D): row k is alpha_scale(selected + [candidates[k]])."""
    n = len(selected) + 1
    base = torch.zeros(size)
    base[list(selected)] = 1.0
    rows = base.repeat(len(candidates), 1)
    rows[torch.arange(len(candidates)), torch.as_tensor(list(candidates), dtype=torch.long)] = 1.0
    return rows * (size / n)


def greedy_select(scorer: LayerScorer, next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                  gen: torch.Generator, *, num_evaluate: int, k_target: int | None = None,
                  eval_top1: Callable[[list[int]], float] | None = None, init_top1: float | None = None,
                  top1_tol: float = 0.02, skip_eval_converge: float = 0.05,
                  context: Callable[[], Any] = contextlib.nullcontext,
                  progress: bool = False) -> tuple[list[int], list[float]]:
    """Greedy forward selection of one group's channels. Returns the selected channels in order
    of selection and the batch loss after each addition.

    Stops at `k_target` channels when given; otherwise by the accuracy rule (needs `eval_top1`
    and `init_top1`); always when every channel is selected.
    """
    size = scorer.group.size
    if k_target is None and (eval_top1 is None or init_top1 is None):
        raise ValueError("greedy_select needs k_target or (eval_top1, init_top1)")
    selected: list[int] = []
    losses: list[float] = []
    chosen = torch.zeros(size, dtype=torch.bool)
    bar = tqdm(total=k_target or size, desc=f"gfs {scorer.group.name}", leave=False, disable=not progress)
    while True:
        x, y = next_batch()
        pool = torch.nonzero(~chosen).flatten()
        cands = pool[torch.randperm(pool.numel(), generator=gen)[:num_evaluate]].tolist()
        with context():
            values = scorer.capture(x)
            loss, top1 = scorer.score(values, y, candidate_scales(selected, cands, size))
        best = int(torch.argmin(loss))
        selected.append(cands[best])
        chosen[cands[best]] = True
        losses.append(float(loss[best]))
        bar.update(1)
        n = len(selected)
        if n >= size:
            break
        if k_target is not None:
            if n >= k_target:
                break
        elif float(top1[best]) >= (1.0 - skip_eval_converge) * init_top1:
            if eval_top1(selected) >= (1.0 - top1_tol) * init_top1:
                break
    bar.close()
    return selected, losses


def eval_cached(scorer: LayerScorer, cached: Sequence[tuple[dict[Any, Any], torch.Tensor]],
                scale: torch.Tensor) -> tuple[float, float]:
    """Mean loss and top-1 over cached batches with the group's channels scaled by `scale`."""
    loss_sum, top_sum, n = 0.0, 0.0, 0
    for values, y in cached:
        lo, top = scorer.score(values, y, scale.view(1, -1))
        loss_sum += float(lo[0]) * y.numel()
        top_sum += float(top[0]) * y.numel()
        n += y.numel()
    return loss_sum / max(n, 1), top_sum / max(n, 1)


# --------------------------------------------------------------------------------- data
def load_batch(dataset: Dataset, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = next(iter(DataLoader(Subset(dataset, idx.tolist()), batch_size=max(int(idx.numel()), 1))))
    return x.to(device), y.to(device)


def _chunks(n: int, size: int) -> Iterator[torch.Tensor]:
    for s in range(0, n, size):
        yield torch.arange(s, min(n, s + size))


# ------------------------------------------------------------------------------ budgets
def uniform_widths(model: nn.Module, groups: Sequence[structured.ChannelGroup], chosen: Sequence[str],
                   measure: Callable[[nn.Module], float], target: float, iters: int = 30) -> tuple[dict[str, int], bool]:
    """Per-group widths ceil(r D) with the largest uniform ratio r whose pruned model has
    measure <= target (bisection; measure is monotone in r). Returns (widths, reachable)."""
    def widths(r: float) -> dict[str, int]:
        return {g.name: max(1, min(g.size, math.ceil(r * g.size - 1e-9))) for g in groups if g.name in chosen}

    def value(r: float) -> float:
        keep = {k: torch.arange(v) for k, v in widths(r).items()}
        return measure(structured.shrink(model, groups, keep))

    if value(0.0) > target:
        return widths(0.0), False
    lo, hi = 0.0, 1.0
    if value(hi) <= target:
        return widths(hi), True
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if value(mid) <= target:
            lo = mid
        else:
            hi = mid
    return widths(lo), True


# ---------------------------------------------------------------------------------- run
class _SelectionState:
    """What a requeued GFS run needs to continue after its last finished layer: the weights (the
    per-layer fine-tuning changes them), the channel scales chosen so far, the random streams and
    the running count of selected channels. Saved after every layer through `ctx.checkpoint`."""

    def __init__(self, model: nn.Module, masker: structured.ChannelMasker, gens: dict[str, torch.Generator]):
        self.model, self.masker, self.gens, self.selected = model, masker, gens, 0

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "scales": dict(self.masker.scales),
                "gens": generators_state(self.gens), "selected": self.selected}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.model.load_state_dict(sd["model"])
        device = next(self.model.parameters()).device
        for name, scale in sd["scales"].items():
            self.masker.set(name, None if scale is None else scale.to(device))
        load_generators_state(self.gens, sd["gens"])
        self.selected = int(sd["selected"])


def _layer_targets(ctx: TrainContext, cfg: Config, groups: list[Any], chosen_names: list[str],
                   example: torch.Tensor) -> tuple[dict[str, int] | None, bool]:
    """Channels to keep per chosen group under the budget (None: the accuracy budget, decided by
    the greedy selection itself), and whether the flops/params budget is reachable."""
    model = ctx.model
    if cfg.budget == "width":
        return {g.name: max(1, math.ceil(cfg.width * g.size - 1e-9)) for g in groups if g.name in chosen_names}, True
    if cfg.budget == "flops":
        dense_macs = flops.count(model, example).macs
        return uniform_widths(model, groups, chosen_names, lambda m: flops.count(m, example).macs / dense_macs,
                              cfg.flops_ratio)
    if cfg.budget == "params":
        return uniform_widths(model, groups, chosen_names,
                              lambda m: structured.relayout(m, ctx.layout).numel / ctx.layout.numel,
                              1.0 - float(ctx.sparsity))
    return None, True


def _finish(ctx: TrainContext, cfg: Config, groups: list[Any], masker: Any, example: torch.Tensor,
            info: dict[str, Any]) -> PruneResult:
    """The selected channels as the result: a physically smaller model (`shrink`) or zeroed
    channels and their weight mask, with the structured report in `info`."""
    model = ctx.model
    keep = {g.name: structured.keep_from_scale(masker.scales[g.name], g.size) for g in groups}
    scales = {g.name: masker.scales[g.name] for g in groups}
    kept = {k: int(v.numel()) for k, v in keep.items()}
    if cfg.shrink:
        small = structured.shrink(model, groups, keep, scales)
        layout = structured.relayout(small, ctx.layout)
        report = structured.structured_report(model, small, example, groups, kept, ctx.layout, layout)
        ctx.model, ctx.layout = small, layout
        w = get_flat(small, layout)
        mask = torch.ones_like(w, dtype=torch.bool)
    else:
        structured.zero_out(model, groups, keep, scales)
        small = structured.shrink(model, groups, keep)
        report = structured.structured_report(model, small, example, groups, kept, ctx.layout,
                                              structured.relayout(small, ctx.layout))
        w = get_flat(model, ctx.layout)
        mask = structured.channel_mask(ctx.layout, groups, keep, w.device)
    info.update(report)
    return PruneResult(w=w * mask, mask=mask, info=info)


def run(ctx: TrainContext, cfg: Config) -> PruneResult:
    """GFS layer by layer (the selection of Ye et al., Algorithm 1, per channel group), then the
    result (`_finish`). Each finished layer is a checkpoint boundary (resume after a requeue)."""
    model = ctx.model
    gens = stream_generators(ctx.generator)
    example = example_input(ctx)
    changed = structured.disable_inplace(model)
    gm = structured.traced(model)
    groups = find_groups(model, example, gm=gm)
    patterns = ["*"] if cfg.layers is None else [cfg.layers] if isinstance(cfg.layers, str) else list(cfg.layers)
    chosen = [g for g in groups if any(fnmatch.fnmatchcase(g.name, p) for p in patterns)]
    if not chosen:
        raise ConfigError("method.layers", patterns, ", ".join(g.name for g in groups), "matches no channel group")
    targets, reachable = _layer_targets(ctx, cfg, groups, [g.name for g in chosen], example)
    calib = ctx.data.calib
    eval_idx = torch.arange(0, len(calib), max(1, math.ceil(len(calib) / cfg.eval_size)))
    masker = structured.ChannelMasker(model, groups)
    info: dict[str, Any] = {"budget": cfg.budget}
    if targets is not None and cfg.budget in ("flops", "params"):
        info["budget_reachable"] = reachable
    state = _SelectionState(model, masker, gens)
    ckpt = getattr(ctx, "checkpoint", None)
    done = ckpt.resume("gfs", None, state) if ckpt is not None else 0  # layers finished before a requeue
    try:
        for li, g in enumerate(tqdm(chosen, desc="gfs layers", leave=False, disable=not ctx.progress)):
            if li < done:
                continue
            row = _select_layer(ctx, cfg, gm, g, masker, gens, eval_idx, None if targets is None else targets[g.name])
            state.selected += row["kept"]
            if ctx.log is not None:
                ctx.log(row)
            if ckpt is not None:
                ckpt.save("gfs", li + 1, None, state)
        if cfg.final_finetune_epochs > 0:
            _finetune(ctx, cfg, cfg.final_finetune_epochs, gens, "gfs_final_finetune", log=True)
    finally:
        masker.remove()
        structured.restore_inplace(changed)
    model.eval()
    info["selected_channels"] = state.selected
    return _finish(ctx, cfg, groups, masker, example, info)


def _select_layer(ctx: TrainContext, cfg: Config, gm: Any, g: Any, masker: Any, gens: dict[str, torch.Generator],
                  eval_idx: torch.Tensor, k_target: int | None) -> dict[str, Any]:
    """Greedy forward selection of the channels of group `g` (scored on the cached activations of
    the evaluation subset, mini-batches drawn from the method stream, under the noise hooks when
    `noise_hooks`), its scale set on the masker, optional layer fine-tuning; returns the log row."""
    model, calib = ctx.model, ctx.data.calib
    noisy = cfg.noise_hooks and ctx.noise is not None and getattr(ctx.noise, "kind", "none") != "none"
    full_mask = torch.ones(ctx.layout.numel, dtype=torch.bool, device=ctx.device)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randperm(len(calib), generator=gens["method"])[: cfg.batch_size]
        x, y = load_batch(calib, idx, ctx.device)
        if noisy:
            with torch.enable_grad():
                x = ctx.noise.calibration_inputs(model, x, y, gens["inputs"])
            model.zero_grad(set_to_none=True)
        return x.detach(), y

    def weight_context() -> Any:
        if noisy:
            return ctx.noise.calibration_weights(model, ctx.layout, full_mask, gens["weights"])
        return contextlib.nullcontext()

    model.eval()
    scorer = LayerScorer(gm, g, chunk=cfg.candidate_chunk)
    with masker.disabled(g.name), torch.no_grad():
        cached = []
        for ch in _chunks(eval_idx.numel(), cfg.batch_size):
            x, y = load_batch(calib, eval_idx[ch], ctx.device)
            cached.append((scorer.capture(x), y))
        init_loss, init_top1 = eval_cached(scorer, cached, torch.ones(g.size))
        if k_target is None and init_top1 <= 0:
            # the accuracy rule compares with init_top1: at 0 it holds at once and every layer keeps one channel
            raise RunCheckError(f"gfs: the unpruned network classifies none of the {eval_idx.numel()} eval-train "
                                f"examples (top-1 0 at layer {g.name}), so method.budget=accuracy cannot stop "
                                f"meaningfully; train the dense model first or use budget width, flops or params")
        selected, _losses = greedy_select(
            scorer, next_batch, gens["method"], num_evaluate=cfg.num_evaluate, k_target=k_target,
            eval_top1=lambda sel: eval_cached(scorer, cached, alpha_scale(sel, g.size))[1],
            init_top1=init_top1, top1_tol=cfg.top1_tol, skip_eval_converge=cfg.skip_eval_converge,
            context=weight_context, progress=ctx.progress)
        scale = None if len(selected) >= g.size else alpha_scale(selected, g.size).to(ctx.device)
        loss, top1 = eval_cached(scorer, cached, scale if scale is not None else torch.ones(g.size))
    masker.set(g.name, scale)
    row = {"phase": "gfs", "layer": g.name, "kept": len(selected), "width": g.size,
           "init_loss": init_loss, "init_top1": init_top1, "loss": loss, "top1": top1}
    if scale is not None and cfg.layer_finetune_epochs > 0:
        _finetune(ctx, cfg, cfg.layer_finetune_epochs, gens, f"gfs_layer_finetune {g.name}")
        model.eval()
        ft = evaluate(model, Subset(calib, eval_idx.tolist()), ctx.device, cfg.batch_size)
        row.update(finetuned_loss=ft["loss"], finetuned_top1=ft["acc"])
    return row


def _finetune(ctx: TrainContext, cfg: Config, epochs: float, gens: dict[str, torch.Generator], phase: str,
              log: bool = False) -> None:
    """SGD on the masked network (the alpha-masks stay in the forward pass)."""
    opt = torch.optim.SGD(ctx.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    train_loop(ctx, opt, epochs=epochs, batch_size=cfg.finetune_batch_size, phase=phase, gens=gens,
               noise_hooks=cfg.noise_hooks, log_every_epoch=log)
