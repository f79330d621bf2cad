"""Status of a sweep directory: which cells of the launched grid completed, failed, are still
running, were interrupted (a `running` record whose run lock is gone: killed) and which never
started, with the overrides that rerun them.

The expected grid is rebuilt from the multirun configs of every launcher of the sweep:
`<sweep_dir>/.grids/*.yaml` (one per launcher, written by `pruning.callbacks` when a multirun
starts, so concurrent launchers into one sweep never overwrite each other's grid) and
`<sweep_dir>/multirun.yaml` (Hydra's copy, the last launcher's), each expanded exactly as Hydra's
basic sweeper does: `hydra.sweeper.params` followed by the command-line overrides in
`hydra.overrides.task` (a later value of a key replaces an earlier one), then the cartesian
product; the expected grid is their union. A grid job is matched to its run by its
result-relevant overrides and its seed (the same identity as the run directory and `run_id`), so
the matching does not depend on `hydra.sweep.subdir`. Runs whose records carry the same `cell_id`
(a hash of the resolved result-relevant settings, `pruning.config.cell_id`) are one cell, counted
once (`method=magnitude seed=0` and `seed=0` in two ad-hoc sweeps), the others listed in
`duplicates`.

    status = sweep_status("outputs/sweeps/study1")
    print(status.summary())            # counts, failed/missing cells, relaunch command
    status.missing                     # [Cell(overrides=[...], run_dir=..., status="missing")]

Reused by the report (`pruning.report`), the multirun-end callback and the Slurm tooling.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pruning.config import override_key, result_overrides, run_dirname
from pruning.lock import is_live, read_lock
from pruning.record import read_record

STATUSES = ("completed", "failed", "running", "interrupted", "missing")
GRID_DIR = ".grids"  # one multirun config per launcher of the sweep
# which of several runs of one cell (same cell_id) represents it
_RANK = {"completed": 0, "running": 1, "interrupted": 2, "failed": 3, "missing": 4}


@dataclass
class Cell:
    """One job of a sweep. `overrides` are the job's full overrides (what reruns it)."""

    overrides: list[str]
    run_dir: Path
    status: str
    error: str | None = None
    expected: bool = True
    cell_id: str | None = None

    def command_args(self) -> str:
        return " ".join(shlex.quote(o) for o in self.overrides)


@dataclass
class SweepStatus:
    sweep_dir: Path
    cells: list[Cell] = field(default_factory=list)
    grid_size: int | None = None          # None when the grid could not be rebuilt
    grid_error: str | None = None          # why not (no multirun.yaml, non-grid sweeper, ...)
    relaunch: str | None = None            # the sweep command(s), one a line (skip completed cells)
    duplicates: list[Cell] = field(default_factory=list)  # other runs of a cell (same cell_id)

    def _with(self, status: str) -> list[Cell]:
        return [c for c in self.cells if c.status == status]

    @property
    def completed(self) -> list[Cell]:
        return self._with("completed")

    @property
    def failed(self) -> list[Cell]:
        return self._with("failed")

    @property
    def running(self) -> list[Cell]:
        return self._with("running")

    @property
    def interrupted(self) -> list[Cell]:
        return self._with("interrupted")

    @property
    def missing(self) -> list[Cell]:
        return self._with("missing")

    @property
    def to_rerun(self) -> list[Cell]:
        """Failed, missing, interrupted and still-'running' cells."""
        return [c for c in self.cells if c.status in ("failed", "missing", "running", "interrupted")]

    def counts(self) -> dict[str, int]:
        return {s: len(self._with(s)) for s in STATUSES}

    def summary(self, max_cells: int = 20) -> str:
        """Human-readable status: counts, failed and missing cells, how to relaunch."""
        c = self.counts()
        expected = f" of {self.grid_size} expected" if self.grid_size is not None else ""
        lines = [f"sweep {self.sweep_dir}: {c['completed']} completed, {c['failed']} failed, "
                 f"{c['running']} running, {c['interrupted']} interrupted, {c['missing']} missing{expected}"]
        if self.grid_error:
            lines.append(f"  (missing cells unknown: {self.grid_error})")
        if self.duplicates:
            lines.append(f"  ({len(self.duplicates)} other run(s) of the same cells counted once, e.g. "
                         f"{self.duplicates[0].run_dir})")
        for status in ("failed", "running", "interrupted", "missing"):
            cells = self._with(status)
            for cell in cells[:max_cells]:
                err = f"  # {cell.error.splitlines()[0][:120]}" if cell.error else ""
                lines.append(f"  {status:8s} {cell.command_args()}{err}")
            if len(cells) > max_cells:
                lines.append(f"  ... and {len(cells) - max_cells} more {status} (see report/missing.txt)")
        if self.to_rerun and self.relaunch:
            lines.append("relaunch (completed cells are skipped, failed ones resumed):")
            lines += [f"  {cmd}" for cmd in self.relaunch.splitlines()]
        return "\n".join(lines)

    def missing_text(self) -> str:
        """Contents of report/missing.txt: one line of overrides per cell to rerun."""
        lines = ["# cells to rerun (failed, running, interrupted, missing), one line of overrides each"]
        for cmd in (self.relaunch or "").splitlines():
            lines.append(f"# relaunch the whole sweep (completed cells are skipped): {cmd}")
        if self.grid_error:
            lines.append(f"# missing cells unknown: {self.grid_error}")
        for cell in self.to_rerun:
            lines.append(f"{cell.command_args()}  # {cell.status}")
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- grid

