"""Analog (PCM) weight noise (issue 5): the maths against the formulas of Nandakumar et al. 2019 /
aihwkit PCMLikeNoiseModel (ecosystem.md 5.1), statistical tests on many devices, respect_mask,
drift compensation, the hooks and a run end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pruning.errors import ConfigError
from pruning.layout import get_flat, set_flat
from pruning.noise import build
from pruning.noise.analog import (
    PCM,
    PCMArray,
    PCMParams,
    conductances_to_weights,
    drift_factor,
    drift_nu_moments,
    program_devices,
    programming_noise_std,
    read_devices,
    read_noise_q,
    read_noise_std,
    weights_to_conductances,
)
from pruning.task import Job, run

N_DEV = 200_000  # devices per statistical check: relative error of a std ~ 1/sqrt(2n) = 0.16 %


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _full(g_hat: float) -> torch.Tensor:
    return torch.full((N_DEV,), g_hat * PCM.g_max, dtype=torch.float64)


def _folded_normal_moments(mu: float, sigma: float) -> tuple[float, float]:
    """Mean and std of |X|, X ~ N(mu, sigma^2)."""
    phi = math.exp(-mu ** 2 / (2 * sigma ** 2))
    mean = sigma * math.sqrt(2 / math.pi) * phi + mu * math.erf(mu / (sigma * math.sqrt(2)))
    return mean, math.sqrt(mu ** 2 + sigma ** 2 - mean ** 2)


def test_formula_values_by_hand():
    g = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=torch.float64) * 25.0
    # sigma_prog = c0 + c1 g^ + c2 g^^2 at g_max = 25 uS
    expected = [0.26348, 0.26348 + 0.19650 - 0.011731, 0.26348 + 0.98250 - 0.293275, 0.26348 + 1.9650 - 1.1731]
    assert programming_noise_std(g).tolist() == pytest.approx(expected, rel=1e-12)
    # in weight units: ~1.05 % of max|W| at g^ = 0, ~4.2 % at g^ = 1 (ecosystem.md 5.1)
    assert float(programming_noise_std(g)[0]) / 25 == pytest.approx(0.0105, abs=1e-4)
    assert float(programming_noise_std(g)[-1]) / 25 == pytest.approx(0.0422, abs=1e-4)
    # g_max only rescales: sigma_prog(g_max = 50) at the same g^ is twice as large
    assert float(programming_noise_std(torch.tensor(50.0), PCMParams(g_max=50.0))) == pytest.approx(2 * 1.05538)
    # coefficients fitted at the device's own g_max are used as given (aihwkit: prog_coeff_g_max_reference)
    own = PCMParams(g_max=50.0, prog_coeff=(0.5, 1.0, 0.0), prog_coeff_g_max=50.0)
    assert float(programming_noise_std(torch.tensor(25.0), own)) == pytest.approx(0.5 + 1.0 * 0.5)
    mu, sig = drift_nu_moments(torch.tensor([1.0, 0.1, 0.01, 1e-3], dtype=torch.float64) * 25.0)
    assert mu.tolist() == pytest.approx([0.049, -0.0155 * math.log(0.1) + 0.0244, -0.0155 * math.log(0.01) + 0.0244,
                                         0.1], rel=1e-12)
    assert sig.tolist() == pytest.approx([0.008, -0.0125 * math.log(0.1) - 0.0059, 0.045, 0.045], rel=1e-12)
    assert float(drift_factor(3600.0, 0.05)) == pytest.approx((3620 / 20) ** -0.05, rel=1e-12)
    assert float(drift_factor(0.0, 0.05)) == 1.0
    q = read_noise_q(torch.tensor([1.0, 0.2, 1e-4, 1e-6], dtype=torch.float64) * 25.0)
    assert q.tolist() == pytest.approx([0.0088, 0.0088 / 0.2 ** 0.65, 0.2, 0.2], rel=1e-12)
    g_prog = torch.tensor([12.5], dtype=torch.float64)
    s = read_noise_std(g_prog, g_prog * 0.8, 3600.0)
    t = 3600.0 + 20.0
    assert float(s) == pytest.approx(10.0 * 0.0088 / 0.5 ** 0.65 * math.sqrt(math.log((t + 2.5e-7) / 5e-7)))


@pytest.mark.parametrize("g_hat", [0.1, 0.3, 0.6, 1.0])
def test_programming_noise_std_statistically(g_hat):
    g_t = _full(g_hat)
    g_prog, _ = program_devices(g_t, _gen(1))
    dev = g_prog - g_t
    sigma = float(programming_noise_std(g_t[:1]))
    assert abs(float(dev.std()) / sigma - 1) < 5 / math.sqrt(2 * N_DEV)
    assert abs(float(dev.mean())) < 5 * sigma / math.sqrt(N_DEV)
    g_prog2, _ = program_devices(g_t, _gen(1), prog_noise_scale=2.0)
    assert abs(float((g_prog2 - g_t).std()) / (2 * sigma) - 1) < 5 / math.sqrt(2 * N_DEV)


def test_programming_noise_at_zero_is_clipped_half_normal():
    g_prog, _ = program_devices(torch.zeros(N_DEV, dtype=torch.float64), _gen(2))
    sigma = 0.26348
    assert (g_prog >= 0).all()
    assert abs(float((g_prog > 0).double().mean()) - 0.5) < 5 * 0.5 / math.sqrt(N_DEV)
    assert float(g_prog.mean()) == pytest.approx(sigma / math.sqrt(2 * math.pi), rel=0.01)


@pytest.mark.parametrize("g_hat", [1.0, 0.1, 0.01])
@pytest.mark.parametrize("t", [1.0, 3600.0, 86400.0 * 365])
def test_drift_factor_statistically(g_hat, t):
    """No programming or read noise: g(t) / g_T = ((t + t0) / t0)^-nu with nu = |N(mu_nu, sigma_nu)|."""
    g_t = _full(g_hat)
    g_prog, nu = program_devices(g_t, _gen(3), prog_noise_scale=0.0)
    g = read_devices(g_prog, nu, t, _gen(4), read_noise_scale=0.0)
    nu_hat = -torch.log(g / g_t) / math.log((t + 20.0) / 20.0)
    mu, sigma = (float(v[0]) for v in drift_nu_moments(g_t[:1]))
    mean, std = _folded_normal_moments(mu, sigma)
    assert abs(float(nu_hat.mean()) - mean) < 5 * std / math.sqrt(N_DEV)
    assert abs(float(nu_hat.std()) / std - 1) < 0.02
    # the mean drift factor equals E[((t + t0)/t0)^-nu] over the same nu
    assert float((g / g_t).mean()) == pytest.approx(float(drift_factor(t, nu).mean()), rel=1e-9)
    g_scaled = read_devices(g_prog, program_devices(g_t, _gen(3), prog_noise_scale=0.0, drift_scale=2.0)[1], t,
                            _gen(4), read_noise_scale=0.0)
    assert torch.allclose(g_scaled / g_t, (g / g_t) ** 2, rtol=1e-9)  # drift_scale multiplies nu


@pytest.mark.parametrize("g_hat", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("t", [0.0, 3600.0, 86400.0])
def test_read_noise_std_statistically(g_hat, t):
    """No programming noise, no drift: g(t) - g_T ~ N(0, (g_T Q_s sqrt(ln((t + t0 + t_read)/(2 t_read))))^2)."""
    g_t = _full(g_hat)
    g_prog, nu = program_devices(g_t, _gen(5), prog_noise_scale=0.0, drift_scale=0.0)
    g = read_devices(g_prog, nu, t, _gen(6))
    q = 0.0088 / g_hat ** 0.65
    expected = g_hat * 25.0 * q * math.sqrt(math.log((t + 20.0 + 2.5e-7) / 5e-7))
    assert abs(float((g - g_t).std()) / expected - 1) < 5 / math.sqrt(2 * N_DEV)
    assert abs(float((g - g_t).mean())) < 5 * expected / math.sqrt(N_DEV)


def test_mapping_round_trip_and_gmin():
    w = torch.tensor([[-0.5, 0.0, 0.25], [1.0, -1.0, 0.1]], dtype=torch.float64)
    gp, gm, s = weights_to_conductances(w)
    assert float(s) == 25.0 and float(gp.max()) == 25.0 and float(gm.max()) == 25.0
    assert ((gp == 0) | (gm == 0)).all()
    assert torch.allclose(conductances_to_weights(gp, gm, s), w)
    pcm = PCMParams(g_min=2.0)
    gp, gm, s = weights_to_conductances(w, pcm)
    assert float(s) == 23.0 and float(gm.min()) == 2.0
    assert torch.allclose(conductances_to_weights(gp, gm, s), w)


def _weights(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(256, 256, generator=_gen(seed)) * 0.1
    mask = w.abs() > 0.1  # ~32 % kept
    return w * mask, mask


def test_respect_mask_keeps_zeros_and_false_lets_them_move():
    w, mask = _weights()
    kept = PCMArray([w], _gen(7), masks=[mask]).read(3600.0, _gen(8))[0]
    assert (kept[~mask] == 0).all() and (kept[mask] != 0).float().mean() > 0.99
    moved = PCMArray([w], _gen(7)).read(3600.0, _gen(8))[0]
    frac = float((moved[~mask] != 0).float().mean())
    assert 0.6 < frac < 0.85, frac  # each device of a pair is > 0 half the time: ~75 % (aihwkit: ~70 %)


def test_global_drift_compensation_restores_mean_abs():
    w, mask = _weights(1)
    arr = PCMArray([w, w[:10]], _gen(9), masks=[mask, mask[:10]], compensation="global")
    prog = arr.programmed()
    for t in (1.0, 86400.0, 3.15e7):
        for a, b in zip(arr.read(t, _gen(10)), prog):
            assert float(a.abs().mean()) == pytest.approx(float(b.abs().mean()), rel=1e-5)
    raw = PCMArray([w], _gen(9), masks=[mask], compensation="none").read(3.15e7, _gen(10))[0]
    assert float(raw.abs().mean()) < 0.8 * float(prog[0].abs().mean())  # drift shrinks weights


def test_matches_measured_aihwkit_table():
    """ecosystem.md 5.1 [MEASURED] with aihwkit 1.1.0: W ~ N(0, 0.1^2), 256 x 256, 5 draws, no
    compensation; relative error ||W~ - W|| / ||W|| and gain <W~, W> / ||W||^2."""
    w = torch.randn(256, 256, generator=_gen(0)) * 0.1
    table = {1.0: (0.14, 1.00), 3600.0: (0.26, 0.78), 86400.0: (0.36, 0.66), 3.15e7: (0.51, 0.50)}
    g = _gen(11)
    for t, (err, gain) in table.items():
        errs, gains = [], []
        for _ in range(5):
            wt = PCMArray([w], g, compensation="none").read(t, g)[0]
            errs.append(float((wt - w).norm() / w.norm()))
            gains.append(float((wt * w).sum() / w.pow(2).sum()))
        assert sum(errs) / 5 == pytest.approx(err, abs=0.015), t
        assert sum(gains) / 5 == pytest.approx(gain, abs=0.025), t


def test_paired_draws_and_global_rng_untouched():
    w, mask = _weights(2)
    state = torch.random.get_rng_state()
    a = PCMArray([w], _gen(12), masks=[mask]).read(3600.0, _gen(13))[0]
    b = PCMArray([w], _gen(12), masks=[mask]).read(3600.0, _gen(13))[0]
    assert torch.equal(a, b) and torch.equal(torch.random.get_rng_state(), state)
    # the number of draws does not depend on the mask: after programming two different masks,
    # the generator is in the same state
    g1, g2 = _gen(14), _gen(14)
    PCMArray([w], g1, masks=[mask])
    PCMArray([w], g2, masks=[torch.ones_like(mask)])
    assert torch.equal(g1.get_state(), g2.get_state())


def _job(make_cfg, tmp_path, *overrides):
    job = Job(make_cfg(*overrides), tmp_path / "job")
    job.state.noise = build(job.cfg.noise)
    job.setup()
    return job


def test_calibration_weights_perturbs_inside_and_restores(make_cfg, tmp_path):
    job = _job(make_cfg, tmp_path, "noise=analog")
    w0 = get_flat(job.state.model, job.state.layout)
    mask = torch.rand(w0.shape, generator=_gen(0)) > 0.5
    with job.state.noise.calibration_weights(job.state.model, job.state.layout, mask, _gen(15)):
        inside = get_flat(job.state.model, job.state.layout)
    assert torch.equal(get_flat(job.state.model, job.state.layout), w0)
    assert (inside[~mask] == 0).all() and not torch.equal(inside[mask], w0[mask])
    rel = float((inside[mask] - w0[mask]).norm() / w0[mask].norm())
    assert 0.02 < rel < 0.3, rel
    # a weight at exactly zero counts as pruned even under an all-ones mask (gRDA's emergent sparsity)
    zeroed = w0.clone()
    zeroed[::3] = 0.0
    set_flat(job.state.model, job.state.layout, zeroed)
    with job.state.noise.calibration_weights(job.state.model, job.state.layout, torch.ones_like(mask), _gen(15)):
        inside = get_flat(job.state.model, job.state.layout)
    assert (inside[::3] == 0).all() and (inside[1::3] != 0).float().mean() > 0.95
    set_flat(job.state.model, job.state.layout, w0)
    off = build({"kind": "analog", "apply_to": ["eval"]})
    with off.calibration_weights(job.state.model, job.state.layout, mask, _gen(15)):
        assert torch.equal(get_flat(job.state.model, job.state.layout), w0)


def test_run_end_to_end_records_noise_and_flat_metrics(make_cfg, tmp_path):
    cfg = make_cfg("noise=analog", "noise.n_draws=3", "noise.t_inference=[0,3600,31536000]",
                   "noise.drift_compensation=none", "sparsity=0.5")
    data = run(cfg, tmp_path / "run")
    rec = json.loads((tmp_path / "run" / "result.json").read_text())
    assert rec["status"] == "completed" == data["status"]
    assert rec["index"]["noise"] == "analog" and rec["index"]["noise_level"] == 1.0
    assert rec["noise"]["respect_mask"] is True and rec["noise"]["pcm"]["prog_coeff"] == [0.26348, 1.965, -1.1731]
    m = rec["metrics"]
    for t in ("0", "3600", "3.1536e+07"):
        for k in ("acc_mean", "acc_std", "loss_mean", "loss_std", "weight_rel_err"):
            assert f"analog/{k}@t={t}" in m, (k, t, sorted(m))
        assert 0.0 <= m[f"analog/acc_mean@t={t}"] <= 1.0 and m[f"analog/acc_std@t={t}"] >= 0.0
    errs = [m[f"analog/weight_rel_err@t={t}"] for t in ("0", "3600", "3.1536e+07")]
    assert errs == sorted(errs) and errs[0] > 0.01  # drift without compensation grows the error
    assert m["analog/acc_mean@t=0"] > m["final_acc"] - 0.2
    assert all(not isinstance(v, dict) for v in m.values())  # flat


@pytest.mark.parametrize(("override", "key"), [
    ({"drift_compensation": "local"}, "noise.drift_compensation"),
    ({"apply_to": ["train"]}, "noise.apply_to"),
    ({"n_draws": 0}, "noise.n_draws"),
    ({"t_inference": [-1]}, "noise.t_inference[0]"),
    ({"respect_mask": "yes"}, "noise.respect_mask"),
    ({"pcm": {"g_max": -1}}, "noise.pcm.g_max"),
    ({"pcm": {"nu_mean": [1.0]}}, "noise.pcm.nu_mean"),
    ({"pcm": {"gmax": 25}}, "noise.pcm.gmax"),
    ({"t_infer": [1]}, "noise.t_infer"),
])
def test_config_errors_name_key_and_allowed(override, key):
    with pytest.raises(ConfigError) as err:
        build({"kind": "analog", **override})
    assert err.value.key == key and "allowed" in str(err.value)
