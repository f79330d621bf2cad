"""Hydra glue kept small: OmegaConf resolvers, early checks of group options, validation.

Importing this module registers the resolvers used by `conf/config.yaml` (it is imported by
`pruning.task`, so a Slurm worker that unpickles the task registers them too).
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pruning.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# Overrides that do not change results: they never change the run directory, so a run resumed
# under another launcher, logger or device finds its own directory.
NON_RESULT_KEYS = (
    "seed", "sweep_name", "cluster", "resources", "logger", "resume", "fail_fast", "device",
    "progress", "save_model", "paths", "hydra", "tags", "deterministic", "eval.batch_size", "calibration.chunk_size",
    "calibration.cache", "calibration.stream", "calibration.stream_chunk_mb", "calibration.stream_cols",
    "calibration.resident_mb", "calibration.sub_batch", "calibration.num_workers", "dataset.num_workers", "local", "site",
)
_SAFE = re.compile(r"[^A-Za-z0-9._=,+-]")


def override_key(override: str) -> str:
    """The key of a command-line override: `+a.b=1`, `~a.b` and `a.b=1` all give `a.b`."""
    return override.split("=", 1)[0].lstrip("+~")


def result_overrides(overrides: Iterable[str]) -> list[str]:
    """The overrides that change results, sorted (order on the command line does not matter)."""
    out = []
    for ov in overrides:
        key = override_key(str(ov))
        if any(key == k or key.startswith(k + ".") for k in NON_RESULT_KEYS):
            continue
        out.append(str(ov))
    return sorted(out)


def run_dirname(overrides: Sequence[str] | None) -> str:
    """Directory name of a run from its result-relevant overrides ('default' when there are none)."""
    items = result_overrides(list(overrides or []))
    if not items:
        return "default"
    name = ",".join(_SAFE.sub("_", s.replace("/", "_")) for s in items)
    if len(name) > 180:  # keep within filesystem limits, still unique
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[:160]}-{digest}"
    return name


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("run_dirname", lambda ovs: run_dirname(list(ovs)), replace=True)


register_resolvers()


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def check_group_overrides(argv: Sequence[str], conf_dir: Path = CONF_DIR) -> str | None:
    """One-line error for `group=option` on the command line when the option does not exist.

    Hydra's own message for this is several lines plus a hint about HYDRA_FULL_ERROR; researchers
    mistype option names often enough that a single clear line is worth it. Sweep syntax
    (`a,b`) is checked item by item; functions such as glob(...) are left to Hydra.
    """
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()} if conf_dir.is_dir() else set()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key not in groups or "(" in value or "${" in value or value in ("null", ""):
            continue
        allowed = group_options(key, conf_dir)
        for option in value.split(","):
            if option and option not in allowed:
                return f"error: {key}={option!r} is not an option of '{key}'; allowed: {', '.join(allowed)}"
    return None


def precheck_cli(argv: Sequence[str] | None = None) -> None:
    """Exit with status 2 and one line on stderr if a group option on the command line is unknown."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # with -cd/--config-dir pointing elsewhere (sweeps/) the groups still come from conf/
    msg = check_group_overrides(argv)
    if msg:
        print(msg, file=sys.stderr)
        raise SystemExit(2)


def resolve_device(spec: str) -> Any:
    """'auto' -> cuda when available, else cpu; 'cpu', 'cuda', 'cuda:N' as given (checked)."""
    import torch

    spec = str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu" or re.fullmatch(r"cuda(:\d+)?", spec):
        if spec.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("device", spec, "'auto' or 'cpu' (no CUDA device is visible)", "cannot be used")
        return torch.device(spec)
    raise ConfigError("device", spec, "auto, cpu, cuda, cuda:N")


def require(cond: bool, key: str, value: Any, allowed: str, problem: str | None = None) -> None:
    if not cond:
        raise ConfigError(key, value, allowed, problem)


def validate(cfg: Any) -> None:
    """Checks the run-level keys every task relies on; groups validate their own keys."""
    require(cfg.task in ("prune", "train"), "task", cfg.task, "prune, train")
    s = cfg.sparsity
    require(isinstance(s, (int, float)) and not isinstance(s, bool) and 0.0 <= float(s) < 1.0,
            "sparsity", s, "a number in [0, 1)", "is outside [0, 1)")
    require(isinstance(cfg.seed, int), "seed", cfg.seed, "an integer")
    cal = cfg.calibration
    for key in ("num_samples", "mini_batch", "chunk_size"):
        v = cal[key]
        require(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"calibration.{key}", v,
                "a positive integer", "must be a positive integer")
    if cal.block_size is not None:
        require(isinstance(cal.block_size, int) and cal.block_size > 0, "calibration.block_size",
                cal.block_size, "null or a positive integer")
    sub = cal.get("sub_batch")
    require(sub is None or (isinstance(sub, int) and not isinstance(sub, bool) and sub > 0), "calibration.sub_batch",
            sub, "null (the whole mini-batch) or a positive integer")
    for key, workers in (("calibration.num_workers", cal.get("num_workers")),
                         ("dataset.num_workers", cfg.dataset.get("num_workers"))):
        require(workers is None or (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 0),
                key, workers, "null or a non-negative integer")
    require(cfg.schedule.name in ("oneshot", "multistage", "gradual"), "schedule.name",
            cfg.schedule.name, "oneshot, multistage, gradual")
    if cfg.schedule.name == "multistage":
        st = cfg.schedule.stages
        require(isinstance(st, int) and st >= 1, "schedule.stages", st, "a positive integer")
    ft = cfg.finetune.epochs
    require(isinstance(ft, int) and ft >= 0, "finetune.epochs", ft, "a non-negative integer")
