"""Adversarial inputs (issue 5): FGSM/PGD stay inside the eps-ball and the valid range, raise the
loss of the trained digits MLP, use their own generator, restore the model's mode; the hooks and
a run end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from pruning.errors import ConfigError
from pruning.noise import build
from pruning.noise.adversarial import attack
from pruning.task import Job, run

CASES = [("fgsm", "linf", 8 / 255), ("pgd", "linf", 8 / 255), ("fgsm", "l2", 0.5), ("pgd", "l2", 0.5)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def trained(make_cfg, tmp_path):
    """(model, x, y): the trained digits MLP (session-cached) and 256 test examples."""
    job = Job(make_cfg(), tmp_path / "job")
    job.state.noise = build({"kind": "none"})
    job.setup()
    xs, ys = zip(*[job.state.data.test[i] for i in range(256)])
    return job.state.model, torch.stack(xs), torch.stack(ys)


def _loss(model, x, y) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


@pytest.mark.parametrize(("method", "norm", "eps"), CASES, ids=[f"{m}-{n}" for m, n, _ in CASES])
def test_attack_stays_in_ball_and_range_and_raises_loss(trained, method, norm, eps):
    model, x, y = trained
    model.train()  # the attack must switch to eval and restore this
    model.zero_grad(set_to_none=True)
    x_adv = attack(model, x, y, method=method, norm=norm, eps=eps, steps=10, gen=_gen(0))
    assert model.training and all(p.grad is None for p in model.parameters())
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        assert float(delta.abs().max()) <= eps + 1e-6
        assert float(delta.abs().max()) >= 0.5 * eps  # it did move
    else:
        assert float(delta.norm(dim=1).max()) <= eps + 1e-5
        assert float(delta.norm(dim=1).mean()) >= 0.5 * eps
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    model.eval()
    clean, adv = _loss(model, x, y), _loss(model, x_adv, y)
    assert adv > clean * 1.5, (clean, adv)
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == y).float().mean() < (model(x).argmax(1) == y).float().mean()


def test_pgd_is_at_least_as_strong_as_fgsm(trained):
    model, x, y = trained
    fgsm = attack(model, x, y, method="fgsm", eps=8 / 255)
    pgd = attack(model, x, y, method="pgd", eps=8 / 255, steps=10, gen=_gen(1))
    assert _loss(model, pgd, y) >= _loss(model, fgsm, y) * 0.95


def test_custom_bounds_and_zero_eps(trained):
    model, x, y = trained
    x = x.clamp(0.1, 0.6)
    x_adv = attack(model, x, y, method="pgd", eps=0.2, steps=3, bounds=(0.1, 0.6), gen=_gen(2))
    assert x_adv.min() >= torch.tensor(0.1) and x_adv.max() <= torch.tensor(0.6)  # float32 bounds
    assert float((x_adv - x).abs().max()) <= 0.2 + 1e-6
    assert torch.equal(attack(model, x, y, eps=0.0, gen=_gen(2)), x)


def test_random_start_uses_the_passed_generator_only(trained):
    model, x, y = trained
    state = torch.random.get_rng_state()
    a = attack(model, x, y, method="pgd", eps=8 / 255, steps=2, gen=_gen(3))
    b = attack(model, x, y, method="pgd", eps=8 / 255, steps=2, gen=_gen(3))
    c = attack(model, x, y, method="pgd", eps=8 / 255, steps=2, gen=_gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(ValueError):
        attack(model, x, y, method="pgd", eps=8 / 255, gen=None)


def test_calibration_inputs_replace_a_fraction(trained):
    model, x, y = trained
    noise = build({"kind": "adversarial", "fraction": 0.25, "steps": 3, "eps": "8/255"})
    assert noise.level == pytest.approx(8 / 255)
    out = noise.calibration_inputs(model, x, y, _gen(5))
    changed = (out != x).flatten(1).any(dim=1)
    assert int(changed.sum()) == 64  # floor(0.25 * 256)
    assert float((out - x).abs().max()) <= 8 / 255 + 1e-6
    again = noise.calibration_inputs(model, x, y, _gen(5))
    assert torch.equal(out, again)
    off = build({"kind": "adversarial", "apply_to": ["eval"]})
    assert off.calibration_inputs(model, x, y, _gen(5)) is x


def test_run_end_to_end_robust_accuracy(make_cfg, tmp_path):
    cfg = make_cfg("noise=adversarial", "noise.steps=3", "noise.eval_eps=[0,0.0313725]", "noise.fraction=0.5",
                   "sparsity=0.5")
    run(cfg, tmp_path / "run")
    rec = json.loads((tmp_path / "run" / "result.json").read_text())
    assert rec["status"] == "completed"
    assert rec["index"]["noise"] == "adversarial" and rec["index"]["noise_level"] == pytest.approx(8 / 255)
    assert rec["noise"]["attack"] == "pgd" and rec["noise"]["steps"] == 3
    assert rec["noise"]["alpha"] == pytest.approx(2.5 * 8 / 255 / 3)
    m = rec["metrics"]
    assert m["robust_acc@eps=0"] == pytest.approx(m["final_acc"])
    assert m["robust_acc@eps=0.0313725"] < m["final_acc"]
    assert m["robust_loss@eps=0.0313725"] > m["robust_loss@eps=0"]


@pytest.mark.parametrize(("override", "key"), [
    ({"attack": "cw"}, "noise.attack"),
    ({"norm": "l1"}, "noise.norm"),
    ({"eps": -0.1}, "noise.eps"),
    ({"eps": "8/0"}, "noise.eps"),
    ({"steps": 0}, "noise.steps"),
    ({"fraction": 2}, "noise.fraction"),
    ({"apply_to": "train"}, "noise.apply_to"),
    ({"eval_eps": []}, "noise.eval_eps"),
    ({"epsilon": 0.1}, "noise.epsilon"),
])
def test_config_errors_name_key_and_allowed(override, key):
    with pytest.raises(ConfigError) as err:
        build({"kind": "adversarial", **override})
    assert err.value.key == key and "allowed" in str(err.value)
