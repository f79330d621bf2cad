"""Entry point: `python3 launch.py [group=option ...] [key=value ...]` (add -m for a sweep).

All logic lives in the importable package (`pruning.task.main`), so Slurm workers unpickle the
task by reference. Exit status: 0 done; 2 a configuration error (one line on stderr); in a
multirun, 2 when a job of this launcher failed on a configuration error, 1 when one failed
otherwise (see `pruning.callbacks`).
"""

import hydra
from omegaconf import DictConfig

import pruning.hydra_conf  # noqa: F401 (registers the method and noise defaults with Hydra's ConfigStore)
from pruning.callbacks import multirun_exit_code
from pruning.config import precheck_cli
from pruning.task import main as run_task


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return run_task(cfg)


if __name__ == "__main__":
    precheck_cli()
    main()
    raise SystemExit(multirun_exit_code())
