"""Issue 14 items 3 and 5: one line for every bad input (exit 2, a `failed` record wherever a run
directory exists), checked before any data is loaded; NaN/inf in weights and G; a run whose
achieved sparsity misses its target is failed; deterministic=true does not depend on the number
of threads."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess

import pytest
import torch
from conftest import ROOT
from omegaconf import open_dict
from test_cli import error_lines, launch

from pruning import calibrate as calibrate_mod
from pruning import task as task_mod
from pruning.errors import ConfigError
from pruning.task import run

# helpers added with these checks are imported inside the tests, so the behavioural tests also
# run (and fail) on a checkout without them


def multirun(tmp_path, *overrides: str, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    """`launch.py -m progress=false <overrides>` (the flag must come before the overrides)."""
    import os
    import sys

    from conftest import ROOT

    env = {**os.environ, "PRUNING_OUT_DIR": str(tmp_path / "out"), "PRUNING_DATA_DIR": str(tmp_path / "data"),
           "HYDRA_FULL_ERROR": "0"}
    args = [sys.executable, str(ROOT / "launch.py"), "-m", "progress=false", "hydra.callbacks.report.enabled=false",
            *overrides]
    if not wait:
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def records(root) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("result.json"))]


# ----------------------------------------------------------------------------- the command line

@pytest.mark.parametrize(("overrides", "words", "record"), [
    (["sparsity=0.5", "sparsity=0.9"], ["sparsity", "given twice", "0.5", "0.9"], False),
    (["spars=0.5"], ["spars", "not a config key", "did you mean sparsity"], False),
    (["+spars=0.5"], ["spars", "not a config key", "did you mean sparsity"], False),
    (["calibration.num_sampels=8"], ["calibration.num_sampels", "calibration.num_samples"], False),
    (["sparsity=abc"], ["sparsity='abc'", "not a number", "[0, 1)"], True),
    (["seed=abc"], ["seed='abc'", "not an integer"], True),
], ids=["repeated", "unknown", "unknown-added", "unknown-nested", "sparsity-type", "seed-type"])
def test_bad_command_line_is_one_line_and_exit_2(tmp_path, overrides, words, record):
    proc = launch(tmp_path, *overrides)
    lines = error_lines(proc)
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    recs = records(tmp_path / "out")
    if record:  # Hydra made the run directory: the failure is recorded there, without error.txt
        assert len(recs) == 1 and recs[0]["status"] == "failed" and words[0] in recs[0]["error"]
        assert not list((tmp_path / "out").rglob("error.txt"))
    else:  # rejected before Hydra composed anything
        assert recs == []


def test_multirun_config_error_is_recorded_and_sets_exit_2(tmp_path):
    proc = multirun(tmp_path, "sparsity=abc,1.5")
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in error_lines(proc) if ln.startswith("error:")]
    assert len(lines) == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "error.txt" not in proc.stderr + proc.stdout  # no pointer to a file that does not exist
    recs = records(tmp_path / "out" / "sweeps")
    assert sorted(r["error"].split("=")[0] for r in recs) == ["sparsity", "sparsity"]
    assert all(r["status"] == "failed" and r["error_type"] == "config" and "\n" not in r["error"] for r in recs)


def test_precheck_helpers():
    from pruning.config import check_repeated_keys, check_unknown_keys
    from pruning.errors import closest, unknown_key

    assert check_repeated_keys(["a=1", "+a=2"]) is not None
    assert check_repeated_keys(["a=1", "b=2", "hydra.x=1"]) is None
    assert check_unknown_keys(["sparsity=0.5", "+method_args.swap.epsilon=0.1", "method=lr,swap"], {}) is None
    assert "did you mean sparsity" in check_unknown_keys(["sparsty=0.5"], {})
    assert "did you mean sparsity" in check_unknown_keys(["+spars=0.5"], {})
    assert closest("spars", ["seed", "sparsity", "device"]) == "sparsity"
    assert closest("zzz", ["seed", "sparsity"]) is None
    assert "did you mean calibration.num_samples" in str(unknown_key("calibration.num_sample", 1,
                                                                     ["calibration.num_samples"]))


def test_a_key_of_another_option_names_the_option_that_has_it():
    from pruning.config import check_unknown_keys

    msg = check_unknown_keys(["method.damp=1e-3"], {})
    assert "is not a key of method 'magnitude'" in msg and "scope" in msg
    assert "method=woodfisher method.damp=1e-3" in msg and "+method_args.woodfisher.damp=1e-3" in msg
    assert "did you mean method.damp?" in check_unknown_keys(["method=woodfisher", "method.dampp=1"], {})
    msg = check_unknown_keys(["noise.kappa=2"], {})
    assert "is not a key of noise 'none'" in msg and "noise=gradient noise.kappa=2" in msg


def test_an_experiment_override_naming_a_study_points_to_cd_sweeps():
    """lightning-hydra-template selects experiments with `experiment=<name>`; here a study is a
    primary config, so the line says how to select it."""
    from pruning.config import check_unknown_keys

    for ov in ("experiment=smoke", "+experiment=smoke"):
        assert "-cd sweeps -cn smoke" in check_unknown_keys([ov], {})
    assert "-cd sweeps" not in check_unknown_keys(["experiment=nosuch"], {})


def test_config_names_and_values_hydra_cannot_parse_get_one_line(tmp_path):
    from pruning.config import check_config_name, check_quoted_values

    assert "did you mean smoke?" in check_config_name({"-cd": str(ROOT / "sweeps"), "-cn": "smok"})
    assert "add -cd sweeps" in check_config_name({"-cn": "smoke"})
    assert check_config_name({"-cd": str(ROOT / "sweeps"), "-cn": "smoke"}) is None
    assert check_config_name({"-cn": "config"}) is None and check_config_name({}) is None
    msg = check_quoted_values(["model.checkpoint=/runs/sparsity=0.5/seed=0/model.pt"])
    assert msg and "\"model.checkpoint='/runs/sparsity=0.5/seed=0/model.pt'\"" in msg
    assert check_quoted_values(["model.checkpoint='/runs/seed=0/model.pt'", "seed=range(3)", "sparsity=0.5"]) is None


# --------------------------------------------------------------- the whole config, before any data

@pytest.fixture
def no_data(monkeypatch):
    """Loading data or training the dense model is a test failure: errors must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("data was loaded before the config was validated")

    import pruning.dense

    monkeypatch.setattr(pruning.dense, "build_dataset", forbidden)


