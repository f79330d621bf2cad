"""Entry point: `python launch.py [group=option ...] [key=value ...]` (add -m for a sweep).

All logic lives in the importable package (`pruning.task.main`), so Slurm workers unpickle the
task by reference.
"""

import hydra
from omegaconf import DictConfig

from pruning.config import precheck_cli
from pruning.task import main as run_task


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return run_task(cfg)


if __name__ == "__main__":
    precheck_cli()
    main()
