"""BatchNorm re-estimation (pruning/batchnorm.py, finetune.bn_recalibrate): the statistics against
a loop over the batches, what it must leave alone, and the finetune stage that runs it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pruning.batchnorm import batchnorm_layers, recalibrate
from pruning.errors import ConfigError
from pruning.runconfig import validate
from pruning.schedules.multistage import stage_recipe
from pruning.task import run
from tests.test_published_checkpoints import shared_file


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    # dropout before the BatchNorm: were it active during the passes, the statistics would differ
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout2d(0.5), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _data(n: int = 10) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.rand(n, 3, 8, 8, generator=g) * 3 + 1, torch.zeros(n, dtype=torch.long))


def test_statistics_are_the_average_of_the_batch_statistics():
    net, data = _net(), _data(10)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    used = recalibrate(net, data, 100, batch_size=4, device=torch.device("cpu"), seed=0)
    assert used == 10
    bn = net[2]
    # reference: batches of 4, 4, 2 in dataset order, each one's mean and unbiased variance of the
    # conv output per channel, averaged with equal weight per batch
    with torch.no_grad():
        z = [net[0](data.tensors[0][i:i + 4]) for i in (0, 4, 8)]
    mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in z]).mean(0)
    var = torch.stack([b.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True) for b in z]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 3
    # nothing else changed; momentum and eval mode restored
    for k, v in net.state_dict().items():
        if not k.startswith("2.running") and k != "2.num_batches_tracked":
            assert torch.equal(v, before[k]), k
    assert bn.momentum == 0.3 and not any(m.training for m in net.modules())


def test_a_subset_is_drawn_with_the_seed():
    data = _data(40)
    stats = {}
    for seed in (0, 0, 1):
        net = _net()
        assert recalibrate(net, data, 12, batch_size=5, device=torch.device("cpu"), seed=seed) == 12
        stats.setdefault(seed, []).append(net[2].running_mean.clone())
    assert torch.equal(stats[0][0], stats[0][1])
    assert not torch.allclose(stats[0][0], stats[1][0])


class _Augmented(torch.utils.data.Dataset):
    """A random transform drawn from torch's global generator, as torchvision's transforms draw."""

    def __init__(self, base: TensorDataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base[i]
        return x + torch.rand(()), y


def test_augmentation_draws_are_seeded_and_leave_the_global_stream_alone():
    data = _Augmented(_data(12))
    means = []
    for seed in (3, 3, 4):
        net = _net()
        torch.manual_seed(99)
        recalibrate(net, data, 12, batch_size=4, device=torch.device("cpu"), seed=seed)
        means.append(net[2].running_mean.clone())
        after = torch.rand(())
        torch.manual_seed(99)
        assert after == torch.rand(())  # the global generator is where it was
    assert torch.equal(means[0], means[1]) and not torch.allclose(means[0], means[2])


def test_no_batchnorm_or_no_examples_changes_nothing():
    mlp = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    data = TensorDataset(torch.randn(6, 4), torch.zeros(6, dtype=torch.long))
    assert batchnorm_layers(mlp) == []
    assert recalibrate(mlp, data, 100, batch_size=2, device=torch.device("cpu"), seed=0) == 0
    net = _net()
    before = net[2].running_mean.clone()
    assert recalibrate(net, _data(), 0, batch_size=2, device=torch.device("cpu"), seed=0) == 0
    assert torch.equal(net[2].running_mean, before)


def test_settings_are_checked_and_do_not_reach_the_training_recipe(make_cfg):
    with pytest.raises(ConfigError, match="finetune.bn_recalibrate"):
        validate(make_cfg("finetune=bn", "finetune.bn_recalibrate=-1"))
    with pytest.raises(ConfigError, match="model.bn_recalibrate"):
        validate(make_cfg("model.bn_recalibrate=1.5"))
    validate(make_cfg("finetune=short", "finetune.bn_recalibrate=100"))
    cfg = make_cfg("schedule=multistage", "schedule.stages=2", "schedule.finetune_epochs=1", "finetune=short",
                   "finetune.bn_recalibrate=100")
    assert stage_recipe(cfg).epochs == 1


def test_a_model_without_batchnorm_says_so(make_cfg, tmp_path):
    rec = run(make_cfg("finetune=bn", "sparsity=0.8"), tmp_path / "run")
    m = rec["metrics"]
    assert m["bn_examples"] == 0 and m["finetuned_acc"] == m["pruned_acc"] == m["final_acc"]
    assert any("no BatchNorm layer" in w for w in rec["warnings"])


def test_resnet20b_pruned_by_magnitude_recovers(shared_data, make_cfg, tmp_path):
    ckpt = shared_file(shared_data, "resnet20b-cifar10-woodfisher.pth.tar")
    root = shared_file(shared_data, "cifar10-train-prefix")
    cfg = make_cfg("model=resnet20b", "dataset=cifar10", "dataset.verify_checksums=false", f"paths.data_dir={root}",
                   f"model.checkpoint={ckpt}", "method=magnitude", "sparsity=0.8", "finetune=bn",
                   "finetune.bn_recalibrate=2000")
    rec = run(cfg, tmp_path / "run")
    m = rec["metrics"]
    # measured: 50.9 % right after pruning, 83 % after re-estimating on 3,728 images (dev data)
    assert m["bn_examples"] == 2000 and m["final_acc"] == m["finetuned_acc"]
    assert m["pruned_acc"] < 0.6 and m["finetuned_acc"] > m["pruned_acc"] + 0.15
    assert m["sparsity_prunable"] == pytest.approx(0.8, abs=1e-4)


def test_dense_statistics_re_estimated_before_pruning(shared_data, make_cfg, tmp_path):
    """CHITA's ResNet-20 preprocessing: WoodFisher's CIFAR statistics (which this checkpoint was not
    trained with), then BatchNorm re-estimated on the training images; the same dense model for
    every run seed."""
    ckpt = shared_file(shared_data, "resnet20b-cifar10-woodfisher.pth.tar")
    root = shared_file(shared_data, "cifar10-train-prefix")
    wf = ["model.normalize.mean=[0.4914,0.4822,0.4465]", "model.normalize.std=[0.2023,0.1994,0.2010]"]
    common = ["model=resnet20b", "dataset=cifar10", "dataset.verify_checksums=false", f"paths.data_dir={root}",
              f"model.checkpoint={ckpt}", "method=magnitude", "sparsity=0.0", *wf]
    plain = run(make_cfg(*common), tmp_path / "plain")["metrics"]
    fixed = [run(make_cfg(*common, "model.bn_recalibrate=2000", f"seed={s}"), tmp_path / f"bn{s}")["metrics"]
             for s in (0, 1)]
    # measured here: 56.8 % with the wrong statistics as loaded, about 97 % once re-estimated
    assert plain["dense_acc"] < 0.7 and fixed[0]["dense_acc"] > 0.9
    assert fixed[0]["dense_bn_examples"] == 2000 and fixed[0]["dense_acc"] == fixed[1]["dense_acc"]


def test_a_resumed_run_does_not_re_estimate_the_dense_model(make_cfg, tmp_path, monkeypatch):
    """The saved state replaces the model after setup: its warning is in the record once, not twice."""
    from tests.test_integrity import _interrupted_state

    cfg = make_cfg("model.bn_recalibrate=100", "sparsity=0.8")
    _interrupted_state(cfg, tmp_path / "run", "prune", monkeypatch)
    rec = run(cfg, tmp_path / "run")
    assert rec["resumed_from"] == "prune" and rec["status"] == "completed"
    assert [w for w in rec["warnings"] if "no BatchNorm layer" in w] == [
        "model.bn_recalibrate=100: model mlp has no BatchNorm layer, nothing was re-estimated"]
