"""Schedules with the regression methods: the cubic schedule, the SWAP multi-stage protocol (stage 1
at sparsity 0, G recomputed every stage at the current weights, targets anchored to the dense
weights, fine-tuning between stages), CHITA++ re-anchoring, and gradual pruning."""

from __future__ import annotations

import json

import pytest
import torch

from pruning.layout import num_kept
from pruning.methods import lr, swap
from pruning.schedules.step import cubic_sparsity
from pruning.task import run


def test_cubic_schedule_values():
    # s_t = s_T + (s_0 - s_T)(1 - (t - 1)/(T - 1))^3, T = 5, s_0 = 0, s_T = 0.9, by hand
    expected = [0.0, 0.9 - 0.9 * 0.75 ** 3, 0.9 - 0.9 * 0.5 ** 3, 0.9 - 0.9 * 0.25 ** 3, 0.9]
    assert expected[1] == pytest.approx(0.5203125) and expected[3] == pytest.approx(0.8859375)
    got = [cubic_sparsity(t, 1, 5, 0.0, 0.9) for t in range(1, 6)]
    assert got == pytest.approx(expected, abs=1e-15)
    # the gradual form over epochs start..end, from an initial sparsity
    assert cubic_sparsity(0, 0, 4, 0.05, 0.9) == pytest.approx(0.05)
    assert cubic_sparsity(2, 0, 4, 0.05, 0.9) == pytest.approx(0.9 + (0.05 - 0.9) * 0.125)
    assert cubic_sparsity(4, 0, 4, 0.05, 0.9) == pytest.approx(0.9)
    assert cubic_sparsity(9, 0, 4, 0.05, 0.9) == pytest.approx(0.9)  # clamped after the end
    assert cubic_sparsity(1, 1, 1, 0.0, 0.7) == 0.7                  # a single stage is the target


