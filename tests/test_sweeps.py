"""Studies in sweeps/ (issue 9): every study composes the way `launch.py -cd sweeps -cn <study>` does,
is named after its file, documents its job count, GPU hours and reference in its header, its grid
expands to the documented job count, every job's config passes the run-time validation, and the
quickstart study runs end to end (shrunk) and writes its report."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import CONF_DIR, ROOT
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_config_search_path
from hydra.core.config_search_path import SearchPathQuery
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pruning import config as config_mod
from pruning import finetune, methods
from pruning import noise as noise_mod
from pruning.errors import ConfigError
from pruning.sweep import expected_grid
from pruning.train import train_config

SWEEPS_DIR = ROOT / "sweeps"
STUDIES = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
REQUIRED = ["smoke", "quickstart", "swap_mlpnet_mnist", "swap_resnet20_study1", "swap_resnet20_study2",
            "swap_resnet20_epsilon", "swap_mobilenetv1_study3", "oneshot_mlpnet_mnist",
            "oneshot_resnet20_cifar10", "oneshot_mobilenetv1_imagenet", "woodfisher_gradual_resnet50",
            "grda_vgg16_cifar10", "sdprun_vgg16_cifar10", "gfs_mobilenetv2_imagenet", "analog_pcm_drift",
            "adversarial_robustness"]


def compose_study(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose exactly as the CLI does for `launch.py -cd sweeps -cn <name> <overrides>`: conf/ is the
    primary (main) source and `-cd` prepends sweeps/ as the `command-line` provider before the schema
    provider (hydra._internal.utils.run_hydra). Returns the config with its `hydra` node."""
    GlobalHydra.instance().clear()
    search_path = create_config_search_path(str(CONF_DIR))
    search_path.prepend(provider="command-line", path=f"file://{SWEEPS_DIR}",
                        anchor=SearchPathQuery(provider="schema"))
    hydra = Hydra.create_main_hydra2(task_name="launch", config_search_path=search_path)
    try:
        return hydra.compose_config(config_name=name, overrides=list(overrides or []),
                                    run_mode=RunMode.MULTIRUN, with_log_configuration=False)
    finally:
        GlobalHydra.instance().clear()


