"""Masked training of the run's state: the finetune stage (`finetune` group), and the training of
the multistage (per-stage fine-tuning) and gradual schedules, all through `pruning.train.fit`.

The finetune stage can also re-estimate the BatchNorm statistics at the final weights
(`finetune.bn_recalibrate`: that many training examples, augmented as in training, after the
training epochs if any; `finetune=bn` does only that), see `pruning.batchnorm`.

Noise: with `noise_hooks: true` in the recipe (e.g. `+finetune.noise_hooks=true`) every step runs
under the noise model's training hooks (perturbed inputs, weights, gradients), as the train-time
methods train; off by default, which keeps the results of runs made before the option existed.
Noise-free runs are the same either way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from pruning import batchnorm
from pruning.checkpoint import LoopCheckpoint
from pruning.optim import stream_generators
from pruning.seeds import derive_seed, generator
from pruning.train import TrainConfig, fit, loop_parts, smoothed_loss, train_config

if TYPE_CHECKING:
    from pruning.context import RunContext


# the finetune group's key that is not a training setting (examples; 0 = off)
BN_KEY = "bn_recalibrate"


def recipe(cfg: Any, params: Mapping[str, Any], epochs: int, key: str) -> TrainConfig:
    """A TrainConfig from a group's keys with `epochs`; the batch size defaults to the dataset's."""
    params = {k: v for k, v in params.items() if not (key == "finetune" and k == BN_KEY)}
    data = {"batch_size": int(cfg.dataset.get("batch_size", 64)), **params, "epochs": epochs}
    return train_config(data, key)


def bn_examples(cfg: Any) -> int:
    """finetune.bn_recalibrate: training examples the BatchNorm statistics are re-estimated on (0 = off)."""
    return batchnorm.examples_setting(cfg.finetune.get(BN_KEY, 0), f"finetune.{BN_KEY}")


def final_recipe(cfg: Any) -> TrainConfig | None:
    """The finetune stage's recipe; None when finetune.epochs is 0."""
    epochs = int(cfg.finetune.epochs)
    return recipe(cfg, OmegaConf.to_container(cfg.finetune, resolve=True), epochs, "finetune") if epochs > 0 else None


def run(job: RunContext) -> None:
    """The finetune stage: masked training with the finetune group and/or the BatchNorm
    re-estimation, then the fine-tuned metrics (None when the stage does nothing)."""
    tc, bn = final_recipe(job.cfg), bn_examples(job.cfg)
    if tc is None and bn == 0:
        job.record.update_metrics(finetuned_acc=None, finetuned_loss=None)
        return
    if tc is not None:
        train_masked(job, tc, "finetune/final", "finetune")
    if bn:
        recalibrate_bn(job, bn)
    ft = job.evaluate()
    job.record.update_metrics(finetuned_acc=ft["acc"], finetuned_loss=ft["loss"])


def recalibrate_bn(job: RunContext, examples: int) -> None:
    """BatchNorm re-estimation at the final weights (examples from the run seed's `finetune/bn`
    stream, batches of finetune.batch_size, else the dataset's); records `bn_examples`."""
    cfg = job.cfg
    batch = int(cfg.finetune.get("batch_size") or cfg.dataset.get("batch_size", 64))
    used = job.recalibrate_bn(examples, f"finetune.{BN_KEY}", derive_seed(int(cfg.seed), "finetune/bn"), batch)
    job.record.update_metrics(bn_examples=used)


def train_masked(job: RunContext, tc: TrainConfig, stream: str, phase: str,
                 on_epoch_start: Callable[[int], None] | None = None) -> None:
    """Train the state's model with `tc`, pruned weights held at zero (the state's current mask,
    read every epoch), data order from the named stream `stream`; one logged row and one saved
    boundary `<phase>/<epoch>` per epoch."""
    st, seed = job.state, int(job.cfg.seed)
    loader, opt, sched = loop_parts(st.model, st.data.train, tc, derive_seed(seed, stream), job.num_workers)
    gens = stream_generators(generator(seed, f"{stream}/noise")) if tc.noise_hooks else None
    fit(st.model, loader, opt, st.device, epochs=tc.epochs, phase=phase, layout=st.layout, mask=lambda: st.mask,
        scheduler=sched, loss_fn=smoothed_loss(tc.label_smoothing), noise=st.noise if gens else None, gens=gens,
        on_epoch_start=on_epoch_start, log=job.log, evaluate=job.evaluate,
        checkpoint=LoopCheckpoint(job.ckpt, st), progress=job.progress)
