"""gRDA (pruning/optim.py GRDA, pruning/methods/grda.py): equals SGD when c = 0, matches an
independent float64 re-derivation of the update when c > 0 (exact zeros), keeps the threshold
consistent across learning-rate changes, and runs end to end through pruning.task.run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning.errors import ConfigError
from pruning.methods import make_config
from pruning.optim import GRDA
from pruning.task import run

FAST_DENSE = ("model.train.epochs=5",)  # a quickly trained dense MLP (shared by this file's runs)


def net() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def train(model: nn.Module, opt: torch.optim.Optimizer, data, lr_at=None) -> None:
    for i, (x, y) in enumerate(data):
        if lr_at is not None and i in lr_at:
            for pg in opt.param_groups:
                pg["lr"] = lr_at[i]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_c_zero_equals_sgd_without_momentum():
    data = batches(25)
    a, b = net(), net()
    train(a, GRDA(a.parameters(), lr=0.1, c=0.0, mu=0.7), data, lr_at={10: 0.03})
    train(b, torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.0), data, lr_at={10: 0.03})
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def reference_grda(model: nn.Module, data, lrs: list[float], c: float, mu: float) -> list[torch.Tensor]:
    """Float64 re-derivation: a_n = w_0 - sum_k lr_k grad_k; g_n = sum_k c lr_k^(1/2+mu) (k^mu - (k-1)^mu);
    w_n = sign(a_n) max(|a_n| - g_n, 0)."""
    model = model.double()
    a = [p.detach().clone() for p in model.parameters()]
    g = 0.0
    for n, ((x, y), lr) in enumerate(zip(data, lrs), start=1):
        grads = torch.autograd.grad(F.cross_entropy(model(x.double()), y), list(model.parameters()))
        g += c * lr ** (0.5 + mu) * (n ** mu - (n - 1) ** mu)
        with torch.no_grad():
            for p, acc, gr in zip(model.parameters(), a, grads):
                acc -= lr * gr
                p.copy_(acc.sign() * (acc.abs() - g).clamp_min(0))
    return [p.detach() for p in model.parameters()]


def test_c_positive_matches_reference_and_gives_exact_zeros():
    data = batches(40)
    c, mu = 0.05, 0.6
    lrs = [0.2] * 20 + [0.05] * 20
    model = net().double()
    ref = reference_grda(net(), data, lrs, c, mu)
    opt = GRDA(model.parameters(), lr=0.2, c=c, mu=mu)
    train(model, opt, [(x.double(), y) for x, y in data], lr_at={20: 0.05})
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.detach(), r, atol=1e-10, rtol=0)
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    assert zeros > 0
    # same zero pattern as the reference
    assert all(torch.equal(p == 0, r == 0) for p, r in zip(model.parameters(), ref))
    # the threshold accumulated across the lr change
    g = c * 0.2 ** (0.5 + mu) * 20 ** mu + c * 0.05 ** (0.5 + mu) * (40 ** mu - 20 ** mu)
    assert math.isclose(opt.threshold(), g, rel_tol=1e-12)
    # and with a constant lr it is c lr^(1/2) (n lr)^mu
    m2 = net()
    opt2 = GRDA(m2.parameters(), lr=0.1, c=c, mu=mu)
    train(m2, opt2, data[:30])
    assert math.isclose(opt2.threshold(), c * 0.1 ** 0.5 * (30 * 0.1) ** mu, rel_tol=1e-12)


def test_penalty_none_is_sgd_and_l1_group_follows_its_accumulator():
    data = batches(10)
    a, b = net(), net()
    train(a, GRDA([{"params": list(a.parameters()), "penalty": "none"}], lr=0.1, c=0.5, mu=0.6), data)
    train(b, torch.optim.SGD(b.parameters(), lr=0.1), data)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
    m = net()
    opt = GRDA([{"params": list(m[0].parameters())}, {"params": list(m[2].parameters()), "penalty": "none"}],
               lr=0.1, c=0.5, mu=0.6)
    train(m, opt, data)
    assert int((m[0].weight == 0).sum()) > 0
    assert all(torch.equal(p, opt.accumulator(p)) for p in m[2].parameters())
    thr = opt.threshold(0)
    for p in m[0].parameters():
        acc = opt.accumulator(p)
        torch.testing.assert_close(p.detach(), acc.sign() * (acc.abs() - thr).clamp_min(0))


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="method.mu"):
        make_config("grda", {"name": "grda", "mu": 1.5})
    with pytest.raises(ConfigError, match="method.scope"):
        make_config("grda", {"name": "grda", "scope": "bias"})
    with pytest.raises(ConfigError, match="method.nope"):
        make_config("grda", {"name": "grda", "nope": 1})


def test_grda_end_to_end(make_cfg, tmp_path):
    cfg = make_cfg("method=grda", "method.epochs=2", "method.c=0.05", "method.mu=0.6", "method.lr=0.05",
                   "finetune=short", "finetune.epochs=1", "sparsity=0.5", *FAST_DENSE)
    data = run(cfg, tmp_path / "run")
    rec = json.loads((tmp_path / "run" / "result.json").read_text())
    assert rec["status"] == "completed" and rec["index"]["method"] == "grda"
    m = rec["metrics"]
    # sparsity emerges (not imposed: the target 0.5 is only recorded)
    assert 0.05 < m["sparsity_prunable"] < 0.99
    stage = rec["stages"][0]
    assert stage["target_sparsity"] == 0.5 and stage["target_sparsity_not_imposed"] == 0.5
    assert stage["threshold"] > 0 and stage["steps"] == 2 * math.ceil(1437 / 64)
    assert m["structured/flops_ratio"] < 1.0 and m["structured/params_ratio"] < 1.0
    # masked fine-tuning kept gRDA's zeros
    assert m["finetuned_acc"] is not None and m["sparsity_prunable"] == pytest.approx(stage["sparsity"])
    assert m["final_acc"] > 0.7
    assert data["status"] == "completed"
    phases = [json.loads(line).get("phase") for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert phases.count("grda") == 2


def test_grda_under_gradient_noise(make_cfg, tmp_path):
    cfg = make_cfg("method=grda", "method.epochs=0.5", "method.c=0.05", "method.mu=0.6", "method.lr=0.05",
                   "noise=gradient", "noise.kappa=2", *FAST_DENSE)
    run(cfg, tmp_path / "run")
    rec = json.loads((tmp_path / "run" / "result.json").read_text())
    m = rec["metrics"]
    assert rec["status"] == "completed" and rec["index"]["noise"] == "gradient"
    steps = rec["stages"][0]["steps"]
    assert steps == math.ceil(0.5 * math.ceil(1437 / 64)) and m["gradient/rows_noised"] == steps
    assert m["sparsity_prunable"] > 0