@pytest.mark.parametrize(("overrides", "key", "words"), [
    (["method=swap", "+method.epsilonn=0.1"], "method.epsilonn", ["did you mean method.epsilon"]),
    (["method=lr", "method.lam=-1"], "method.lam", [">= 0"]),
    (["+method_args.swap.epsilonn=0.1"], "method_args.swap.epsilonn", ["method.epsilon"]),
    (["+method_args.nosuch.x=1"], "method_args.nosuch", ["magnitude"]),
    (["noise=gradient", "noise.kappa=-1"], "noise.kappa", []),
    (["noise=gradient", "+noise.kapa=1"], "noise.kapa", []),
    (["+spars=0.5"], "spars", ["did you mean sparsity"]),
    (["+calibration.chunk=3"], "calibration.chunk", ["calibration.chunk_size"]),
    (["sparsity=nan"], "sparsity", ["[0, 1)"]),
    (["threads=0"], "threads", ["positive integer"]),
    (["finetune=short", "+finetune.lrate=0.1"], "finetune.lrate", ["momentum"]),
    (["model.train.optimizer=rmsprop"], "model.train.optimizer", ["sgd, adam"]),
    (["deterministic=maybe"], "deterministic", ["true, false"]),
], ids=["method-typo", "method-range", "method-args-typo", "method-args-name", "noise-range", "noise-typo",
        "top-level", "calibration-typo", "sparsity-nan", "threads", "finetune-typo", "dense-recipe", "bool"])
def test_whole_config_is_validated_before_any_data(make_cfg, tmp_path, no_data, overrides, key, words):
    with pytest.raises(ConfigError) as err:
        run(make_cfg(*overrides), tmp_path / "run")
    msg = str(err.value)
    assert msg.startswith(key) and "\n" not in msg, msg
    for word in words:
        assert word in msg, msg
    rec = json.loads((tmp_path / "run" / "result.json").read_text())
    assert rec["status"] == "failed" and rec["error"] == msg and rec["error_type"] == "config"


def test_validate_and_precheck_accept_every_study_config():
    from test_sweeps import STUDIES, SWEEPS_DIR, compose_study

    from pruning.config import check_unknown_keys, validate

    for name in STUDIES:
        cfg = compose_study(name)
        with open_dict(cfg):
            del cfg["hydra"]
        validate(cfg)
        flags = {"-cd": str(SWEEPS_DIR), "-cn": name}
        assert check_unknown_keys(["sparsity=0.5", "calibration.num_samples=8"], flags) is None
        assert "did you mean sparsity" in check_unknown_keys(["sparsityy=0.5"], flags)


# ------------------------------------------------------------------------------ NaN / inf inputs

