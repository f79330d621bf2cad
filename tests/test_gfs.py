"""Greedy Forward Selection (pruning/methods/gfs.py): a planted problem, batched suffix scoring
against a naive masked forward per candidate, channel groups of ResNet / MobileNet blocks, exact
physical shrinking, budgets, and runs end to end through pruning.task.run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from pruning import flops, structured
from pruning.data import DataBundle
from pruning.errors import RunCheckError
from pruning.layout import make_layout
from pruning.methods import gfs
from pruning.methods.base import TrainContext
from pruning.noise import NoiseModel
from pruning.task import run

FAST_DENSE = ("model.train.epochs=5",)


# ------------------------------------------------------------------------------ planted
def planted(seed: int = 0) -> tuple[nn.Sequential, list[int], torch.Tensor]:
    """Hidden units: 3 useful types (unit j reads input j, output weight a_j), 3 copies each, and
    6 pairs of useless units (random directions in inputs 3..7, output weights +b and -b, which
    cancel in the dense average). Output = (1/D) sum_i c_i relu(theta_i x), target
    y = (1/3) sum_j a_j relu(x_j). Returns the net, the type of every unit (-1: useless)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.tensor([1.0, 1.2, 0.8])
    thetas, coefs, types = [], [], []
    for j in range(3):
        for _ in range(3):
            thetas.append(F.one_hot(torch.tensor(j), 8).float())
            coefs.append(float(a[j]))
            types.append(j)
    for _ in range(6):
        th = torch.zeros(8)
        th[3:] = torch.randn(5, generator=g)
        th /= th.norm()
        for sign in (1.0, -1.0):
            thetas.append(th.clone())
            coefs.append(3.0 * sign)
            types.append(-1)
    perm = torch.randperm(len(types), generator=g)
    D = len(types)
    net = nn.Sequential(nn.Linear(8, D), nn.ReLU(), nn.Linear(D, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.stack(thetas)[perm])
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor(coefs)[perm].view(1, D) / D)
    return net.eval(), [types[i] for i in perm.tolist()], a


