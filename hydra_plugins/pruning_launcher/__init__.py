"""Hydra launcher plugins of this project (`cluster=slurm`, `cluster=submitit_local`).

Hydra instantiates launchers only from the `hydra_plugins` namespace package; this one is found
next to launch.py. The logic lives in the installed package (`pruning.launcher`); instances
pickle as the stock hydra-submitit-launcher classes, so workers never import this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

from pruning import launcher as _impl


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
