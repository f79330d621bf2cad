"""Zoo configs (issue 3): every conf/model and conf/dataset option composes and is well formed,
the dense recipes parse (lr schedules included), and task=train saves a checkpoint that a
pruning run then loads through model.checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf

from pruning.config import group_options
from pruning.data import build_dataset
from pruning.errors import ConfigError
from pruning.task import run
from pruning.train import TrainConfig, make_scheduler, train_config

REAL_DATASETS = ("mnist", "cifar10", "cifar100", "imagenet")


@pytest.mark.parametrize("name", group_options("model"))
def test_model_option_composes_with_a_valid_recipe(name):
    dataset = {"mlp": "digits", "mlpnet": "mnist", "mobilenetv1": "imagenet", "mobilenetv2": "imagenet",
               "resnet50": "imagenet"}.get(name, "cifar10")
    cfg = compose_config([f"model={name}", f"dataset={dataset}"])
    m = cfg.model
    assert m.name == name and m.checkpoint is None and m.prunable is None
    tc = train_config(OmegaConf.to_container(m.train, resolve=True), "model.train")
    assert tc.epochs > 0 and tc.lr > 0
    if tc.lr_schedule == "step":
        assert max(tc.milestones) < tc.epochs


@pytest.mark.parametrize("name", group_options("dataset"))
def test_dataset_option_composes(name, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNING_DATA_DIR", str(tmp_path))
    cfg = compose_config([f"dataset={name}"])
    assert cfg.dataset.name == name and int(cfg.dataset.batch_size) > 0
    assert cfg.paths.data_dir == str(tmp_path)
    if name in REAL_DATASETS:  # nothing on disk here: a one-line error that says what to do
        assert cfg.dataset.get("download", False) is False
        with pytest.raises(ConfigError, match=rf"dataset='{name}'.*(not found|no images).*{tmp_path}"):
            build_dataset(cfg.dataset, cfg.paths.data_dir)
    else:
        data = build_dataset(cfg.dataset, cfg.paths.data_dir)
        assert len(data.train) > 0 and len(data.test) > 0


def test_recipe_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.train.lr_schedule='linear'"):
        train_config({"lr_schedule": "linear"}, "model.train")
    with pytest.raises(ConfigError, match=r"model.train.milestones=\[\]"):
        train_config({"lr_schedule": "step", "epochs": 10}, "model.train")
    with pytest.raises(ConfigError, match="model.train.schedule"):
        train_config({"schedule": "cosine"}, "model.train")


def lrs(tc: TrainConfig) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=tc.lr)
    sched = make_scheduler(opt, tc)
    out = []
    for _ in range(tc.epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_lr_schedules():
    step = lrs(train_config({"epochs": 6, "lr": 0.1, "lr_schedule": "step", "milestones": [2, 4], "gamma": 0.1},
                            "t"))
    assert step == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    cos = lrs(train_config({"epochs": 4, "lr": 1.0, "lr_schedule": "cosine"}, "t"))
    assert cos == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])
    warm = lrs(train_config({"epochs": 4, "lr": 1.0, "lr_schedule": "cosine", "warmup_epochs": 2}, "t"))
    assert warm == pytest.approx([0.5, 1.0, 1.0, 0.5])
    assert lrs(train_config({"epochs": 3, "lr": 0.2}, "t")) == pytest.approx([0.2] * 3)


def test_train_task_saves_checkpoint_that_prune_loads(make_cfg, tmp_path, capsys):
    data = ["dataset=synthetic", "dataset.num_train=64", "dataset.num_test=32", "dataset.shape=[3,16,16]"]
    recipe = ["model.train.epochs=2", "model.train.batch_size=32", "model.train.lr_schedule=cosine"]
    train_dir = tmp_path / "train"
    rec = run(make_cfg("task=train", "model=resnet20", *data, *recipe), train_dir)
    ckpt = train_dir / "checkpoint.pt"
    assert rec["status"] == "completed" and ckpt.is_file() and rec["metrics"]["checkpoint"] == str(ckpt)
    lrs_logged = [json.loads(line).get("lr") for line in (train_dir / "metrics.jsonl").read_text().splitlines()]
    assert [lr for lr in lrs_logged if lr is not None] == pytest.approx([0.1, 0.05])
    capsys.readouterr()

    pruned = run(make_cfg("model=resnet20", *data, f"model.checkpoint={ckpt}", "sparsity=0.5"), tmp_path / "prune")
    assert "loaded dense weights" in capsys.readouterr().out
    assert pruned["metrics"]["dense_acc"] == pytest.approx(rec["metrics"]["dense_acc"])
    assert pruned["metrics"]["numel_prunable"] == 267_264  # ResNet-20's default set: the 18 block convs
    assert pruned["metrics"]["sparsity_prunable"] == pytest.approx(0.5, abs=1e-3)
