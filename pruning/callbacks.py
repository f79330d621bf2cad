"""Hydra callbacks, registered in conf/config.yaml under `hydra.callbacks`.

`ReportCallback.on_multirun_end` runs on the launching machine once every job of a multirun has
returned (basic launcher and submitit/Slurm alike): it prints the completed/failed/missing cells
with the relaunch command and writes `<sweep_dir>/report/` (see `pruning.report`). It never
raises: a report problem is printed as a warning, and `pruning-report <sweep_dir>` redoes it.

Disable it for one sweep with `hydra.callbacks.report.enabled=false`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class ReportCallback(Callback):
    """Write the sweep report when a multirun ends (imports pandas/matplotlib only then)."""

    def __init__(self, enabled: bool = True, metric: str = "final_acc", reference: str = "magnitude",
                 plots: bool = True) -> None:
        self.enabled = bool(enabled)
        self.metric = str(metric)
        self.reference = str(reference)
        self.plots = bool(plots)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
            from pruning.report import report_sweep

            report = report_sweep(sweep_dir, metric=self.metric, reference=self.reference, plots=self.plots)
            if report.status is not None:
                print(report.status.summary(), flush=True)
            print(f"report: {report.out_dir / 'table.md'}", flush=True)
        except Exception as exc:  # the report must never fail the sweep
            print(f"warning: the sweep report could not be written ({type(exc).__name__}: {exc}); "
                  f"rerun it with `pruning-report <sweep_dir>`", file=sys.stderr, flush=True)