@pytest.fixture
def dense_checkpoint(make_cfg, tmp_path):
    """save(bad) -> path of a digits-MLP state dict with `bad` written into one weight."""
    from pruning.data import build_dataset
    from pruning.models import build_model

    cfg = make_cfg()
    model = build_model(cfg.model, build_dataset(cfg.dataset, cfg.paths.data_dir))

    def save(bad: float):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        name = next(k for k in state if k.endswith("weight"))
        state[name].view(-1)[3] = bad
        path = tmp_path / f"dense-{bad}.pt"
        torch.save(state, path)
        return path

    return save


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_checkpoint_weights_fail_before_pruning(make_cfg, tmp_path, dense_checkpoint, monkeypatch, bad):
    from pruning.methods import magnitude

    path = dense_checkpoint(bad)
    monkeypatch.setattr(magnitude, "prune", lambda *a: (_ for _ in ()).throw(AssertionError("pruned")))
    with pytest.raises(ConfigError) as err:
        run(make_cfg(f"model.checkpoint={path}"), tmp_path / "run")
    msg = str(err.value)
    assert msg.startswith("model.checkpoint") and str(path) in msg and "1 NaN/inf" in msg, msg
    rec = json.loads((tmp_path / "run" / "result.json").read_text())
    assert rec["status"] == "failed" and rec["error"] == msg


def test_nonfinite_gradients_fail_before_solving(make_cfg, tmp_path, monkeypatch):
    from pruning.methods import woodfisher

    real = calibrate_mod.apply_row_noise

    def poisoned(G, noise, gen):  # row noise that puts NaN/inf into G (not counted by the writer)
        G = real(G, noise, gen)
        data = [d.clone() for d in G.data]
        data[0][1, 2] = math.nan
        data[-1][0, 0] = math.inf
        return dataclasses.replace(G, data=data, nonfinite=None)

    monkeypatch.setattr(calibrate_mod, "apply_row_noise", poisoned)
    monkeypatch.setattr(woodfisher, "prune", lambda *a: (_ for _ in ()).throw(AssertionError("solved")))
    with pytest.raises(ConfigError) as err:
        run(make_cfg("method=woodfisher", "calibration.cache=false"), tmp_path / "run")
    msg = str(err.value)
    assert msg.startswith("calibration=") and "G of stage 1" in msg and "2 NaN/inf" in msg, msg
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "failed"


# --------------------------------------------------------------------------- achieved sparsity

def test_run_missing_its_target_sparsity_is_failed(make_cfg, tmp_path, monkeypatch):
    from pruning.errors import RunCheckError
    from pruning.methods import magnitude
    from pruning.methods.base import PruneResult

    def keeps_everything(problem, sparsity, cfg):
        return PruneResult(w=problem.w.clone(), mask=torch.ones_like(problem.mask))

    monkeypatch.setattr(magnitude, "prune", keeps_everything)
    with pytest.raises(RunCheckError) as err:
        run(make_cfg("sparsity=0.9"), tmp_path / "run")
    assert "misses the target sparsity=0.9" in str(err.value)
    rec = json.loads((tmp_path / "run" / "result.json").read_text())
    assert rec["status"] == "failed" and "misses the target" in rec["error"]
    assert rec["metrics"]["sparsity_prunable"] == 0.0  # recorded, then failed
    assert not (tmp_path / "run" / "error.txt").exists()


def test_layerwise_rounding_is_within_tolerance(make_cfg, tmp_path):
    rec = run(make_cfg("method.scope=layerwise", "sparsity=0.333"), tmp_path / "run")
    assert rec["status"] == "completed"
    assert rec["metrics"]["sparsity_prunable"] >= 0.333 - 3 / rec["metrics"]["numel_prunable"]


@pytest.mark.parametrize(("method", "raises"), [("magnitude", True), ("grda", False), ("sdprun", False),
                                                ("gfs", False)])
def test_train_time_methods_are_exempt_from_the_sparsity_check(make_cfg, tmp_path, method, raises):
    from pruning.errors import RunCheckError
    from pruning.evaluation import check_sparsity

    stats = {"sparsity_prunable": 0.5, "numel_prunable": 20, "nnz_prunable": 10}
    check_sparsity(method, 0.5 + 2 / 20, stats, num_tensors=2)  # within one weight per tensor
    if raises:
        with pytest.raises(RunCheckError):
            check_sparsity(method, 0.9, stats, num_tensors=2)
        # a rule the method declared (cbs rmp_rounding=reference) turns the miss into a warning
        miss = check_sparsity(method, 0.9, stats, num_tensors=2, rule="rmp_rounding=reference")
        assert "0.500000 misses the target sparsity=0.9" in miss and "rmp_rounding=reference" in miss
    else:
        assert check_sparsity(method, 0.9, stats, num_tensors=2) is None