def cell_key(overrides: Sequence[str], default_seed: Any) -> tuple[tuple[str, ...], Any]:
    """(sorted result-relevant overrides, seed): the identity shared with the run directory."""
    seed = default_seed
    for ov in overrides:
        if override_key(ov) == "seed":
            seed = ov.split("=", 1)[1]
    try:
        seed = int(seed) if seed is not None else None
    except (TypeError, ValueError):
        pass
    return tuple(result_overrides(overrides)), seed


def _config_loader(cfg: DictConfig) -> Any:
    """A Hydra config loader over the sweep's primary config dir (needed to expand glob(...))."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path

    for src in OmegaConf.select(cfg, "hydra.runtime.config_sources", default=None) or []:
        if src.get("provider") == "main" and src.get("schema") == "file":
            return ConfigLoaderImpl(config_search_path=create_config_search_path(str(src.path)))
    return None


def expected_grid(cfg: DictConfig) -> list[list[str]]:
    """The jobs of a multirun config (`multirun.yaml`), as the basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    target = str(OmegaConf.select(cfg, "hydra.sweeper._target_", default="") or "")
    if target and not target.endswith("BasicSweeper"):
        raise ValueError(f"sweeper {target} does not define a grid")
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
    args = [f"{k}={v}" for k, v in params.items()]
    args += [str(o) for o in OmegaConf.select(cfg, "hydra.overrides.task", default=None) or []]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception:
        parsed = OverridesParser.create(config_loader=_config_loader(cfg)).parse_overrides(args)
    batches = BasicSweeper.split_arguments(parsed, None)
    return [list(job) for job in batches[0]]


def relaunch_command(cfg: DictConfig) -> str | None:
    """The command that launched the sweep (from multirun.yaml), runnable from any directory."""
    try:
        cwd = OmegaConf.select(cfg, "hydra.runtime.cwd", default=None)
        config_name = OmegaConf.select(cfg, "hydra.job.config_name", default="config") or "config"
        main_dir = cli_dir = None  # cli_dir: `-cd <dir>` (e.g. sweeps/), listed as provider command-line
        for src in OmegaConf.select(cfg, "hydra.runtime.config_sources", default=None) or []:
            if src.get("provider") == "main" and src.get("schema") == "file":
                main_dir = Path(str(src.path))
            elif src.get("provider") == "command-line" and src.get("schema") == "file":
                cli_dir = Path(str(src.path))
        args = ["python3"]
        launch = main_dir.parent / "launch.py" if main_dir is not None else None
        args.append(str(launch) if launch is not None and launch.is_file() else "launch.py")
        args.append("-m")
        if cli_dir is not None:
            args += ["-cd", str(cli_dir), "-cn", str(config_name)]
        elif main_dir is not None and (main_dir.name != "conf" or config_name != "config"):
            args += ["-cd", str(main_dir), "-cn", str(config_name)]
        hydra_ovs = [str(o) for o in OmegaConf.select(cfg, "hydra.overrides.hydra", default=None) or []
                     if str(o) != "hydra.mode=MULTIRUN"]
        args += [str(o) for o in OmegaConf.select(cfg, "hydra.overrides.task", default=None) or []]
        args += hydra_ovs
        cmd = " ".join(shlex.quote(a) for a in args)
        return f"cd {shlex.quote(str(cwd))} && {cmd}" if cwd else cmd
    except Exception:
        return None


