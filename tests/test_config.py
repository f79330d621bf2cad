"""Config composition (issue 2): every option of every group composes; run-dir naming rules."""

from __future__ import annotations

import pytest
from conftest import CONF_DIR, compose_config

from pruning.config import check_group_overrides, result_overrides, run_dirname

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]


def test_required_groups_exist():
    for group in ("model", "dataset", "method", "noise", "schedule", "finetune", "logger", "cluster"):
        assert group in GROUPS, group
    for schedule in ("oneshot", "multistage", "gradual"):
        assert (CONF_DIR / "schedule" / f"{schedule}.yaml").is_file()
    for logger in ("local", "wandb"):
        assert (CONF_DIR / "logger" / f"{logger}.yaml").is_file()
    for cluster in ("local", "submitit_local", "slurm"):
        assert (CONF_DIR / "cluster" / f"{cluster}.yaml").is_file()


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option):
    cfg = compose_config([f"{group}={option}"])
    assert cfg.sparsity == 0.9 and cfg.seed == 0
    if group in ("model", "dataset", "method"):
        assert cfg[group].name == option  # the option name is the registry key
    if group == "noise":
        assert cfg.noise.kind == option


def test_default_is_the_embedded_cell():
    cfg = compose_config()
    assert (cfg.model.name, cfg.dataset.name, cfg.method.name, cfg.noise.kind, cfg.schedule.name) == (
        "mlp", "digits", "magnitude", "none", "oneshot")
    assert cfg.device == "auto" and 0 <= cfg.sparsity < 1


def test_run_dirname_is_deterministic_and_ignores_non_result_keys():
    a = run_dirname(["sparsity=0.95", "method=woodfisher", "seed=3", "logger=wandb", "device=cpu"])
    b = run_dirname(["method=woodfisher", "sparsity=0.95"])
    assert a == b == "method=woodfisher,sparsity=0.95"
    assert run_dirname([]) == "default"
    assert "/" not in run_dirname(["model.checkpoint=/a/b.pt"])
    long = run_dirname([f"k{i}=" + "x" * 30 for i in range(20)])
    assert len(long) <= 200
    assert result_overrides(["+cluster=slurm", "fail_fast=true", "noise.kappa=2"]) == ["noise.kappa=2"]


def test_group_precheck_names_key_value_and_options():
    msg = check_group_overrides(["method=magnitude,foo"])
    assert msg is not None and "method='foo'" in msg and "magnitude" in msg
    assert check_group_overrides(["method=magnitude", "sparsity=0.5", "-m"]) is None
    assert check_group_overrides(["method=glob(*)"]) is None


def test_method_args_apply_only_to_their_method():
    from pruning.methods import make_config
    from pruning.task import method_params

    swap = compose_config(["method=swap", "+method_args.swap.epsilon=0.001", "+method_args.cbs.damp=0.5"])
    params = method_params(swap)
    assert params["epsilon"] == 0.001 and "damp" not in params
    assert make_config("swap", params).epsilon == 0.001
    mag = compose_config(["method=magnitude", "+method_args.swap.epsilon=0.001"])
    assert method_params(mag) == {"name": "magnitude", "scope": "global"}