def test_main_reports_a_failed_check_in_one_line(tmp_path):
    """Through launch.py: a sparsity miss is one line with exit 1 (not a bad input: exit 2)."""
    code = ("import runpy, sys\n"
            "from pruning.methods import magnitude\n"
            "from pruning.methods.base import PruneResult\n"
            "magnitude.prune = lambda p, s, c: PruneResult(w=p.w.clone(), mask=p.mask.clone())\n"
            f"sys.argv = ['launch.py', 'progress=false', 'model.train.epochs=1']\n"
            f"runpy.run_path({str(task_mod.Path(__file__).resolve().parents[1] / 'launch.py')!r}, "
            "run_name='__main__')\n")
    import os
    import sys

    root = str(task_mod.Path(__file__).resolve().parents[1])  # this checkout's package, as launch.py gets
    env = {**os.environ, "PRUNING_OUT_DIR": str(tmp_path / "out"), "PRUNING_DATA_DIR": str(tmp_path / "data"),
           "PYTHONPATH": root}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and "misses the target sparsity=0.9" in lines[0], proc.stderr


# ------------------------------------------------------------------------------- determinism

def test_threads_enter_the_identity_only_when_deterministic():
    from pruning.config import cell_id, effective_threads

    base = {"sparsity": 0.9, "seed": 0, "device": "cpu", "model": {"name": "mlp"}}
    ident = lambda **kw: cell_id({**base, **kw}, {"name": "magnitude"})  # noqa: E731
    assert ident(threads=4) == ident(threads=None) == ident(deterministic=False, threads=2)
    assert ident(deterministic=True) == ident(deterministic=True, threads=1)
    assert ident(deterministic=True, threads=2) != ident(deterministic=True)
    assert ident(seed=1) != ident()
    assert effective_threads({"deterministic": True, "threads": None}) == 1
    assert effective_threads({"deterministic": False, "threads": None}) is None
    from pruning.config import result_overrides

    assert result_overrides(["threads=4", "sparsity=0.5"]) == ["sparsity=0.5"]
    assert result_overrides(["threads=4", "deterministic=true"]) == ["threads=4"]


def test_cell_id_ignores_where_and_how_a_run_is_launched(make_cfg):
    from omegaconf import OmegaConf

    from pruning.config import cell_id
    from pruning.task import method_params

    def ident(*overrides):
        cfg = make_cfg(*overrides)
        return cell_id(OmegaConf.to_container(cfg, resolve=True), method_params(cfg))

    base = ident()
    assert ident("cluster=submitit_local", "resources=gpu1", "logger=wandb", "sweep_name=other", "resume=false",
                 "calibration.chunk_size=7", "+method_args.swap.epsilon=0.5") == base
    assert ident("+method_args.magnitude.scope=layerwise") == ident("method.scope=layerwise") != base
    assert ident("calibration.num_samples=8") != base and ident("seed=1") != base


def test_deterministic_run_does_not_depend_on_the_process_thread_count(make_cfg, tmp_path):
    """Started with 2 intra-op threads (a Slurm node, OMP_NUM_THREADS=cpus) or with 1 (a laptop):
    deterministic=true gives bit-identical records. The prunable count (> 32768) and fine-tuning
    make torch split reductions over threads, which differ in the 8th digit when not pinned."""
    overrides = ("deterministic=true", "model.hidden=[256,128]", "model.train.epochs=2", "finetune=short")
    before = torch.get_num_threads()
    out = {}
    try:
        for threads in (1, 2):  # (this order shows the difference when not pinned)
            torch.set_num_threads(threads)
            out[threads] = run(make_cfg(*overrides), tmp_path / f"threads{threads}")
            assert torch.get_num_threads() == threads  # restored after the run
    finally:
        torch.set_num_threads(before)
    assert out[1]["metrics"] == out[2]["metrics"]
    assert out[1]["cell_id"] == out[2]["cell_id"]
    assert out[1]["env"]["torch_threads"] == out[2]["env"]["torch_threads"] == 1


def test_threads_key_sets_the_thread_count(make_cfg, tmp_path):
    before = torch.get_num_threads()
    rec = run(make_cfg("threads=2", "deterministic=true", "model.train.epochs=2"), tmp_path / "run")
    assert rec["env"]["torch_threads"] == 2 and torch.get_num_threads() == before
    with open_dict(cfg := make_cfg("deterministic=true", "model.train.epochs=2")):
        cfg.threads = None
    assert run(cfg, tmp_path / "run1")["cell_id"] != rec["cell_id"]