# ------------------------------------------------------------------------- status

def _read_overrides(run_dir: Path) -> list[str] | None:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    try:
        return [str(o) for o in OmegaConf.load(path)]
    except Exception:
        return None


def _existing_runs(sweep_dir: Path) -> list[tuple[Path, dict[str, Any] | None, list[str] | None]]:
    """(run_dir, result.json or None, .hydra/overrides.yaml or None) of every run under the sweep."""
    dirs: set[Path] = set()
    for pattern in ("**/result.json", "**/.hydra/overrides.yaml"):
        for p in sweep_dir.glob(pattern):
            run_dir = p.parent if p.name == "result.json" else p.parent.parent
            if "report" not in run_dir.relative_to(sweep_dir).parts[:1]:
                dirs.add(run_dir)
    # an unreadable result.json reads as a `failed` stand-in that names it (`read_record`)
    return [(d, read_record(d / "result.json"), _read_overrides(d)) for d in sorted(dirs)]


def grid_files(sweep_dir: str | Path) -> list[Path]:
    """The multirun configs of a sweep's launchers: one per launcher, then Hydra's multirun.yaml."""
    sweep_dir = Path(sweep_dir)
    files = sorted((sweep_dir / GRID_DIR).glob("*.yaml"))
    if (sweep_dir / "multirun.yaml").is_file():
        files.append(sweep_dir / "multirun.yaml")
    return files


def grid_file_name(when: float, host: str, pid: int) -> str:
    """Name of one launcher's grid file: sortable by start time, unique per process."""
    import time

    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(when)) + f"-{host}-{pid}.yaml"


def _run_key(record: dict[str, Any] | None, overrides: list[str] | None, default_seed: Any) -> Any:
    if overrides is not None:
        return cell_key(overrides, default_seed)
    if record is not None:
        seed = (record.get("index") or {}).get("seed", default_seed)
        return tuple(result_overrides(record.get("overrides") or [])), seed
    return None


@dataclass
class _Grids:
    """What the launchers' grid files of a sweep say: the expected cells, per launcher the relaunch
    command and its cells, the seed of cells that set none, and why a grid could not be read."""

    jobs: list[list[str]] | None = None
    launchers: list[tuple[str | None, set[Any]]] = field(default_factory=list)
    default_seed: Any = 0
    error: str | None = None


def _read_grids(sweep_dir: Path) -> _Grids:
    out, default_seed, errors = _Grids(), None, []
    for path in grid_files(sweep_dir):
        try:
            cfg = OmegaConf.load(path)
            seed = OmegaConf.select(cfg, "seed", default=0, throw_on_resolution_failure=False)
            default_seed = seed if default_seed is None else default_seed
            jobs = expected_grid(cfg)
        except Exception as exc:
            errors.append(f"cannot rebuild the grid from {path}: {type(exc).__name__}: {exc}")
            continue
        out.jobs = out.jobs or []
        known = {cell_key(job, default_seed) for job in out.jobs}
        out.jobs += [job for job in jobs if cell_key(job, default_seed) not in known]
        out.launchers.append((relaunch_command(cfg), {cell_key(job, default_seed) for job in jobs}))
    out.default_seed = 0 if default_seed is None else default_seed
    if errors:
        out.error = "; ".join(errors)
    elif out.jobs is None:
        out.error = f"no multirun.yaml in {sweep_dir}"
    return out


