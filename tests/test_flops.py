"""MAC and parameter counting (pruning/flops.py) against hand counts on a small conv net with a
depthwise and a grouped conv, with channel masks, zeroed filters, and against physically
smaller models (pruning/structured.py)."""

from __future__ import annotations

import torch
from torch import nn

from pruning import flops, structured


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),                         # 0: 8x8 out
        nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),     # 3: depthwise, 4x4 out
        nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 1, bias=False),                       # 6: pointwise
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4),             # 8: grouped, 4 inputs per group
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10),                                     # 12
    )


# hand counts per example
MACS = {"0": 8 * 8 * 8 * 3 * 9, "3": 4 * 4 * 8 * 1 * 9, "6": 4 * 4 * 16 * 8, "8": 4 * 4 * 16 * 4 * 9,
        "12": 16 * 10}
PARAMS = {"0": 8 * 3 * 9 + 8, "3": 8 * 9 + 8, "6": 16 * 8, "8": 16 * 4 * 9 + 16, "12": 160 + 10}


def test_dense_counts_match_hand_counts():
    net = small_net()
    rep = flops.count(net, torch.randn(2, 3, 8, 8))
    by = rep.by_name()
    assert {k: by[k].macs for k in MACS} == MACS
    assert {k: by[k].params for k in PARAMS} == PARAMS
    assert rep.macs == sum(MACS.values()) == 13824 + 1152 + 2048 + 9216 + 160
    assert rep.total_params == sum(p.numel() for p in net.parameters())
    assert by["3"].groups == 8 and by["8"].groups == 4 and by["3"].positions == 16
    # structured counting of a dense net changes nothing
    assert flops.count(net, torch.randn(1, 3, 8, 8), structured=True).macs == rep.macs


def test_channel_masks_match_hand_counts():
    net = small_net()
    x = torch.randn(1, 3, 8, 8)
    out0 = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0], dtype=torch.bool)      # conv 0 keeps 5 filters
    in6 = out0.clone()                                                    # pointwise sees 5 channels
    in8 = torch.ones(16, dtype=torch.bool)
    in8[[0, 5]] = False                                                   # group 0 and group 1 lose one input each
    rep = flops.count(net, x, in_masks={"6": in6, "8": in8}, out_masks={"0": out0, "3": out0})
    by = rep.by_name()
    assert by["0"].macs == 64 * 5 * 3 * 9 and by["0"].params == 5 * 27 + 5
    assert by["3"].macs == 16 * 5 * 9 and by["3"].params == 5 * 9 + 5
    assert by["6"].macs == 16 * 16 * 5 and by["6"].params == 16 * 5
    # outputs 0-3 (group 0) and 4-7 (group 1) have 3 of their 4 inputs: 8 * 3 + 8 * 4 = 56 slices
    assert by["8"].macs == 16 * 56 * 9 and by["8"].params == 56 * 9 + 16
    assert by["12"].macs == 160


def test_zeroed_filters_and_columns_counted_structurally():
    net = small_net()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        net[0].weight[2] = 0
        net[0].bias[2] = 0
        net[3].weight[4] = 0          # depthwise filter of channel 4 (bias stays: output constant)
        net[12].weight[:, 7] = 0      # one input column of the classifier
        net[8].weight[3, 1, 0, 0] = 0  # a single entry: the slice W[3, 1] stays non-zero
    dense = flops.count(net, x)
    rep = flops.count(net, x, structured=True)
    by = rep.by_name()
    assert dense.macs == sum(MACS.values())
    assert by["0"].macs == 64 * 7 * 27 and by["0"].params == 7 * 27 + 7
    assert by["3"].macs == 16 * 7 * 9 and by["3"].params == 7 * 9 + 8
    assert by["12"].macs == 150 and by["12"].params == 150 + 10
    assert by["8"].macs == MACS["8"]


def test_masked_model_counts_equal_shrunk_model_counts():
    net = small_net().eval()
    x = torch.randn(1, 3, 8, 8)
    groups = structured.find_channel_groups(net, x)
    # conv0 -> bn -> relu -> depthwise -> bn -> relu -> conv6 is a group; conv6 feeds a grouped
    # conv (not a removable consumer), the classifier sees the grouped conv: no other group
    assert [(g.producer, g.chain, g.consumer, g.size) for g in groups] == [("0", ("1", "3", "4"), "6", 8)]
    keep = {"0": torch.tensor([0, 3, 5])}
    small = structured.shrink(net, groups, keep)
    same = small_net().eval()
    same.load_state_dict(net.state_dict())
    structured.zero_out(same, groups, keep)
    a, b = flops.count(small, x), flops.count(same, x, structured=True)
    assert a.macs == b.macs == 64 * 3 * 27 + 16 * 3 * 9 + 16 * 16 * 3 + MACS["8"] + MACS["12"]
    assert a.params == b.params
    assert small[0].weight.shape == (3, 3, 3, 3) and small[3].weight.shape == (3, 1, 3, 3)
    assert small[3].groups == 3 and small[4].num_features == 3 and small[6].weight.shape == (16, 3, 1, 1)
    xx = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(small(xx), same(xx), atol=1e-5, rtol=1e-5)
