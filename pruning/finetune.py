"""Masked training of the run's state: the finetune stage (`finetune` group), and the training of
the multistage (per-stage fine-tuning) and gradual schedules, all through `pruning.train.fit`.

Noise: with `noise_hooks: true` in the recipe (e.g. `+finetune.noise_hooks=true`) every step runs
under the noise model's training hooks (perturbed inputs, weights, gradients), as the train-time
methods train; off by default, which keeps the results of runs made before the option existed.
Noise-free runs are the same either way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from pruning.checkpoint import LoopCheckpoint
from pruning.optim import stream_generators
from pruning.seeds import derive_seed, generator
from pruning.train import TrainConfig, fit, loop_parts, smoothed_loss, train_config

if TYPE_CHECKING:
    from pruning.context import RunContext


def recipe(cfg: Any, params: Mapping[str, Any], epochs: int, key: str) -> TrainConfig:
    """A TrainConfig from a group's keys with `epochs`; the batch size defaults to the dataset's."""
    data = {"batch_size": int(cfg.dataset.get("batch_size", 64)), **params, "epochs": epochs}
    return train_config(data, key)


def final_recipe(cfg: Any) -> TrainConfig | None:
    """The finetune stage's recipe; None when finetune.epochs is 0."""
    epochs = int(cfg.finetune.epochs)
    return recipe(cfg, OmegaConf.to_container(cfg.finetune, resolve=True), epochs, "finetune") if epochs > 0 else None


def run(job: RunContext) -> None:
    """The finetune stage: masked training with the finetune group, then the fine-tuned metrics."""
    tc = final_recipe(job.cfg)
    if tc is None:
        job.record.update_metrics(finetuned_acc=None, finetuned_loss=None)
        return
    train_masked(job, tc, "finetune/final", "finetune")
    ft = job.evaluate()
    job.record.update_metrics(finetuned_acc=ft["acc"], finetuned_loss=ft["loss"])


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
