"""Hydra launcher plugins of this project (`cluster=local`, `cluster=slurm`, `cluster=submitit_local`).

Hydra instantiates launchers only from the `hydra_plugins` namespace package; this one is found
next to launch.py. The logic lives in the installed package (`pruning.launcher`); instances of the
submitit launchers pickle as the stock hydra-submitit-launcher classes, so workers never import
this module. The configs registered here (`hydra/launcher=pruning_basic|pruning_slurm|pruning_local`)
are the stock ones plus this project's keys, so conf/cluster/*.yaml can set them. They are plain
dicts, not dataclasses: submitit pickles Hydra's ConfigStore and the composed config into every
job, and a dataclass node would make each worker import its class from here.
"""

from collections.abc import Sequence
from typing import Any

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from omegaconf import DictConfig, OmegaConf

from pruning import launcher as _impl

# this project's launcher keys on top of the stock ones
_PROGRESS_KEYS = {
    "progress_interval_s": 60.0,    # job counts at most this often while waiting for an array (0: none)
    "max_array_size": None,         # jobs per array; larger batches become arrays submitted in turn
}


def _node(stock: type, target: str, **extra: Any) -> dict[str, Any]:
    return {**OmegaConf.to_container(OmegaConf.structured(stock)), "_target_": target, **extra}


_cs = ConfigStore.instance()
_cs.store(group="hydra/launcher", name="pruning_basic", provider="pruning",
          node={"_target_": "hydra_plugins.pruning_launcher.PruningBasicLauncher",
                "progress": True})  # a `job k/N  elapsed ..  ETA ..` line before each job
_cs.store(group="hydra/launcher", name="pruning_slurm", provider="pruning",
          node=_node(SlurmQueueConf, "hydra_plugins.pruning_launcher.PruningSlurmLauncher", **_PROGRESS_KEYS))
_cs.store(group="hydra/launcher", name="pruning_local", provider="pruning",
          node=_node(LocalQueueConf, "hydra_plugins.pruning_launcher.PruningLocalLauncher", **_PROGRESS_KEYS))


class PruningBasicLauncher(BasicLauncher):
    """Hydra's in-process launcher (jobs one after another), printing `job k/N` with the elapsed
    time and an ETA before each job."""

    def __init__(self, progress: bool = True) -> None:
        super().__init__()
        self.progress = progress
        self._clock: _impl.JobProgress | None = None

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if not self.progress or self.task_function is None:
            return super().launch(job_overrides, initial_job_idx)
        clock = self._clock = self._clock or _impl.JobProgress()
        clock.total = max(clock.total, initial_job_idx + len(job_overrides))
        task = self.task_function

        def task_with_progress(cfg: DictConfig) -> Any:
            # the task's cfg has no `hydra` node; run_job has set HydraConfig for this job
            print(clock.line(int(HydraConfig.get().job.num) + 1), flush=True)
            try:
                return task(cfg)
            finally:
                clock.finished += 1

        self.task_function = task_with_progress
        try:
            return super().launch(job_overrides, initial_job_idx)
        finally:
            self.task_function = task


class PruningSlurmLauncher(SlurmLauncher):
    """Slurm job arrays; a cancelled or killed job is recorded as failed and the sweep goes on."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        return _impl.launch(self, job_overrides, initial_job_idx)

    def __reduce__(self) -> tuple[Any, ...]:
        return _impl.rebuild, (SlurmLauncher, self.__dict__)


class PruningLocalLauncher(LocalLauncher):
    """submitit's local executor (subprocesses on this machine), same collection as Slurm."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        return _impl.launch(self, job_overrides, initial_job_idx)

    def __reduce__(self) -> tuple[Any, ...]:
        return _impl.rebuild, (LocalLauncher, self.__dict__)
