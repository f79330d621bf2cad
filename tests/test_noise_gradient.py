"""Gradient noise (issue 5): SWAP entry noise and outlier rows, checked against the formulas.

Measured noise-to-signal power vs kappa^2 p, exactly floor(p d) entries per row, noise std
kappa * std(row), paired draws from the passed generator only, record and config errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from pruning.errors import ConfigError
from pruning.noise import build
from pruning.noise.gradient import add_gradient_noise, snr_db
from pruning.task import Job


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _synthetic_G(N: int = 200, d: int = 1000, seed: int = 0) -> torch.Tensor:
    """Zero-mean rows with very different scales (per-row std matters, not a global one)."""
    g = _gen(seed)
    scales = torch.logspace(-3, 1, N, dtype=torch.float64)
    return (torch.randn(N, d, generator=g, dtype=torch.float64) * scales[:, None])


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 1.0])
def test_exactly_floor_pd_entries_per_row(p):
    G = _synthetic_G(N=30, d=997)
    noisy = add_gradient_noise(G, 2.0, p, _gen(1))
    changed = (noisy != G).sum(dim=1)
    m = math.floor(p * 997)
    assert changed.tolist() == [m] * 30
    assert not torch.equal(noisy, G) and torch.equal(G, _synthetic_G(N=30, d=997))  # input untouched


@pytest.mark.parametrize(("kappa", "p"), [(1.0, 0.1), (2.0, 0.25), (4.0, 0.5), (1.0, 1.0)])
def test_noise_to_signal_power_matches_kappa2_p(kappa, p):
    G = _synthetic_G()
    noisy = add_gradient_noise(G, kappa, p, _gen(2))
    noise = noisy - G
    nsr = float(noise.pow(2).sum() / G.pow(2).sum())
    # exact expectation given G: kappa^2 floor(pd) s_i^2 per row; ~= kappa^2 p for zero-mean rows
    m = math.floor(p * G.shape[1])
    expected = float(kappa ** 2 * m * G.var(dim=1).sum() / G.pow(2).sum())
    draws = G.shape[0] * m
    tol = 5 * math.sqrt(2.0 / draws) * 10  # rows have unequal weights: generous, still ~1-7 %
    assert abs(nsr / expected - 1) < min(tol, 0.08), (nsr, expected)
    assert abs(nsr / (kappa ** 2 * p) - 1) < 0.08, (nsr, kappa ** 2 * p)
    # per row: the touched entries carry N(0, (kappa std(g_i))^2)
    z = noise[noise != 0].view(G.shape[0], m) / (kappa * G.std(dim=1, keepdim=True))
    assert abs(float(z.mean())) < 5 / math.sqrt(z.numel())
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2.0 / z.numel())


def test_noise_power_on_real_per_sample_gradients(make_cfg, tmp_path):
    """G of the trained digits MLP: per-sample gradients are heavy-tailed and not zero-mean."""
    job = Job(make_cfg("calibration.num_samples=128", "calibration.cache=false"), tmp_path / "run")
    job.state.noise = build({"kind": "none"})
    job.setup()
    G = job.gradient_matrix(1).dense().double()
    kappa, p = 2.0, 0.25
    noisy = add_gradient_noise(G, kappa, p, _gen(3))
    m = math.floor(p * G.shape[1])
    assert ((noisy != G).sum(dim=1) == m).all()
    nsr = float((noisy - G).pow(2).sum() / G.pow(2).sum())
    expected = float(kappa ** 2 * m * G.var(dim=1).sum() / G.pow(2).sum())
    assert abs(nsr / expected - 1) < 0.05, (nsr, expected)
    # the mean of a gradient row is small next to its spread, so p kappa^2 is the right SNR axis
    assert abs(nsr / (kappa ** 2 * p) - 1) < 0.1, (nsr, kappa ** 2 * p)


def test_sample_granularity_corrupts_whole_rows():
    G = _synthetic_G(N=100, d=400)
    G = G / G.std(dim=1, keepdim=True)  # equal row scales: NSR ~ kappa^2 p over rows
    noisy = add_gradient_noise(G, 2.0, 0.3, _gen(4), granularity="sample")
    changed = (noisy != G).sum(dim=1)
    assert int((changed == 400).sum()) == 30 and int((changed == 0).sum()) == 70
    nsr = float((noisy - G).pow(2).sum() / G.pow(2).sum())
    assert abs(nsr / (4.0 * 0.3) - 1) < 0.05


def test_references():
    G = _synthetic_G(N=50, d=500) + 3.0  # non-zero mean: std and rms differ
    m = 100
    noise_rms = add_gradient_noise(G, 1.0, 0.2, _gen(5), reference="rms") - G
    nsr = float(noise_rms.pow(2).sum() / G.pow(2).sum())
    assert abs(nsr / (m / 500) - 1) < 5 * math.sqrt(2.0 / (50 * m))  # exactly kappa^2 floor(pd)/d
    noise_glob = add_gradient_noise(G, 1.0, 0.2, _gen(5), reference="global_std") - G
    per_row = noise_glob.pow(2).sum(dim=1) / m
    assert abs(float(per_row.mean()) / float(G.var()) - 1) < 0.05  # one sigma for every row


def test_identity_cases_and_global_rng_untouched():
    G = _synthetic_G(N=10, d=50)
    state = torch.random.get_rng_state()
    assert torch.equal(add_gradient_noise(G, 0.0, 0.5, _gen(0)), G)
    assert torch.equal(add_gradient_noise(G, 2.0, 0.0, _gen(0)), G)
    assert torch.equal(add_gradient_noise(G, 2.0, 0.01, _gen(0)), G)  # floor(0.5) = 0 entries
    add_gradient_noise(G, 2.0, 0.5, _gen(0))
    add_gradient_noise(G, 2.0, 0.5, _gen(0), granularity="sample")
    assert torch.equal(torch.random.get_rng_state(), state)


def test_paired_draws_same_support_and_normals_for_different_G():
    """Two methods at one seed see the same entries and the same standard normals, even when
    their G differ (e.g. at a later stage): the draws depend on G's shape only."""
    G1 = _synthetic_G(N=20, d=300, seed=1)
    G2 = _synthetic_G(N=20, d=300, seed=2) * 7.0
    n1 = add_gradient_noise(G1, 2.0, 0.1, _gen(9)) - G1
    n2 = add_gradient_noise(G2, 2.0, 0.1, _gen(9)) - G2
    assert torch.equal(n1 != 0, n2 != 0)
    xi1 = n1 / (2.0 * G1.std(dim=1, keepdim=True))
    xi2 = n2 / (2.0 * G2.std(dim=1, keepdim=True))
    assert torch.allclose(xi1, xi2, rtol=1e-9, atol=1e-12)
    n3 = add_gradient_noise(G1, 2.0, 0.1, _gen(10)) - G1
    assert not torch.equal(n1 != 0, n3 != 0)


