"""Every method under every noise model through the same composed config (issue 5), at tiny size,
and paired draws: one seed gives the same noise to every method."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import CONF_DIR

import pruning.noise.analog as analog_mod
from pruning import methods
from pruning.noise import build
from pruning.task import Job, run

METHOD_YAMLS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
METHODS = sorted(set(methods.available()) | set(METHOD_YAMLS))
# `none` is every method's default cell, run by the method's own tests
NOISES = sorted(p.stem for p in (CONF_DIR / "noise").glob("*.yaml") if p.stem != "none")

# Tiny settings: applied to a method only when its config has the key.
TINY_METHOD = {"epochs": 0.05, "layer_finetune_epochs": 0.0, "final_finetune_epochs": 0.0, "num_evaluate": 4,
               "eval_size": 64, "max_iter": 3, "init_trials": 1, "stages": 2, "iters": 3, "max_iters": 3}
TINY_NOISE = {
    "none": [],
    "gradient": ["noise.kappa=2", "noise.fraction=0.25"],
    "analog": ["noise.n_draws=2", "noise.t_inference=[0,3600]"],
    "adversarial": ["noise.steps=2", "noise.eval_eps=[0,0.0313725]", "noise.fraction=0.25"],
}
EXPECTED_KEYS = {
    "none": [],
    "gradient": [],
    "analog": ["analog/acc_mean@t=0", "analog/acc_std@t=3600", "analog/weight_rel_err@t=3600"],
    "adversarial": ["robust_acc@eps=0", "robust_acc@eps=0.0313725", "robust_loss@eps=0.0313725"],
}


def _method_overrides(method: str) -> list[str]:
    keys = {f.name for f in dataclasses.fields(methods.spec(method).config.load())}
    return [f"method.{k}={v}" for k, v in TINY_METHOD.items() if k in keys]


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_under_every_noise(make_cfg, tmp_path, method, noise):
    if method not in methods.available():
        pytest.skip(f"conf/method/{method}.yaml exists but pruning/methods/{method}.py not yet")
    if method not in METHOD_YAMLS:
        pytest.skip(f"pruning/methods/{method}.py exists but conf/method/{method}.yaml not yet")
    cfg = make_cfg(f"method={method}", f"noise={noise}", "calibration.num_samples=16", "sparsity=0.5",
                   *_method_overrides(method), *TINY_NOISE.get(noise, []))
    data = run(cfg, tmp_path / "run")
    rec = json.loads((tmp_path / "run" / "result.json").read_text())
    assert rec["status"] == "completed" == data["status"]
    assert rec["index"]["noise"] == noise == rec["noise"]["kind"]
    assert rec["index"]["noise_level"] == build(cfg.noise).level
    m = rec["metrics"]
    for key in EXPECTED_KEYS.get(noise, []):
        assert key in m, (key, sorted(m))
        assert m[key] is not None and math.isfinite(m[key])
    if noise == "gradient":
        assert rec["noise"]["snr_db"] == pytest.approx(-10 * math.log10(0.25 * 4))
        if methods.needs_gradients(method):
            # per-sample gradients of a trained net: the noise power is ~ kappa^2 p of the signal
            assert 0.5 < m["gradient/nsr_measured"] < 1.5, m["gradient/nsr_measured"]
    assert all(not isinstance(v, (dict, list)) for v in m.values())  # flat metrics


def _two_methods() -> tuple[list[str], list[str]]:
    """Two differently configured weight-space methods (different masks at the same sparsity)."""
    weight_space = [m for m in methods.available() if methods.kind(m) != "train" and m in METHOD_YAMLS]
    if len(weight_space) >= 2:
        return [f"method={weight_space[0]}"], [f"method={weight_space[1]}"]
    return ["method=magnitude", "method.scope=global"], ["method=magnitude", "method.scope=layerwise"]


@pytest.mark.parametrize("noise", ["gradient", "analog", "adversarial"])
def test_same_seed_gives_every_method_the_same_calibration_noise(make_cfg, tmp_path, noise):
    """G of stage 1 (computed at the dense weights) under the same seed and noise is identical for
    two methods, and differs from the clean G; without the cache, so both draw for themselves."""
    a, b = _two_methods()
    common = ["calibration.num_samples=16", "calibration.cache=false"]
    noisy = [f"noise={noise}", *TINY_NOISE[noise]]

    def G(*overrides: str) -> torch.Tensor:
        job = Job(make_cfg(*common, *overrides, "seed=3"), tmp_path / "job")
        job.state.noise = build(job.cfg.noise)
        job.setup()
        return job.gradient_matrix(1).dense()

    ga, gb = G(*a, *noisy), G(*b, *noisy)
    clean = G(*a, "noise=none")
    assert torch.equal(ga, gb)
    assert not torch.equal(ga, clean)
    if noise == "gradient":
        touched = (ga != clean).sum(dim=1)
        assert (touched == math.floor(0.25 * clean.shape[1])).all()


def test_same_seed_gives_every_method_the_same_analog_eval_draws(make_cfg, tmp_path, monkeypatch):
    """End to end: the standard normals behind the analog evaluation are the same for two methods
    with different masks and weights (draws depend on shapes only, never on the mask)."""
    a, b = _two_methods()
    draws: list[torch.Tensor] = []
    real = analog_mod.draw_normal

    def recording(shape, gen, like):
        out = real(shape, gen, like)
        draws.append(out.detach().clone())
        return out

    monkeypatch.setattr(analog_mod, "draw_normal", recording)
    results = []
    for i, ov in enumerate((a, b)):
        draws.clear()
        cfg = make_cfg(*ov, "noise=analog", "noise.apply_to=[eval]", "noise.n_draws=2",
                       "noise.t_inference=[3600]", "sparsity=0.7", "seed=5")
        rec = run(cfg, tmp_path / f"run{i}")
        results.append((list(draws), rec["metrics"]))
    (da, ma), (db, mb) = results
    assert len(da) == len(db) > 0 and all(torch.equal(x, y) for x, y in zip(da, db))
    assert ma["nnz_prunable"] == mb["nnz_prunable"]


@pytest.mark.parametrize("noise", NOISES)
def test_the_registry_names_the_config_key_that_is_the_level(make_cfg, noise):
    """The report plots noise_level against the registry's `level` key and keeps the others apart."""
    from pruning.registry import NOISE

    key = NOISE[noise].level
    assert key is not None
    cfg = make_cfg(f"noise={noise}", f"noise.{key}=0.123")
    assert build(cfg.noise).level == pytest.approx(0.123)