def teacher(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return (F.relu(x[:, :3]) * a).sum(1, keepdim=True) / 3


def mse(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.mse_loss(out, y, reduction=reduction)


def test_planted_problem_selects_useful_units_first():
    net, types, a = planted()
    gm = structured.trace(net)
    (group,) = structured.find_channel_groups(net, torch.randn(1, 8), gm)
    assert (group.producer, group.consumer, group.size) == ("0", "2", 21)
    scorer = gfs.LayerScorer(gm, group, loss_fn=mse)
    gen = torch.Generator().manual_seed(1)

    def next_batch():
        x = torch.randn(512, 8, generator=gen)
        return x, teacher(x, a)

    x, y = next_batch()
    with torch.no_grad():
        dense_loss = float(mse(net(x), y))
    assert dense_loss > 1e-3  # the useless units dilute the dense average
    selected, losses = gfs.greedy_select(scorer, next_batch, torch.Generator().manual_seed(2), num_evaluate=21,
                                         k_target=6)
    assert len(selected) == 6
    assert sorted(types[i] for i in selected[:3]) == [0, 1, 2]      # one unit of each useful type
    assert losses[0] > losses[1] > losses[2] and losses[2] < 1e-10   # three units reproduce the target
    assert losses[2] <= dense_loss
    # the subnetwork itself (alpha-mask D/|S| through the masker) reaches the dense loss with 3 units
    masker = structured.ChannelMasker(net, [group])
    masker.set(group.name, gfs.alpha_scale(selected[:3], 21))
    x, y = next_batch()
    with torch.no_grad():
        assert float(mse(net(x), y)) < 1e-10
    masker.remove()
    # and with a random candidate pool (10 of 21) the useful units still come first
    selected, _ = gfs.greedy_select(scorer, next_batch, torch.Generator().manual_seed(3), num_evaluate=10,
                                    k_target=3)
    assert all(types[i] >= 0 for i in selected[:2])


# ----------------------------------------------------------------- conv blocks, scoring
class Block(nn.Module):
    """ResNet basic block (identity shortcut)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class Inverted(nn.Module):
    """MobileNetV2 inverted residual (expand 1x1, depthwise 3x3, project 1x1, residual)."""

    def __init__(self, c: int, t: int = 3):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(c, c * t, 1, bias=False), nn.BatchNorm2d(c * t), nn.ReLU6(inplace=True),
            nn.Conv2d(c * t, c * t, 3, padding=1, groups=c * t, bias=False), nn.BatchNorm2d(c * t),
            nn.ReLU6(inplace=True), nn.Conv2d(c * t, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Block(8)
        self.inv = Inverted(8)
        self.head = nn.Conv2d(8, 12, 1)
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inv(self.block(self.stem(x)))
        h = F.relu(self.head(h))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def conv_net() -> ConvNet:
    torch.manual_seed(0)
    net = ConvNet()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return net.eval()


def test_groups_of_resnet_and_mobilenet_blocks():
    net = conv_net()
    groups = structured.find_channel_groups(net, torch.randn(1, 1, 6, 6))
    assert [(g.producer, g.chain, g.consumer, g.size) for g in groups] == [
        ("block.conv1", ("block.bn1",), "block.conv2", 8),                  # inner channels of the basic block
        ("inv.conv.0", ("inv.conv.1", "inv.conv.3", "inv.conv.4"), "inv.conv.6", 24),  # through the depthwise
        ("head", (), "fc", 12),                                              # through pooling and flatten
    ]  # stem, block/inverted outputs feed residual additions: never grouped


def test_batched_suffix_scores_equal_naive_masked_forwards():
    net = conv_net()
    x = torch.rand(16, 1, 6, 6)
    y = torch.randint(0, 4, (16,))
    gm = structured.trace(net)
    groups = structured.find_channel_groups(net, x[:1], gm)
    masker = structured.ChannelMasker(net, groups)
    masker.set("head", gfs.alpha_scale([0, 3, 5], 12))   # another group already pruned
    for g in groups[:2]:
        scorer = gfs.LayerScorer(gm, g, chunk=3)
        with masker.disabled(g.name):
            values = scorer.capture(x)
            cands = [1, 4, 6, 2, 7]
            scales = gfs.candidate_scales([0, 5], cands, g.size)
            loss, top1 = scorer.score(values, y, scales)
        for k, c in enumerate(cands):
            masker.set(g.name, gfs.alpha_scale([0, 5], g.size, extra=c))
            out = net(x)
            torch.testing.assert_close(loss[k], F.cross_entropy(out, y), atol=1e-5, rtol=1e-5)
            assert float(top1[k]) == float((out.argmax(1) == y).float().mean())
            torch.testing.assert_close(scales[k], gfs.alpha_scale([0, 5, c], g.size))
        masker.set(g.name, None)
    masker.remove()


def test_shrink_folds_alpha_scaling_exactly():
    net = conv_net()
    x = torch.rand(8, 1, 6, 6)
    groups = structured.find_channel_groups(net, x[:1])
    sel = {"block.conv1": [1, 2, 6], "inv.conv.0": [0, 5, 9, 23], "head": [4, 7]}
    scales = {g.name: gfs.alpha_scale(sel[g.name], g.size) for g in groups}
    masker = structured.ChannelMasker(net, groups)
    for g in groups:
        masker.set(g.name, scales[g.name])
    ref = net(x)
    masker.remove()
    keep = {k: structured.keep_from_scale(v, len(v)) for k, v in scales.items()}
    small = structured.shrink(net, groups, keep, scales)
    torch.testing.assert_close(small(x), ref, atol=1e-5, rtol=1e-5)
    assert small.block.conv1.weight.shape == (3, 8, 3, 3) and small.block.conv2.weight.shape == (8, 3, 3, 3)
    assert small.inv.conv[3].groups == 4 and small.fc.weight.shape == (4, 2)
    same = conv_net()
    structured.zero_out(same, groups, keep, scales)
    torch.testing.assert_close(same(x), ref, atol=1e-5, rtol=1e-5)
    assert flops.count(same, x[:1], structured=True).macs == flops.count(small, x[:1]).macs


# ------------------------------------------------------------------------- run(), budgets
def conv_context(model: nn.Module, rows: list) -> TrainContext:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(96, 1, 6, 6, generator=g)
    y = (x[:, 0, :3].mean((1, 2)) > x[:, 0, 3:].mean((1, 2))).long() + 2 * (x[:, 0, :, :3].mean((1, 2)) > 0.5).long()
    ds = TensorDataset(x, y)
    data = DataBundle(name="toy", train=ds, test=ds, calib=ds, input_shape=(1, 6, 6), num_classes=4,
                      mean=(0.5,), std=(0.25,))
    return TrainContext(model=model, layout=make_layout(model), data=data, device=torch.device("cpu"),
                        sparsity=0.5, generator=torch.Generator().manual_seed(1), noise=NoiseModel(),
                        progress=False, log=rows.append, evaluate=None)


@pytest.mark.parametrize("budget", ["width", "flops"])
def test_run_on_conv_net_meets_budget(budget):
    net = conv_net()
    rows: list = []
    ctx = conv_context(net, rows)
    dense_macs = flops.count(net, torch.rand(1, 1, 6, 6)).macs
    cfg = gfs.Config(budget=budget, width=0.25, flops_ratio=0.6, batch_size=32, num_evaluate=6,
                     layer_finetune_epochs=0.5, finetune_batch_size=32)
    res = gfs.run(ctx, cfg)
    assert ctx.model is not net and ctx.layout.numel == res.w.numel() == res.mask.numel()
    info = res.info
    small_macs = flops.count(ctx.model, torch.rand(1, 1, 6, 6)).macs
    assert info["structured/flops_kept"] == small_macs and info["structured/flops_dense"] == dense_macs
    if budget == "width":
        assert [info[f"structured/channels/{n}"] for n in ("block.conv1", "inv.conv.0", "head")] == [2, 6, 3]
    else:
        assert info["budget_reachable"] and small_macs <= 0.6 * dense_macs
        assert small_macs > 0.45 * dense_macs  # the largest uniform width under the budget
    assert ctx.model.block.conv1.out_channels == info["structured/channels/block.conv1"]
    assert [r["layer"] for r in rows if r.get("phase") == "gfs"] == ["block.conv1", "inv.conv.0", "head"]
    ctx.model(torch.rand(2, 1, 6, 6))


def test_accuracy_budget_refuses_a_network_that_classifies_nothing():
    """budget=accuracy stops at (1 - tol) x the unpruned top-1: at 0 the rule holds at once and every
    layer would silently keep one channel."""
    net = conv_net()
    with torch.no_grad():
        net.fc.bias.copy_(torch.tensor([1e4, 0.0, 0.0, 0.0]))  # always class 0
    ctx = conv_context(net, [])
    x, y = ctx.data.calib.tensors
    ctx.data.calib.tensors = (x, torch.where(y == 0, torch.ones_like(y), y))  # and no example is class 0
    with pytest.raises(RunCheckError, match="budget=accuracy"):
        gfs.run(ctx, gfs.Config(budget="accuracy", batch_size=32, num_evaluate=6))


def test_resnet20_groups_and_shrink_if_available():
    resnet_cifar = pytest.importorskip("pruning.models.resnet_cifar")
    if not hasattr(resnet_cifar, "CifarResNet"):
        pytest.skip("pruning.models.resnet_cifar has no CifarResNet")
    torch.manual_seed(0)
    net = resnet_cifar.CifarResNet(depth=20, num_classes=10).eval()
    x = torch.rand(2, 3, 32, 32)
    groups = structured.find_channel_groups(net, x[:1])
    assert len(groups) == 9 and all(g.producer.endswith("conv1") and g.consumer.endswith("conv2") for g in groups)
    keep = {g.name: torch.arange(0, g.size, 2) for g in groups}
    scales = {g.name: gfs.alpha_scale(keep[g.name].tolist(), g.size) for g in groups}
    masker = structured.ChannelMasker(net, groups)
    for g in groups:
        masker.set(g.name, scales[g.name])
    ref = net(x)
    masker.remove()
    small = structured.shrink(net, groups, keep, scales)
    torch.testing.assert_close(small(x), ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- end to end
def test_gfs_end_to_end_width(make_cfg, tmp_path):
    cfg = make_cfg("method=gfs", "method.budget=width", "method.width=0.25", "method.num_evaluate=8",
                   "method.layer_finetune_epochs=0.2", "finetune=short", "finetune.epochs=1", "noise=gradient",
                   *FAST_DENSE)
    run(cfg, tmp_path / "run")
    rec = json.loads((tmp_path / "run" / "result.json").read_text())
    assert rec["status"] == "completed" and rec["index"]["method"] == "gfs"
    m = rec["metrics"]
    assert m["structured/channels/net.1"] == 32 and m["structured/channels/net.3"] == 16
    assert m["numel_prunable"] == 64 * 32 + 32 * 16 + 16 * 10 == m["structured/prunable_params_kept"]
    assert m["structured/flops_kept"] == m["numel_prunable"]
    assert m["structured/flops_ratio"] == pytest.approx(m["numel_prunable"] / (64 * 128 + 128 * 64 + 640))
    assert m["structured/channel_sparsity"] == pytest.approx(1 - 48 / 192)
    assert m["final_acc"] > 0.6 and m["finetuned_acc"] is not None
    # the layer fine-tuning steps ran under the gradient-noise hook (one row per step)
    assert rec["index"]["noise"] == "gradient" and m["gradient/rows_noised"] > 0


def test_gfs_end_to_end_accuracy_rule_masked(make_cfg, tmp_path):
    tol = 0.05
    cfg = make_cfg("method=gfs", f"method.top1_tol={tol}", "method.num_evaluate=16", "method.layer_finetune_epochs=0",
                   "method.shrink=false", *FAST_DENSE)
    run(cfg, tmp_path / "run")
    m = json.loads((tmp_path / "run" / "result.json").read_text())["metrics"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    layers = [r for r in rows if r.get("phase") == "gfs"]
    assert [r["layer"] for r in layers] == ["net.1", "net.3"]
    for r in layers:  # stopped by the accuracy rule (or kept every channel)
        assert r["top1"] >= (1 - tol) * r["init_top1"] - 1e-9 or r["kept"] == r["width"]
        assert r["kept"] == m[f"structured/channels/{r['layer']}"]
    assert m["structured/channels_kept"] < 192
    h1, h2 = m["structured/channels/net.1"], m["structured/channels/net.3"]
    # masked, same shapes: the removed rows and columns are zero
    assert m["numel_prunable"] == 64 * 128 + 128 * 64 + 640
    assert m["nnz_prunable"] <= 64 * h1 + h1 * h2 + h2 * 10
    assert math.isclose(m["structured/flops_kept"], m["nnz_prunable"])