def test_model_record_level_hook_and_measured_nsr():
    model = build({"kind": "gradient", "kappa": 2, "fraction": 0.25})
    assert model.kind == "gradient" and model.level == 2.0
    rec = model.record()
    assert rec["kappa"] == 2.0 and rec["fraction"] == 0.25
    assert rec["snr_db"] == pytest.approx(-10 * math.log10(0.25 * 4)) == snr_db(2, 0.25)
    assert build({"kind": "gradient", "kappa": 0.0}).record()["snr_db"] == math.inf
    assert build({"kind": "gradient"}).record() == {
        "kind": "gradient", "kappa": 1.0, "fraction": 0.1, "snr_db": pytest.approx(10.0),
        "granularity": "entry", "reference": "per_sample_std"}
    assert model.evaluate(None, None, None, None, torch.device("cpu"), _gen(0)) == {}
    G = _synthetic_G(N=100, d=400).float()
    G = G / G.std(dim=1, keepdim=True)
    clean = G.clone()
    out = model.gradients(G, _gen(0))
    assert ((out - clean) != 0).sum(dim=1).eq(100).all()
    metrics = model.evaluate(None, None, None, None, torch.device("cpu"), _gen(0))
    assert metrics["gradient/rows_noised"] == 100
    assert metrics["gradient/nsr_measured"] == pytest.approx(1.0, rel=0.05)
    assert metrics["gradient/snr_db_measured"] == pytest.approx(0.0, abs=0.25)


@pytest.mark.parametrize(("override", "key"), [
    ({"granularity": "row"}, "noise.granularity"),
    ({"reference": "max"}, "noise.reference"),
    ({"kappa": -1}, "noise.kappa"),
    ({"fraction": 1.5}, "noise.fraction"),
    ({"fraction": "lots"}, "noise.fraction"),
    ({"nsr": 1.0}, "noise.nsr"),
])
def test_config_errors_name_key_and_allowed(override, key):
    with pytest.raises(ConfigError) as err:
        build({"kind": "gradient", **override})
    assert err.value.key == key and "allowed" in str(err.value)