class Spy:
    """Wraps a method's prune to keep what each stage was given."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, problem, sparsity, cfg):
        res = self.fn(problem, sparsity, cfg)
        self.calls.append({"sparsity": sparsity, "w": problem.w.clone(), "w_bar": problem.w_bar.clone(),
                           "G": problem.grads.dense().clone(), "stage": problem.stage,
                           "num_stages": problem.num_stages, "mask_out": res.mask.clone(),
                           "w_out": res.w.clone()})
        return res


def read_phases(run_dir) -> list[str]:
    return [json.loads(line).get("phase") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method,extra", [("lr", []), ("swap", ["method.epsilon=0.001", "method.epsilon_units=raw"])])
def test_multistage_is_the_swap_protocol(make_cfg, tmp_path, monkeypatch, method, extra):
    module = {"lr": lr, "swap": swap}[method]
    spy = Spy(module.prune)
    monkeypatch.setattr(module, "prune", spy)
    T = 3
    cfg = make_cfg(f"method={method}", "schedule=multistage", f"schedule.stages={T}",
                   "schedule.finetune_epochs=1", "sparsity=0.9", *extra)
    rec = run(cfg, tmp_path / "run")
    stages = rec["stages"]
    targets = [cubic_sparsity(t, 1, T, 0.0, 0.9) for t in range(1, T + 1)]
    assert targets[0] == 0.0
    assert [s["stage"] for s in stages] == [1, 2, 3]
    assert [s["target_sparsity"] for s in stages] == pytest.approx(targets)
    p = rec["metrics"]["numel_prunable"]
    for s, target in zip(stages, targets):
        # achieved = 1 - floor((1 - s) p) / p: the target, up to one weight
        assert s["sparsity"] == pytest.approx(1 - num_kept(p, target) / p, abs=1e-12)
        for key in ("objective", "acc", "loss", "iterations", "finetuned_acc"):
            assert key in s
        assert 0.0 <= s["acc"] <= 1.0
    if method == "swap":
        assert all(s["plan"] == "sinkhorn" and s["epsilon_used"] == 0.001 for s in stages)
        assert all(s["direction"] == "paper" and "plan_entropy" in s for s in stages)
    # one call per stage with the scheduled sparsity
    assert [c["sparsity"] for c in spy.calls] == pytest.approx(targets)
    assert [(c["stage"], c["num_stages"]) for c in spy.calls] == [(1, T), (2, T), (3, T)]
    # targets anchored to the dense weights at every stage; stage 1 starts from them
    dense = spy.calls[0]["w"]
    for c in spy.calls:
        assert torch.equal(c["w_bar"], dense)
    # fine-tuning between stages moved the surviving weights, and kept the pruned ones at zero
    for prev, cur in zip(spy.calls, spy.calls[1:]):
        assert not torch.equal(cur["w"], prev["w_out"])
        assert bool((cur["w"][~prev["mask_out"]] == 0).all())
    # G recomputed every stage (at the current weights, on a fresh calibration draw)
    for prev, cur in zip(spy.calls, spy.calls[1:]):
        assert not torch.equal(prev["G"], cur["G"])
    phases = read_phases(tmp_path / "run")
    for t in range(1, T + 1):
        assert f"stage{t}_finetune" in phases
    assert rec["metrics"]["sparsity_prunable"] == pytest.approx(0.9, abs=1e-4)


def test_reanchor_uses_the_current_weights(make_cfg, tmp_path, monkeypatch):
    spy = Spy(lr.prune)
    monkeypatch.setattr(lr, "prune", spy)
    cfg = make_cfg("method=lr", "schedule=multistage", "schedule.stages=2", "schedule.reanchor=true",
                   "sparsity=0.8")
    run(cfg, tmp_path / "run")
    for c in spy.calls:
        assert torch.equal(c["w_bar"], c["w"])  # CHITA++: y = G w_t


@pytest.mark.parametrize("method,extra", [("lr", []), ("swap", ["method.epsilon=0.001", "method.epsilon_units=raw"])])
def test_gradual_with_regression_methods(make_cfg, tmp_path, method, extra):
    cfg = make_cfg(f"method={method}", "schedule=gradual", "schedule.epochs=3", "schedule.start=0",
                   "schedule.end=2", "schedule.freq=1", "sparsity=0.8", *extra)
    rec = run(cfg, tmp_path / "run")
    stages = rec["stages"]
    assert [s["epoch"] for s in stages] == [0, 1, 2]
    targets = [cubic_sparsity(e, 0, 2, 0.05, 0.8) for e in (0, 1, 2)]
    assert [s["target_sparsity"] for s in stages] == pytest.approx(targets)
    p = rec["metrics"]["numel_prunable"]
    for s, target in zip(stages, targets):
        assert s["sparsity"] == pytest.approx(1 - num_kept(p, target) / p, abs=1e-12)
        assert "objective" in s and "acc" in s
    assert rec["metrics"]["sparsity_prunable"] == pytest.approx(0.8, abs=1e-4)
    assert rec["metrics"]["final_acc"] > 0.5


def test_gradual_lr_decays_at_its_milestones(make_cfg, tmp_path):
    """WoodFisher's ResNet-50 recipe decays the lr during gradual pruning (x gamma at milestones)."""
    import json

    cfg = make_cfg("schedule=gradual", "schedule.epochs=5", "schedule.start=0", "schedule.end=2",
                   "schedule.freq=1", "schedule.lr=0.01", "schedule.lr_schedule=step",
                   "schedule.milestones=[2,4]", "schedule.gamma=0.5", "sparsity=0.5")
    run(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if r.get("phase") == "gradual"]
    assert lrs == pytest.approx([0.01, 0.01, 0.005, 0.005, 0.0025])


def test_finetune_follows_its_lr_schedule_and_label_smoothing(make_cfg, tmp_path):
    """The finetune group's lr_schedule drives the lr per epoch (cosine to 0 over `epochs`) and its
    label_smoothing reaches the training loss (the GFS recipe: cosine, smoothing 0.1)."""
    import math

    common = ("finetune=short", "finetune.epochs=4", "finetune.lr=0.02", "finetune.lr_schedule=cosine",
              "sparsity=0.5")
    run(make_cfg(*common), tmp_path / "plain")
    run(make_cfg(*common, "finetune.label_smoothing=0.3"), tmp_path / "smooth")

    def rows(name: str) -> list[dict]:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r.get("phase") == "finetune"]

    plain, smooth = rows("plain"), rows("smooth")
    assert [r["lr"] for r in plain] == pytest.approx([0.02 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)])
    # a smoothed target keeps the optimised cross-entropy well above the plain one's
    assert smooth[0]["train_loss"] > plain[0]["train_loss"] + 0.2


def test_label_smoothing_out_of_range_names_the_key():
    from pruning.errors import ConfigError
    from pruning.train import train_config

    with pytest.raises(ConfigError, match="finetune.label_smoothing"):
        train_config({"epochs": 1, "label_smoothing": 1.0}, "finetune")