def header(name: str) -> str:
    """The leading comment block of a study file."""
    lines = []
    for line in (SWEEPS_DIR / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def documented_jobs(name: str) -> int:
    m = re.search(r"^# Jobs: (\d+)\b", header(name), re.MULTILINE)
    assert m, f"sweeps/{name}.yaml: the header needs a line '# Jobs: <count> = ...'"
    return int(m.group(1))


# ------------------------------------------------------------------ per study, no runs

def test_required_studies_exist():
    missing = sorted(set(REQUIRED) - set(STUDIES))
    assert not missing, f"studies missing from sweeps/: {missing}"


@pytest.mark.parametrize("name", STUDIES)
def test_header_documents_purpose_jobs_gpu_hours_and_reference(name):
    text = header(name)
    assert text.startswith(f"# {name}: "), f"sweeps/{name}.yaml: the header starts with '# {name}: <purpose>'"
    for field in ("Reproduces:", "Reference", "Run:", "Jobs:", "GPU hours:"):
        assert re.search(rf"^# {field}", text, re.MULTILINE), f"sweeps/{name}.yaml: header lacks '# {field}'"
    assert f"python3 launch.py -cd sweeps -cn {name}" in text
    m = re.search(r"^# GPU hours: ~?(\d+(\.\d+)?)", text, re.MULTILINE)
    assert m, f"sweeps/{name}.yaml: '# GPU hours:' needs a number (0 for CPU studies)"
    if float(m.group(1)) > 0:
        assert "assum" in text.lower(), f"sweeps/{name}.yaml: state the assumptions behind the GPU hours"


@pytest.mark.parametrize("name", STUDIES)
def test_study_composes_and_grid_matches_documented_jobs(name):
    raw = yaml.safe_load((SWEEPS_DIR / f"{name}.yaml").read_text())
    assert raw["defaults"][0] == "config" and raw["defaults"][-1] == "_self_"
    cfg = compose_study(name)
    assert cfg.sweep_name == name
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert Path(cfg.hydra.sweep.dir).parts[-2:] == ("sweeps", name)
    assert len(expected_grid(cfg)) == documented_jobs(name)


def _job_key(job: list[str]) -> tuple[str, ...]:
    return tuple(o for o in job if o.split("=", 1)[0] not in ("seed", "sparsity"))


def check_jobs(name: str, overrides: list[str] | None = None) -> int:
    """Each distinct job of `launch.py -cd sweeps -cn <name> <overrides>` (seeds and sparsities aside)
    composes and passes what a run checks before any work: run-level keys, the method's and the
    noise model's configs, the fine-tuning optimisers. Returns the number of jobs."""
    grid = expected_grid(compose_study(name, overrides))
    sparsities = {float(o.split("=", 1)[1]) for job in grid for o in job if o.startswith("sparsity=")}
    jobs = {_job_key(job): job for job in grid}
    for job in jobs.values():
        cfg = compose_study(name, [*(overrides or []), *job])
        for s in sparsities or {float(cfg.sparsity)}:
            cfg.sparsity = s
            config_mod.validate(cfg)
        methods.make_config(cfg.method.name, cfg.method)
        noise_mod.build(cfg.noise)
        finetune.final_recipe(cfg)  # the finetune group's training settings, as a run reads them
        finetune.bn_examples(cfg)
        if cfg.schedule.get("stage_finetune"):
            params = {**OmegaConf.to_container(cfg.schedule.stage_finetune, resolve=True),
                      "epochs": cfg.schedule.finetune_epochs}
            train_config(params, "schedule.stage_finetune")
    return len(grid)


@pytest.mark.parametrize("name", STUDIES)
def test_every_job_config_is_valid(name):
    assert check_jobs(name) == documented_jobs(name)


def documented_commands() -> list[tuple[str, str, str]]:
    """(file, study, arguments) of every `python3 launch.py -cd sweeps -cn ...` line in the headers."""
    out = []
    for name in STUDIES:
        for line in header(name).splitlines():
            m = re.search(r"python3 launch\.py -cd sweeps -cn (\S+)(.*)$", line)
            if m:
                out.append((name, m.group(1), m.group(2)))
    return out


@pytest.mark.parametrize(("name", "study", "args"), documented_commands())
def test_documented_commands_compose_and_validate(name, study, args):
    """The commands in the headers (cluster flags, checkpoints, extra cells) compose and validate;
    an optional part is written in brackets, e.g. [cluster=slurm resources=gpu1]."""
    assert study == name, f"sweeps/{name}.yaml documents a command for another study: {study}"
    args = re.sub(r"(^|\s)\[([^\[\]]*=[^\[\]]*)\](?=\s|$)", r"\1\2", args)
    assert check_jobs(name, shlex.split(args)) > 0


@pytest.mark.parametrize("name", ["quickstart", "swap_resnet20_epsilon"])
def test_composition_matches_the_cli(name):
    """compose_study is what the CLI composes (`--cfg job`: the job config, before the sweep)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "-cd", str(SWEEPS_DIR), "-cn", name,
                           "--cfg", "job"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cli = OmegaConf.create(proc.stdout)
    ours = {k: v for k, v in OmegaConf.to_container(compose_study(name)).items() if k != "hydra"}
    assert OmegaConf.to_container(cli) == ours


def test_swap_studies_follow_the_reference_protocol():
    """The SWAP scripts' settings (algorithms.md 6.3, 7), as composed from the real files."""
    mlp = compose_study("swap_mlpnet_mnist")
    assert (mlp.model.name, mlp.dataset.name, mlp.schedule.name, mlp.schedule.stages) == ("mlpnet", "mnist", "multistage", 14)
    assert (mlp.calibration.num_samples, mlp.calibration.mini_batch, mlp.schedule.finetune_epochs) == (1000, 1, 1)
    ft = train_config({**mlp.schedule.stage_finetune, "epochs": 1}, "schedule.stage_finetune")
    assert (ft.lr, ft.momentum, ft.batch_size, ft.optimizer) == (1e-3, 0.5, 64, "sgd")
    grids = {}
    for name in ("swap_resnet20_study1", "swap_resnet20_study2", "swap_mobilenetv1_study3"):
        cfg = compose_study(name)
        assert (cfg.sparsity, cfg.schedule.stages, cfg.calibration.num_samples, cfg.noise.kind) == (0.95, 9, 100, "gradient")
        grids[name] = {(float(OmegaConf.select(c, "noise.kappa")), float(OmegaConf.select(c, "noise.fraction")))
                       for c in (compose_study(name, job) for job in {_job_key(j): j for j in expected_grid(cfg)}.values())}
    assert grids["swap_resnet20_study1"] == {(1, 0.25), (1, 0.5), (4, 0.25), (4, 0.5)}
    assert grids["swap_resnet20_study2"] == {(k, p) for k in (1, 2, 4) for p in (0.1, 1.0)}
    assert grids["swap_mobilenetv1_study3"] == {(k, p) for k in (1, 2) for p in (0.1, 0.25)}
    eps = compose_study("swap_resnet20_epsilon")
    values = set()
    for job in expected_grid(eps):
        if job[-1].startswith("seed=0"):
            cfg = methods.make_config("swap", compose_study("swap_resnet20_epsilon", job).method)
            values.add(cfg.epsilon)
    assert values == {0.0, 1.0, 2.0, 10.0, float("inf")}
    assert (eps.noise.kappa, eps.noise.fraction) == (1.0, 0.1)


def test_stage_finetune_errors_name_the_schedule_key(make_cfg, tmp_path):
    """schedule.stage_finetune is what the per-stage fine-tuning reads: a bad key in it is reported
    under that name (one line, the allowed keys), not under finetune."""
    from pruning.task import run

    cfg = make_cfg("schedule=multistage", "schedule.stages=1", "schedule.finetune_epochs=1",
                   "+schedule.stage_finetune.lrate=0.1", "model.train.epochs=2")
    with pytest.raises(ConfigError) as err:
        run(cfg, tmp_path / "run")
    msg = str(err.value)
    assert "schedule.stage_finetune.lrate" in msg and "momentum" in msg
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "failed"


# ------------------------------------------------------------------------ end to end

@pytest.mark.slow
def test_quickstart_runs_end_to_end_and_writes_its_report(tmp_path, session_cache):
    """The real study through launch.py, shrunk on the command line (1 seed, 2 sparsities, 2 stages,
    N = 32, a 2-epoch dense model): 4 methods x 2 sparsities x 2 noise settings = 16 jobs."""
    out = tmp_path / "outputs"
    cmd = [sys.executable, str(ROOT / "launch.py"), "-cd", str(SWEEPS_DIR), "-cn", "quickstart",
           "sparsity=0.5,0.95", "seed=0", "schedule.stages=2", "calibration.num_samples=32",
           "model.train.epochs=2", f"paths.cache_dir={session_cache}", f"paths.data_dir={tmp_path / 'data'}",
           "progress=false", "device=cpu"]
    env = {**os.environ, "PRUNING_OUT_DIR": str(out), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = out / "sweeps" / "quickstart"
    assert "16 completed, 0 failed, 0 running, 0 interrupted, 0 missing of 16 expected" in proc.stdout, proc.stdout[-3000:]

    results = pd.read_csv(sweep / "report" / "results.csv")
    assert len(results) == 16 and set(results["status"]) == {"completed"}
    assert set(results["method"]) == {"magnitude", "woodfisher", "lr", "swap"}
    assert set(results["noise"]) == {"none", "gradient"} and set(results["schedule"]) == {"multistage"}
    md = (sweep / "report" / "table.md").read_text()
    assert "# Sweep report: quickstart" in md and "noise: none" in md and "noise: gradient" in md
    assert "| 0.95 |" in md and "(n=1)" in md
    assert list((sweep / "report").glob("acc_vs_sparsity*.png"))
    relaunch = (sweep / "report" / "missing.txt").read_text()
    assert f"-cd {SWEEPS_DIR} -cn quickstart" in relaunch

    (run_dir,) = [d for d in sweep.glob("*/seed=0") if {"method=swap", "noise=gradient", "sparsity=0.95"}
                  <= set(d.parent.name.split(","))]
    record = json.loads((run_dir / "result.json").read_text())
    assert [round(s["target_sparsity"], 4) for s in record["stages"]] == [0.0, 0.95]
    assert record["index"]["noise"] == "gradient" and record["metrics"]["sparsity_prunable"] == pytest.approx(0.95, abs=1e-3)
    phases = {json.loads(line).get("phase") for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
    assert {"stage1_finetune", "stage2_finetune", "final"} <= phases
