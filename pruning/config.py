"""Hydra glue kept small: OmegaConf resolvers, early checks of group options, validation.

Importing this module registers the resolvers used by `conf/config.yaml` (it is imported by
`pruning.task`, so a Slurm worker that unpickles the task registers them too).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pruning.errors import ConfigError, choice, closest, flag, integer, require, unknown_key

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# Overrides that do not change results: they never change the run directory, so a run resumed
# under another launcher, logger or device finds its own directory.
NON_RESULT_KEYS = (
    "seed", "sweep_name", "cluster", "resources", "logger", "resume", "fail_fast", "device",
    "progress", "save_model", "paths", "hydra", "tags", "deterministic", "eval.batch_size", "calibration.chunk_size",
    "calibration.cache", "calibration.cache_stages", "calibration.stream", "calibration.stream_chunk_mb",
    "calibration.stream_cols", "calibration.resident_mb", "calibration.sub_batch", "calibration.num_workers",
    "dataset.num_workers", "local", "site",
)
TASKS = ("prune", "train")
SCHEDULES = ("oneshot", "multistage", "gradual")
_SAFE = re.compile(r"[^A-Za-z0-9._=,+-]")


def override_key(override: str) -> str:
    """The key of a command-line override: `+a.b=1`, `~a.b` and `a.b=1` all give `a.b`."""
    return override.split("=", 1)[0].lstrip("+~")


def result_overrides(overrides: Iterable[str]) -> list[str]:
    """The overrides that change results, sorted (order on the command line does not matter).

    `threads` changes results only under `deterministic=true` (the thread count is pinned then;
    otherwise torch's default applies anyway), so it names the directory only next to that override."""
    overrides = [str(ov) for ov in overrides]
    pinned = any(override_key(ov) == "deterministic" and ov.split("=", 1)[-1].lower() == "true"
                 for ov in overrides)
    out = []
    for ov in overrides:
        key = override_key(ov)
        if any(key == k or key.startswith(k + ".") for k in NON_RESULT_KEYS):
            continue
        if key == "threads" and not pinned:
            continue
        out.append(ov)
    return sorted(out)


def cell_id(resolved: Mapping[str, Any], method_params: Mapping[str, Any]) -> str:
    """Identity of a run from its resolved settings: a hash of the resolved config without the keys
    that do not change results, with the active method's settings (`method` plus its `method_args`
    entry) in place of `method` and `method_args`, and the seed. Two runs with equal `cell_id`
    compute the same thing, whatever their overrides looked like (`method=magnitude` or the
    default), so a report never counts one cell twice. `threads` counts only under
    `deterministic=true` (see `effective_threads`)."""
    data = {k: v for k, v in resolved.items() if k not in ("method", "method_args")}
    data = _drop_keys(data, [k for k in NON_RESULT_KEYS if k != "seed"] + ["cluster_name", "threads"])
    data["method"] = dict(method_params)
    data["threads"] = effective_threads(resolved) if resolved.get("deterministic") else None
    blob = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _drop_keys(data: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    out = dict(data)
    for key in keys:
        head, _, rest = key.partition(".")
        if not rest:
            out.pop(head, None)
        elif isinstance(out.get(head), Mapping):
            out[head] = _drop_keys(out[head], [rest])
    return out


def effective_threads(cfg: Mapping[str, Any]) -> int | None:
    """Intra-op threads a run uses: `threads`, or 1 under `deterministic=true` when it is null (a
    reduction split over another number of threads rounds differently, so a run resumed with
    OMP_NUM_THREADS=<cpus> on Slurm would not equal one started locally); None = torch's default."""
    threads = cfg.get("threads")
    if threads is None and cfg.get("deterministic"):
        return 1
    return None if threads is None else int(threads)


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
    # `${studies:}` in hydra.help: the studies in sweeps/, wrapped. Self-contained on purpose: submitit
    # pickles the resolvers into every job, and a lambda that names nothing new pickles by value.
    OmegaConf.register_new_resolver("studies", lambda: __import__("textwrap").fill(
        ", ".join(sorted(p.stem for p in (CONF_DIR.parent / "sweeps").glob("*.yaml"))), 100,
        break_on_hyphens=False), replace=True)


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


# Hydra's flags that take a value (`-cd sweeps`), so the value is not read as an override
_FLAGS_WITH_VALUE = ("-cd", "--config-dir", "-cn", "--config-name", "-cp", "--config-path", "-c", "--cfg",
                     "-p", "--package", "--info", "--experimental-rerun")


def split_cli(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """(overrides, {flag: value}) of a launch.py command line."""
    overrides: list[str] = []
    flags: dict[str, str] = {}
    it = iter(argv)
    for arg in it:
        if arg.startswith("-"):
            name, eq, value = arg.partition("=")
            if name in _FLAGS_WITH_VALUE and not eq:
                value = next(it, "")
            flags[name] = value
        elif "=" in arg or arg.startswith("~"):
            overrides.append(arg)
    return overrides, flags


def check_repeated_keys(overrides: Sequence[str]) -> str | None:
    """One-line error when a key is given twice: Hydra keeps the last value but the run directory
    is named after both, so `sparsity=0.9 sparsity=0.5` would later be skipped as completed."""
    seen: dict[str, str] = {}
    for ov in overrides:
        key = override_key(ov)
        if key in seen:
            return (f"error: {key} is given twice ({seen[key]} {ov}); allowed: each key once "
                    f"(sweep several values with {key}=a,b and -m)")
        seen[key] = ov
    return None


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        key = f"{prefix}{k}"
        out.append(key)
        if isinstance(v, Mapping):
            out += _flat_keys(v, key + ".")
    return out


def _compose_base(overrides: Sequence[str], flags: Mapping[str, str]) -> Any:
    """The config the command line starts from (group options only, first of a sweep list), composed
    as Hydra does for `launch.py [-cd DIR -cn NAME]`: conf/ is the main source, `-cd` adds DIR."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    import pruning.hydra_conf  # noqa: F401 (conf/method and conf/noise compose from its nodes)

    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    picks = []
    for ov in overrides:
        key, _, value = ov.partition("=")
        if key.lstrip("+~") in groups and "(" not in value:
            picks.append(f"{key}={value.split(',')[0]}")
    search_path = create_config_search_path(str(CONF_DIR))
    cli_dir = flags.get("-cd") or flags.get("--config-dir")
    if cli_dir:
        search_path.prepend(provider="command-line", path=f"file://{Path(cli_dir).resolve()}",
                            anchor=SearchPathQuery(provider="schema"))
    GlobalHydra.instance().clear()
    try:
        hydra = Hydra.create_main_hydra2(task_name="launch", config_search_path=search_path)
        return hydra.compose_config(config_name=flags.get("-cn") or flags.get("--config-name") or "config",
                                    overrides=picks, run_mode=RunMode.RUN, with_log_configuration=False)
    finally:
        GlobalHydra.instance().clear()


def check_unknown_keys(overrides: Sequence[str], flags: Mapping[str, str]) -> str | None:
    """One-line error for an override of a key the config does not have (Hydra prints five lines and
    suggests `+key=...`, which would then silently add an unused key), naming the closest key.
    `+key=...` may add keys inside existing nodes (method_args, a method's keys, checked by the task
    before any data is loaded) but not new top-level keys."""
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    todo = [ov for ov in overrides if not ov.startswith("~") and override_key(ov).split(".")[0] != "hydra"
            and override_key(ov) not in groups and "/" not in override_key(ov)]
    if not todo:
        return None
    try:
        cfg = _compose_base(overrides, flags)
    except Exception:  # composition problems are Hydra's to report
        return None
    keys = [k for k in _flat_keys(OmegaConf.to_container(cfg, resolve=False)) if not k.startswith("hydra")]
    swept_groups = {override_key(ov) for ov in overrides if override_key(ov) in groups and "," in ov}
    studies = CONF_DIR.parent / "sweeps"
    for ov in todo:
        key, value = override_key(ov), ov.partition("=")[2]
        head = key.split(".")[0]
        if key in ("experiment", "study", "sweep") and (studies / f"{value}.yaml").is_file():
            # lightning-hydra-template's `experiment=<name>`: here a study is a primary config
            return (f"error: {key}={value!r} is not a config key; allowed: studies are selected with "
                    f"-cd sweeps -cn {value} (python3 launch.py -cd sweeps -cn {value})")
        if ov.startswith("+"):
            if head not in cfg and head not in known_top_level_keys():
                return f"error: {unknown_key(head, value, keys)}"
        elif OmegaConf.select(cfg, key, default=_MISSING) is _MISSING and head not in swept_groups:
            return _group_key_message(key, value, cfg) or f"error: {unknown_key(key, value, keys)}"
    return None


_MISSING = object()


def _group_key_message(key: str, value: str, cfg: Any) -> str | None:
    """The one line for `method.<k>=v` / `noise.<k>=v` when the selected option has no key k: its own
    keys, and which options do have k (select one, or `+method_args.<m>.<k>=v` for one method only)."""
    import dataclasses

    from pruning.registry import METHODS, NOISE

    group, _, sub = key.partition(".")
    if group not in ("method", "noise") or not sub or group not in cfg:
        return None
    current = str(cfg[group].get("name" if group == "method" else "kind", ""))
    top = sub.split(".")[0]
    registry = METHODS if group == "method" else NOISE
    owners = [name for name, spec in registry.items()
              if spec.config is not None and top in {f.name for f in dataclasses.fields(spec.config.load())}]
    own = sorted(str(k) for k in cfg[group].keys() if k not in ("name", "kind"))
    near = closest(top, own)
    allowed = (f"did you mean {group}.{near}? " if near else "") + f"the keys of {group} {current!r}: {', '.join(own) or 'none'}"
    if owners and group == "method":
        allowed += (f"; {top} is a key of {', '.join(owners)}: select one ({group}={owners[0]} {key}={value}) "
                    f"or set it for that method only (+method_args.{owners[0]}.{sub}={value})")
    elif owners:
        allowed += f"; {top} is a key of noise {', '.join(owners)} (noise={owners[0]} {key}={value})"
    return f"error: {ConfigError(key, value, allowed, f'is not a key of {group} {current!r}')}"


def check_quoted_values(overrides: Sequence[str]) -> str | None:
    """One line for a value holding an unquoted `=`, e.g. a run directory `.../seed=0/model.pt`:
    Hydra's grammar stops at the second `=` and prints a parser error."""
    for ov in overrides:
        key, _, value = ov.partition("=")
        if "=" in value and value[:1] not in ("'", '"') and not re.match(r"^\w+\(", value):
            return (f"error: {key.lstrip('+~')}={value!r} holds '=', which Hydra reads as a second override; "
                    f"allowed: the value in single quotes inside double quotes, e.g. \"{key}='{value}'\"")
    return None


def check_config_name(flags: Mapping[str, str]) -> str | None:
    """One line for `-cn NAME` naming no config in `-cd DIR` (else conf/): the closest name, and
    `-cd sweeps` when NAME is a study given without it."""
    name = flags.get("-cn", flags.get("--config-name"))
    if not name:
        return None
    where = Path(flags.get("-cd", flags.get("--config-dir", "")) or CONF_DIR)
    stem = name[:-5] if name.endswith(".yaml") else name
    if (where / f"{stem}.yaml").is_file():
        return None
    studies = CONF_DIR.parent / "sweeps"
    if (studies / f"{stem}.yaml").is_file():
        return f"error: -cn {name!r} is a study; allowed: add -cd sweeps (python3 launch.py -cd sweeps -cn {stem})"
    names = sorted(p.stem for p in where.glob("*.yaml")) if where.is_dir() else []
    allowed = f"did you mean {near}?" if (near := closest(stem, names)) else "one of " + ", ".join(names)
    return f"error: -cn {name!r} is not a config in {where}; allowed: {allowed}"


def precheck_cli(argv: Sequence[str] | None = None) -> None:
    """Exit with status 2 and one line on stderr for an unknown config name (-cn), a value with an
    unquoted `=`, an unknown group option, a key given twice or an unknown key on the command line
    (before Hydra composes anything)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, flags = split_cli(argv)
    if "--help" in flags or "-h" in flags or "--hydra-help" in flags:
        return
    # with -cd/--config-dir pointing elsewhere (sweeps/) the groups still come from conf/
    msg = (check_config_name(flags) or check_quoted_values(overrides) or check_group_overrides(argv)
           or check_repeated_keys(overrides) or check_unknown_keys(overrides, flags))
    if msg:
        print(msg, file=sys.stderr)
        raise SystemExit(2)


@functools.cache
def known_top_level_keys(conf_dir: Path = CONF_DIR) -> frozenset[str]:
    """Top-level keys a run config may have: conf/config.yaml's, the group names and the keys that
    `# @package _global_` group files add (cluster_name, site, ...)."""
    keys = {"hydra", "defaults"}
    keys |= set(OmegaConf.load(conf_dir / "config.yaml").keys())
    for group in (p for p in conf_dir.iterdir() if p.is_dir()):
        keys.add(group.name)
        for path in group.glob("*.yaml"):
            text = path.read_text()
            if "@package _global_" in text:
                try:
                    keys |= {str(k) for k in (OmegaConf.create(text) or {}).keys()}
                except Exception:
                    continue
    return frozenset(keys)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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


def validate(cfg: Any) -> None:
    """Checks the run-level keys every task relies on; groups validate their own keys (the task
    builds the method's and the noise model's configs right after this, before any data is loaded)."""
    known = known_top_level_keys()
    for key in cfg.keys():
        if key not in known:
            raise unknown_key(str(key), cfg[key], known)
    base = OmegaConf.load(CONF_DIR / "config.yaml")
    for node in ("calibration", "eval", "paths"):
        for key in cfg[node].keys():
            if key not in base[node]:
                raise unknown_key(f"{node}.{key}", cfg[node][key], [f"{node}.{k}" for k in base[node]])
    choice(cfg.task, "task", TASKS)
    s = cfg.sparsity
    require(_is_number(s), "sparsity", s, "a number in [0, 1)", "is not a number")
    require(math.isfinite(float(s)) and 0.0 <= float(s) < 1.0, "sparsity", s, "a number in [0, 1)",
            "is outside [0, 1)")
    require(_is_int(cfg.seed), "seed", cfg.seed, "an integer", "is not an integer")
    for key in ("deterministic", "resume", "fail_fast", "progress"):
        flag(cfg.get(key), key, default=False)  # null means false
    threads = cfg.get("threads")
    require(threads is None or (_is_int(threads) and threads > 0), "threads", threads,
            "null (torch's default; 1 under deterministic=true) or a positive integer")
    from pruning.gradients.cache import CalibrationSettings  # torch: imported only when validating a run

    CalibrationSettings.parse(OmegaConf.to_container(cfg.calibration, resolve=True))  # the one set of checks
    workers = cfg.dataset.get("num_workers")
    if workers is not None:
        integer(workers, "dataset.num_workers", lo=0, allowed="null or a non-negative integer")
    choice(cfg.schedule.name, "schedule.name", SCHEDULES)
    if cfg.schedule.name == "multistage":
        st = cfg.schedule.stages
        integer(st, "schedule.stages", lo=1, allowed="a positive integer")
    ft = cfg.finetune.epochs
    integer(ft, "finetune.epochs", lo=0, allowed="a non-negative integer")
