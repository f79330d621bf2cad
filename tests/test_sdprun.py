"""sDprun (pruning/methods/sdprun.py): the group soft threshold against a direct formula, whole
channel groups driven to exactly zero on a small conv net with BN and a depthwise conv, exact
physical removal, and runs end to end through pruning.task.run (shrunk and masked)."""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from torch import nn

from pruning import flops, structured
from pruning.optim import GRDA
from pruning.task import run

FAST_DENSE = ("model.train.epochs=5",)


def test_group_threshold_matches_formula():
    torch.manual_seed(0)
    lin = nn.Linear(5, 4)
    bn = nn.BatchNorm1d(4)
    members = [(lin.weight, 0), (lin.bias, 0), (bn.weight, 0), (bn.bias, 0)]
    params = [lin.weight, lin.bias, bn.weight, bn.bias]
    w0 = [p.detach().clone() for p in params]
    opt = GRDA(params, lr=0.3, c=0.4, mu=0.6, penalty="none", channel_groups=[members])
    x, y = torch.randn(8, 5), torch.randn(8, 4)
    F.mse_loss(bn(lin(x)), y).backward()
    grads = [p.grad.clone() for p in params]
    opt.step()
    # independent: a = w0 - lr g; per channel o, w = a max(0, 1 - thr sqrt(|G|) / ||a_G||), |G| = 5 + 1 + 1 + 1
    a = [w - 0.3 * g for w, g in zip(w0, grads)]
    thr = 0.4 * 0.3 ** 0.5 * 0.3 ** 0.6
    assert math.isclose(opt.threshold(), thr, rel_tol=1e-12)
    for o in range(4):
        norm = math.sqrt(sum(float(t[o].pow(2).sum()) for t in a))
        factor = max(0.0, 1 - thr * math.sqrt(8) / norm)
        for p, t in zip(params, a):
            torch.testing.assert_close(p.detach()[o], t[o] * factor)


class Net(nn.Module):
    """conv -> BN -> ReLU -> depthwise -> BN -> ReLU -> conv (a MobileNetV2-like block) -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(3, 16, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.project = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.bn1(self.expand(x)))
        h = F.relu6(self.bn2(self.dw(h)))
        h = F.relu(self.project(h))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def test_whole_groups_become_zero_and_removal_is_exact():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(64, 3, 6, 6)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    groups = structured.find_channel_groups(model, x[:1])
    assert [(g.producer, g.chain, g.consumer) for g in groups] == [
        ("expand", ("bn1", "dw", "bn2"), "project"), ("project", (), "fc")]
    opt = GRDA(model.parameters(), lr=0.05, c=0.3, mu=0.6, penalty="none",
               channel_groups=[structured.group_members(model, g) for g in groups])
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    dead_total = 0
    for g in groups:
        alive = structured.alive_channels(model, g)
        members = structured.group_members(model, g)
        for o in range(g.size):  # every channel is all-zero in every member, or none is all-zero
            zero = [bool((p.detach().select(d, o) == 0).all()) for p, d in members]
            assert all(zero) or not any(zero)
            assert zero[0] != bool(alive[o])
        dead_total += int((~alive).sum())
    assert dead_total > 0
    model.train()  # exactness must hold with batch statistics too: a dead channel is zero after BN
    acts = {}
    mods = dict(model.named_modules())
    hooks = [mods[g.consumer].register_forward_pre_hook(lambda m, a, n=g.name: acts.__setitem__(n, a[0]))
             for g in groups]
    model(x)
    for h in hooks:
        h.remove()
    for g in groups:
        dead = ~structured.alive_channels(model, g)
        inp = acts[g.name]
        inp = inp[:, dead] if inp.dim() == 4 else inp[..., dead]
        assert torch.equal(inp, torch.zeros_like(inp))
    model.eval()
    report, keep = structured.zeros_report(model, x[:1], groups)
    small = structured.shrink(model, groups, keep)
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)
    assert report["structured/flops_kept"] == flops.count(small, x[:1]).macs < flops.count(model, x[:1]).macs
    assert report["structured/channels_kept"] == sum(int(v.numel()) for v in keep.values())


def test_sdprun_end_to_end_shrinks(make_cfg, tmp_path):
    cfg = make_cfg("method=sdprun", "method.epochs=2", "method.c=0.2", "method.mu=0.6", "method.lr=0.05",
                   "finetune=short", "finetune.epochs=1", *FAST_DENSE)
    run(cfg, tmp_path / "run")
    rec = json.loads((tmp_path / "run" / "result.json").read_text())
    assert rec["status"] == "completed" and rec["index"]["method"] == "sdprun"
    m = rec["metrics"]
    assert 0.0 < m["structured/channel_sparsity"] < 1.0
    kept = m["structured/channels/net.1"] + m["structured/channels/net.3"]
    assert kept == m["structured/channels_kept"] < 128 + 64
    assert m["structured/channels_dense/net.1"] == 128
    assert m["structured/flops_ratio"] < 1.0 and m["structured/params_ratio"] < 1.0
    # the model is physically smaller: the prunable tensors of the final model are the kept ones
    assert m["numel_prunable"] == m["structured/prunable_params_kept"] < m["structured/prunable_params_dense"]
    h1, h2 = m["structured/channels/net.1"], m["structured/channels/net.3"]
    assert m["numel_prunable"] == 64 * h1 + h1 * h2 + h2 * 10
    assert m["structured/flops_kept"] == m["nnz_prunable"]  # an MLP: one MAC per non-zero weight
    assert m["finetuned_acc"] is not None and m["final_acc"] > 0.8


def test_sdprun_end_to_end_masked(make_cfg, tmp_path):
    cfg = make_cfg("method=sdprun", "method.epochs=1", "method.c=0.3", "method.mu=0.6", "method.lr=0.05",
                   "method.shrink=false", "method.rest=l1", *FAST_DENSE)
    run(cfg, tmp_path / "run")
    m = json.loads((tmp_path / "run" / "result.json").read_text())["metrics"]
    assert m["numel_prunable"] == 64 * 128 + 128 * 64 + 64 * 10
    assert m["structured/channel_sparsity"] > 0
    # removed channels are zero rows and columns: at least that share of the weights is zero
    h1, h2 = m["structured/channels/net.1"], m["structured/channels/net.3"]
    removed = 64 * 128 + 128 * 64 + 64 * 10 - (64 * h1 + h1 * h2 + h2 * 10)
    assert m["nnz_prunable"] <= m["numel_prunable"] - removed


def test_sdprun_defaults_remove_channels_on_digits(make_cfg, tmp_path):
    """With the method's defaults (only the dense model shortened) channels are removed on the digits MLP:
    gRDA's c = 0.005 removed none."""
    rec = run(make_cfg("method=sdprun", *FAST_DENSE), tmp_path / "run")
    m = rec["metrics"]
    assert m["structured/channel_sparsity"] > 0.05
    assert m["structured/channels_kept"] < 128 + 64
    assert m["final_acc"] > 0.5