def _cell_of_run(run: tuple[Path, dict[str, Any] | None, list[str] | None], job: list[str] | None,
                 expected: bool, default_seed: Any) -> Cell:
    """The cell of an existing run directory (its status: the record's, or interrupted when no live
    process holds its lock)."""
    run_dir, record, overrides = run
    ovs = job or overrides or [*(record or {}).get("overrides", []),
                               f"seed={(record or {}).get('index', {}).get('seed', default_seed)}"]
    if record is None:
        return Cell(list(ovs), run_dir, "missing", None, expected)
    st = record.get("status", "running")
    st = st if st in STATUSES else "running"
    if st == "running" and not is_live(read_lock(run_dir)):
        st = "interrupted"  # killed: no process holds its lock; a relaunch resumes it
    return Cell(list(ovs), run_dir, st, record.get("error"), expected, record.get("cell_id"))


def sweep_status(sweep_dir: str | Path) -> SweepStatus:
    """Completed / failed / running / missing cells of a sweep directory.

    Missing = the grid of `multirun.yaml` minus the cells that have a `result.json`. Without a
    readable multirun.yaml only existing runs are listed (`grid_error` says why)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    grids = _read_grids(sweep_dir)
    seed0 = grids.default_seed
    status = SweepStatus(sweep_dir=sweep_dir, grid_error=grids.error)
    if grids.jobs is not None:
        status.grid_size = len({cell_key(job, seed0) for job in grids.jobs})
    runs: dict[Any, tuple[Path, dict[str, Any] | None, list[str] | None]] = {}
    for run_dir, record, overrides in _existing_runs(sweep_dir):
        key = _run_key(record, overrides, seed0)
        if key is not None:
            runs[key] = (run_dir, record, overrides)
    seen = set()
    for job in grids.jobs or []:
        key = cell_key(job, seed0)
        seen.add(key)
        if key in runs:
            status.cells.append(_cell_of_run(runs[key], job, True, seed0))
        else:
            status.cells.append(Cell(list(job), sweep_dir / run_dirname(job) / f"seed={key[1]}", "missing"))
    status.cells += [_cell_of_run(run, None, grids.jobs is None, seed0) for key, run in runs.items() if key not in seen]
    _merge_same_cells(status)
    rerun = {cell_key(c.overrides, seed0) for c in status.to_rerun}
    commands = ([cmd for cmd, keys in grids.launchers if cmd and keys & rerun]
                or [cmd for cmd, _ in grids.launchers if cmd])
    status.relaunch = "\n".join(dict.fromkeys(commands)) or None
    return status


def _merge_same_cells(status: SweepStatus) -> None:
    """One cell per `cell_id`: the best run (completed first) stays, the others go to duplicates."""
    best: dict[str, Cell] = {}
    for cell in status.cells:
        if cell.cell_id is None:
            continue
        other = best.get(cell.cell_id)
        if other is None or _RANK[cell.status] < _RANK[other.status]:
            best[cell.cell_id] = cell
    keep = []
    for cell in status.cells:
        if cell.cell_id is not None and best[cell.cell_id] is not cell:
            status.duplicates.append(cell)
            if cell.expected and status.grid_size is not None:  # one expected cell, not two
                status.grid_size -= 1
        else:
            keep.append(cell)
    status.cells = keep


def cells_of_grid(status: SweepStatus, grid_cfg: DictConfig) -> list[Cell]:
    """The cells of one launcher's grid (its multirun config) in a sweep's status; a cell merged
    into another run of the same cell_id is represented by that run."""
    default_seed = OmegaConf.select(grid_cfg, "seed", default=0, throw_on_resolution_failure=False)
    keys = {cell_key(job, default_seed) for job in expected_grid(grid_cfg)}
    by_id = {c.cell_id: c for c in status.cells if c.cell_id}
    out = []
    for cell in status.cells + status.duplicates:
        if cell_key(cell.overrides, default_seed) in keys:
            out.append(by_id.get(cell.cell_id, cell) if cell.cell_id else cell)
    return list({id(c): c for c in out}.values())
