"""Hydra callbacks, registered in conf/config.yaml under `hydra.callbacks`.

`ReportCallback.on_multirun_start` saves this launcher's multirun config (its grid) as
`<sweep_dir>/.grids/<start time>-<host>-<pid>.yaml`: Hydra's `multirun.yaml` keeps only the last
launcher's, so with several launchers into one sweep the others' failed cells would never be
listed for relaunch. `pruning.sweep.sweep_status` reads the union.

`ReportCallback.on_multirun_end` runs on the launching machine once every job of a multirun has
returned (basic launcher and submitit/Slurm alike): it prints the completed/failed/missing cells
with the relaunch command and writes `<sweep_dir>/report/` (see `pruning.report`). It never
raises: a report problem is printed as a warning, and `pruning-report <sweep_dir>` redoes it.
It also sets the launcher's exit status (`multirun_exit_code`, used by launch.py): 2 when a cell
of this launcher's grid failed on a configuration error, 1 when one failed otherwise or never
ran, 0 when all completed (or are being run by another launcher).

Disable the report for one sweep with `hydra.callbacks.report.enabled=false` (the grid file and
the exit status are kept).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

_EXIT = {"code": 0}


def multirun_exit_code() -> int:
    """Exit status of the last multirun in this process (0 when none ran)."""
    return _EXIT["code"]


def exit_code_for(cells: list[Any], records: dict[Path, dict[str, Any] | None]) -> int:
    """2 if a cell failed on a configuration error, 1 if one failed otherwise or did not run, else 0."""
    code = 0
    for cell in cells:
        if cell.status in ("completed", "running"):  # running: another launcher holds its lock
            continue
        rec = records.get(cell.run_dir) or {}
        code = max(code, 2 if cell.status == "failed" and rec.get("error_type") == "config" else 1)
    return code


class ReportCallback(Callback):
    """Write the sweep report when a multirun ends (imports pandas/matplotlib only then)."""

    def __init__(self, enabled: bool = True, metric: str = "final_acc", reference: str = "magnitude",
                 plots: bool = True) -> None:
        self.enabled = bool(enabled)
        self.metric = str(metric)
        self.reference = str(reference)
        self.plots = bool(plots)
        self.grid_file: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _EXIT["code"] = 0
        try:
            from pruning.sweep import GRID_DIR, grid_file_name

            sweep_dir = Path(str(config.hydra.sweep.dir))
            path = sweep_dir / GRID_DIR / grid_file_name(time.time(), socket.gethostname(), os.getpid())
            path.parent.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(config, path)
            self.grid_file = path
        except Exception as exc:  # never fail the sweep over bookkeeping
            print(f"warning: the sweep grid could not be saved ({type(exc).__name__}: {exc}); "
                  f"the report sees only multirun.yaml", file=sys.stderr, flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            from pruning.record import read_json
            from pruning.sweep import cells_of_grid, sweep_status

            status = sweep_status(sweep_dir)
            grid_cfg = OmegaConf.load(self.grid_file) if self.grid_file is not None else config
            cells = cells_of_grid(status, grid_cfg)
            _EXIT["code"] = exit_code_for(cells, {c.run_dir: read_json(c.run_dir / "result.json") for c in cells})
        except Exception as exc:
            if sweep_dir.is_dir():  # no directory: no job ran (the report says so below)
                print(f"warning: the sweep status could not be read ({type(exc).__name__}: {exc})",
                      file=sys.stderr, flush=True)
        if not self.enabled:
            return
        try:
            from pruning.report import report_sweep

            report = report_sweep(sweep_dir, metric=self.metric, reference=self.reference, plots=self.plots)
            if report.status is not None:
                print(report.status.summary(), flush=True)
            print(f"report: {report.out_dir / 'table.md'}", flush=True)
        except Exception as exc:  # the report must never fail the sweep
            print(f"warning: the sweep report could not be written ({type(exc).__name__}: {exc}); "
                  f"rerun it with `pruning-report <sweep_dir>`", file=sys.stderr, flush=True)
