"""The evaluation stages: the dense model's metrics (dense_eval), the pruned model's right after
the prune stage (with the sparsity check), the final metrics with the noise model's evaluation
(eval), and the closing console summary."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pruning import methods
from pruning.errors import RunCheckError
from pruning.layout import sparsity_stats
from pruning.seeds import generator

if TYPE_CHECKING:
    from pruning.context import RunContext


def dense_eval(job: RunContext) -> None:
    dense = job.evaluate()
    job.record.update_metrics(dense_acc=dense["acc"], dense_loss=dense["loss"])
    job.log({"phase": "dense", **dense})


def pruned_eval(job: RunContext, target: float) -> None:
    """Test metrics and sparsity right after pruning; a run that misses its target stops here."""
    st = job.state
    stats = sparsity_stats(st.model, st.layout)
    pruned = job.evaluate()
    job.record.update_metrics(pruned_acc=pruned["acc"], pruned_loss=pruned["loss"], **stats)
    job.log({"phase": "pruned", **pruned, **stats})
    # only the final stage's rule can excuse the final sparsity (an earlier stage's cannot)
    rule = job.record.stages[-1].get("sparsity_rule") if job.record.stages else None
    miss = check_sparsity(job.cfg.method.name, target, stats, len(st.layout.names), rule)
    if miss:  # a number, so the report (local or from W&B) can mark the cell
        job.record.update_metrics(sparsity_below_target=target - float(stats["sparsity_prunable"]))
        job.record.warn(miss)


def check_sparsity(method: str, target: float, stats: dict[str, Any], num_tensors: int,
                   rule: str | None = None) -> str | None:
    """A weight-space method keeps k = floor((1 - s) p) weights (per tensor for layer-wise
    rules), so the achieved sparsity is at least the target minus one weight per prunable
    tensor; exact zeros of the dense model can only raise it. Less is a broken run (e.g. NaN
    weights that never compare as small) and raises RunCheckError, unless the method declared
    a `rule` that keeps more on purpose (its stage info `sparsity_rule`, e.g. cbs's
    `rmp_rounding: reference`): then the miss is returned as a warning for the record.
    Train-time methods (grda, sdprun: sparsity emerges from the regulariser and is recorded;
    gfs: channels by its budget) are exempt."""
    if methods.kind(method) == "train":
        return None
    achieved, numel = float(stats["sparsity_prunable"]), int(stats["numel_prunable"])
    tol = num_tensors / max(numel, 1) + 1e-9
    if achieved >= target - tol:
        return None
    miss = (f"achieved sparsity {achieved:.6f} misses the target sparsity={target}; "
            f"{stats['nnz_prunable']}/{numel} prunable weights are non-zero")
    if rule:
        return f"{miss}, as {method}'s {rule} keeps them: the cell is not at its nominal sparsity"
    raise RunCheckError(f"{miss} (tolerance {tol:.2g}: one weight per prunable tensor)")


def final_eval(job: RunContext) -> None:
    """Final test metrics and sparsity, plus the noise model's evaluation (e.g. analog draws)."""
    cfg, st = job.cfg, job.state
    final = job.evaluate()
    stats = sparsity_stats(st.model, st.layout)
    extra = st.noise.evaluate(st.model, st.data, st.layout, st.mask, st.device, generator(int(cfg.seed), "noise/eval"),
                              int(cfg.eval.batch_size), num_workers=job.num_workers)
    job.record.update_metrics(final_acc=final["acc"], final_loss=final["loss"], **stats, **extra)
    job.log({"phase": "final", **final, **stats})


def summary(job: RunContext) -> str:
    """The closing console lines: run directory, device, cell, sparsity, accuracy, loss, timings,
    model file and record."""
    data = job.record.data
    m, ix = data["metrics"], data["index"]

    def f(v: Any) -> str:
        return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    lines = [
        "",
        f"run      {job.run_dir}",
        f"device   {data['env'].get('device', '-')}",
        # task=train trains the dense model only: method, schedule and noise play no part
        f"cell     model={ix['model']} dataset={ix['dataset']} task=train seed={ix['seed']}" if job.cfg.task == "train"
        else f"cell     model={ix['model']} dataset={ix['dataset']} method={ix['method']} "
             f"schedule={ix['schedule']} noise={ix['noise']}({f(ix['noise_level'])}) seed={ix['seed']}",
    ]
    if job.cfg.task == "train":
        lines.append(f"dense    acc {f(m.get('dense_acc'))}  loss {f(m.get('dense_loss'))}")
    else:
        lines += [
            f"sparsity target {f(float(ix['sparsity']))}  achieved {f(m.get('sparsity_prunable'))} "
            f"(prunable, {m.get('nnz_prunable')}/{m.get('numel_prunable')} non-zero)  "
            f"{f(m.get('sparsity_total'))} (all parameters)",
            f"accuracy dense {f(m.get('dense_acc'))}  pruned {f(m.get('pruned_acc'))}  "
            f"fine-tuned {f(m.get('finetuned_acc'))}",
            f"loss     dense {f(m.get('dense_loss'))}  pruned {f(m.get('pruned_loss'))}  "
            f"fine-tuned {f(m.get('finetuned_loss'))}",
        ]
    lines.append("time     " + "  ".join(f"{k} {v:.1f}s" for k, v in data["timings"].items()))
    if data.get("model_file"):
        lines.append(f"model    {job.run_dir / data['model_file']['path']} (pruning.load_pruned(run_dir))")
    lines.append(f"record   {job.record.path}")
    return "\n".join(lines)