@pytest.mark.parametrize(("overrides", "idle"), [
    (["noise=gradient"], True),                                  # magnitude computes no G
    (["noise=gradient", "method=woodfisher"], False),
    (["noise=gradient", "finetune=short", "+finetune.noise_hooks=true"], False),  # fine-tuning under the hooks
    (["noise=adversarial"], False),                              # robust accuracy at evaluation
    (["noise=adversarial", "noise.apply_to=[calibration]"], True),
    (["noise=analog", "noise.apply_to=[]", "method=woodfisher"], True),
    (["noise=none"], False),
])
def test_a_noise_model_with_nothing_to_act_on_is_named(make_cfg, overrides, idle):
    """A noisy label on a noise-free result is a trap in a comparison table: the run says so."""
    from pruning.task import idle_noise

    cfg = make_cfg(*overrides)
    msg = idle_noise(cfg, build(cfg.noise))
    assert (msg is not None) == idle, msg
    if idle:
        assert f"noise={cfg.noise.kind} has nothing to act on" in msg and "noise-free" in msg


def test_the_warning_lands_in_the_record_once(make_cfg, tmp_path):
    rec = run(make_cfg("noise=gradient"), tmp_path / "run")
    assert len([w for w in rec.get("warnings", []) if "nothing to act on" in w]) == 1 and rec["status"] == "completed"
    assert "gradient/nsr_measured" not in rec["metrics"]
