"""Published checkpoints load as published, safely (issue 13, item 1).

- the reference key layouts (WoodFisher's masked MLPNet, Distiller's option-B ResNet-20, `fc` vs
  `linear`) load into this project's models from hand-written files holding objects of classes
  this code base does not know, masks applied;
- a file that would run code when unpickled runs nothing (no call, no import);
- a bad `model.checkpoint` is one line naming the file, exit 2, a `failed` record;
- the real shared files score their accuracy through the project's own data path.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import subprocess
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from torch.utils.data import TensorDataset

from pruning.data import DataBundle
from pruning.errors import ConfigError
from pruning.models import build_model, load_weights
from pruning.models.checkpoints import Placeholder, safe_torch_load
from pruning.task import run

SET_STATE_CALLS: list[object] = []
CIFAR, MNIST = (3, 32, 32), (1, 28, 28)


def bundle(shape: tuple[int, ...], num_classes: int) -> DataBundle:
    """Metadata of a data set with these inputs (as in test_models.py)."""
    ds = TensorDataset(torch.zeros(1, *shape), torch.zeros(1, dtype=torch.long))
    c = shape[0] if len(shape) == 3 else 1
    return DataBundle(name=f"test{shape}", train=ds, test=ds, calib=ds, input_shape=shape,
                      num_classes=num_classes, mean=(0.5,) * c, std=(0.25,) * c)


class ModelConfig:
    """Stands for a config class of a reference code base: unknown to the loader."""

    def __init__(self, arch: str):
        self.arch, self.dataset = arch, "mnist"

    def __setstate__(self, state: dict) -> None:  # must never run while loading
        SET_STATE_CALLS.append(state)
        self.__dict__.update(state)


def save(obj: object, path: Path, legacy: bool = False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


# ---------------------------------------------------------------- reference layouts


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_woodfisher_masked_mlpnet_layout_loads_with_masks_applied(tmp_path, legacy):
    g = torch.Generator().manual_seed(0)
    shapes = {"fc1": (40, 784), "fc2": (20, 40), "fc3": (10, 20)}
    weights = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    masks = {k: (torch.rand(*s, generator=g) < 0.7).float() for k, s in shapes.items()}
    state = OrderedDict()
    for k in shapes:  # the reference order: mask first, then the wrapped layer's weight
        state[f"module.{k}._weight_mask"] = masks[k]
        state[f"module.{k}._layer.weight"] = weights[k]
    file = {"epoch": 24, "model_config": ModelConfig("mlpnet"), "model_state_dict": state,
            "optimizer": {"type": torch.optim.SGD, "state_dict": {"param_groups": [{"lr": 0.01}]}},
            "lr_scheduler": torch.optim.lr_scheduler.ExponentialLR(
                torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), gamma=0.9)}
    path = save(file, tmp_path / "mlpnet.ckpt", legacy)
    with pytest.raises(pickle.UnpicklingError):  # what the project could not read before
        torch.load(path, map_location="cpu", weights_only=True)

    model = build_model({"name": "mlpnet"}, bundle(MNIST, 10))
    extra = load_weights(model, path)
    for k in shapes:
        w = weights[k]
        expected = torch.tensor([[w[i, j] if masks[k][i, j] else 0.0 for j in range(w.shape[1])]
                                 for i in range(w.shape[0])])  # element by element
        assert torch.equal(getattr(model.net, k).weight.detach(), expected), k
    assert not SET_STATE_CALLS
    config = extra["model_config"]
    assert isinstance(config, Placeholder) and not isinstance(config, ModelConfig)
    assert config.origin.endswith("ModelConfig") and config.state == {"arch": "mlpnet", "dataset": "mnist"}
    assert extra["epoch"] == 24 and isinstance(extra["optimizer"]["type"], type)
    assert isinstance(extra["lr_scheduler"], Placeholder)


def distiller_state(net: torch.nn.Module, classifier: str = "fc") -> OrderedDict:
    """`net`'s state dict in Distiller's layout: DataParallel prefix, `downsample`, classifier `fc`."""
    out = OrderedDict()
    for k, v in net.state_dict().items():
        k = k.replace(".shortcut.", ".downsample.")
        if k.startswith("linear."):
            k = classifier + k[len("linear"):]
        out["module." + k] = v.clone()
    return out


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor of the network random (BN statistics too), so a mis-mapped key cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in model.net.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.rand(v.shape, generator=g) + 0.5 if k.endswith("running_var") else
                        torch.randn(v.shape, generator=g))
    return model


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_distiller_option_b_resnet20_layout_loads(tmp_path, legacy):
    src = randomised(build_model({"name": "resnet20b"}, bundle(CIFAR, 10)), 1)
    state = distiller_state(src.net)
    assert "module.layer2.0.downsample.0.weight" in state and "module.fc.weight" in state
    file = {"epoch": 136, "arch": "resnet20_cifar", "state_dict": state, "best_top1": 91.96,
            "compression_sched": {"masks_dict": {}, "parallel_model": ModelConfig("resnet20")}}
    path = save(file, tmp_path / "resnet20b.pth.tar", legacy)

    dst = build_model({"name": "resnet20b"}, bundle(CIFAR, 10))
    extra = load_weights(dst, path)
    ours = dst.net.state_dict()
    assert set(ours) == {k.removeprefix("module.").replace("downsample", "shortcut").replace("fc.", "linear.")
                         for k in state}
    assert all(torch.equal(ours[k], v) for k, v in src.net.state_dict().items())
    assert extra["best_top1"] == 91.96
    assert isinstance(extra["compression_sched"]["parallel_model"], Placeholder)
    x = torch.rand(4, *CIFAR, generator=torch.Generator().manual_seed(2))
    src.eval(), dst.eval()
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_fc_classifier_loads_into_linear_option_a_resnet(tmp_path):
    src = randomised(build_model({"name": "resnet20"}, bundle(CIFAR, 10)), 3)
    path = save({"state_dict": distiller_state(src.net, "fc")}, tmp_path / "r20.pth")
    dst = build_model({"name": "resnet20"}, bundle(CIFAR, 10))
    load_weights(dst, path)
    assert torch.equal(dst.net.linear.weight, src.net.linear.weight)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_layout_that_does_not_fit_is_one_line_listing_keys(tmp_path):
    option_b = save({"state_dict": distiller_state(build_model({"name": "resnet20b"}, bundle(CIFAR, 10)).net)},
                    tmp_path / "b.pth")
    with pytest.raises(ConfigError) as err:
        load_weights(build_model({"name": "resnet20"}, bundle(CIFAR, 10)), option_b)
    msg = str(err.value)
    assert "\n" not in msg and "does not fit" in msg and str(option_b) in msg
    assert "unexpected layer2.0.downsample.0.weight" in msg and "(12 in all)" in msg
    option_a = save(build_model({"name": "resnet20"}, bundle(CIFAR, 10)).net.state_dict(), tmp_path / "a.pt")
    with pytest.raises(ConfigError, match=r"missing layer2\.0\.shortcut\.0\.weight"):
        load_weights(build_model({"name": "resnet20b"}, bundle(CIFAR, 10)), option_a)


# ---------------------------------------------------------------- nothing in a file executes


def payloads(marker: Path) -> dict[str, object]:
    """Objects whose unpickling would create `marker` through a different callable each."""

    class System:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    class Exec:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    class Touch:
        def __reduce__(self):
            return pathlib.Path.touch, (marker,)

    class Popen:
        def __reduce__(self):
            return subprocess.Popen, (["touch", str(marker)],)

    return {"os.system": System(), "builtins.exec": Exec(), "pathlib.Path.touch": Touch(),
            "subprocess.Popen": Popen()}


def test_payloads_do_run_under_plain_unpickling(tmp_path):
    """Control for the test below: unpickled without restrictions, each payload creates its marker."""
    for name in payloads(tmp_path / "unused"):
        marker = tmp_path / f"marker-{name}"
        path = save({"config": payloads(marker)[name]}, tmp_path / f"{name}.ckpt")
        out = torch.load(path, weights_only=False)["config"]
        if isinstance(out, subprocess.Popen):
            out.wait(timeout=60)
        assert marker.exists(), name


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("where", ["extra", "state"])
def test_file_that_would_run_code_runs_nothing(tmp_path, legacy, where):
    marker = tmp_path / "marker"
    net = build_model({"name": "mlpnet"}, bundle(MNIST, 10)).net
    for name, payload in payloads(marker).items():
        state = {f"module.{k}": v for k, v in net.state_dict().items()}
        file = {"state_dict": state, "config": payload}
        if where == "state":  # the payload among the tensors: not a state dict, so a one-line error
            state["fc1.evil"] = payload
        path = save(file, tmp_path / f"{name}.ckpt", legacy)
        model = build_model({"name": "mlpnet"}, bundle(MNIST, 10))
        if where == "state":
            with pytest.raises(ConfigError, match="holds something else"):
                load_weights(model, path)
        else:
            extra = load_weights(model, path)
            assert isinstance(extra["config"], Placeholder), name  # holding what it would have run
            assert extra["config"].args and not marker.exists()
            assert torch.equal(model.net.fc1.weight, net.fc1.weight)
        assert not marker.exists(), f"{name} ran"


def test_parameters_rebuild_in_the_restricted_path(tmp_path):
    net = build_model({"name": "mlpnet"}, bundle(MNIST, 10)).net
    params = {f"module.{k}": torch.nn.Parameter(v.clone()) for k, v in net.state_dict().items()}
    path = save({"state_dict": params, "model_config": ModelConfig("mlpnet")}, tmp_path / "p.ckpt")
    w = safe_torch_load(path)["state_dict"]["module.fc1.weight"]
    assert isinstance(w, torch.nn.Parameter) and not w._backward_hooks and torch.equal(w, net.fc1.weight)
    model = build_model({"name": "mlpnet"}, bundle(MNIST, 10))
    load_weights(model, path)
    assert all(torch.equal(a, b) for a, b in zip(model.net.state_dict().values(), net.state_dict().values()))


class AttrDict(dict):
    """A dict subclass as reference code bases use for configs."""


class Milestones(list):
    pass


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_placeholders_keep_contents_of_unknown_containers_and_plain_values(tmp_path, legacy):
    config = AttrDict(arch="resnet20_cifar", lr=0.1)
    path = save({"state_dict": {"w": torch.ones(2, dtype=torch.float16)}, "config": config,
                 "milestones": Milestones([100, 150]), "meta": ModelConfig("x"),
                 "plain": {"dtype": torch.float64, "device": torch.device("cpu"), "size": torch.Size([2, 3]),
                           "bytes": b"\x00\xff", "set": {1, 2}, "complex": 1 + 2j}}, tmp_path / "c.pt", legacy)
    blob = safe_torch_load(path)
    assert isinstance(blob["config"], Placeholder) and blob["config"].items == {"arch": "resnet20_cifar", "lr": 0.1}
    assert blob["milestones"].values == [100, 150] and blob["meta"].state == {"arch": "x", "dataset": "mnist"}
    assert blob["plain"] == {"dtype": torch.float64, "device": torch.device("cpu"), "size": torch.Size([2, 3]),
                             "bytes": b"\x00\xff", "set": {1, 2}, "complex": 1 + 2j}
    assert torch.equal(blob["state_dict"]["w"], torch.ones(2, dtype=torch.float16)) and not SET_STATE_CALLS


def test_restricted_unpickler_imports_no_module(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    module_dir = tmp_path / "mods"
    module_dir.mkdir()
    # importing this module would create the marker
    (module_dir / "woodfisher_like_config.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Config:\n    pass\n")
    monkeypatch.syspath_prepend(str(module_dir))
    fake = types.ModuleType("woodfisher_like_config")  # stands in for it while saving
    cls = type("Config", (), {"__module__": "woodfisher_like_config"})
    fake.Config = cls
    monkeypatch.setitem(sys.modules, "woodfisher_like_config", fake)
    net = build_model({"name": "mlpnet"}, bundle(MNIST, 10)).net
    path = save({"state_dict": net.state_dict(), "model_config": cls()}, tmp_path / "c.ckpt")
    monkeypatch.delitem(sys.modules, "woodfisher_like_config")

    extra = load_weights(build_model({"name": "mlpnet"}, bundle(MNIST, 10)), path)
    assert extra["model_config"].origin == "woodfisher_like_config.Config"
    assert "woodfisher_like_config" not in sys.modules and not marker.exists()


# ---------------------------------------------------------------- one line for a bad file


def bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name: (path, what the one-line error says)."""
    good = tmp_path / "good.pt"
    torch.save(build_model({"name": "mlp"}, bundle((64,), 10)).state_dict(), good)
    data = good.read_bytes()
    d = tmp_path / "bad"
    d.mkdir()
    (d / "empty.pt").write_bytes(b"")
    (d / "truncated.pt").write_bytes(data[: len(data) // 2])
    (d / "text.pt").write_text("epoch: 25\naccuracy: 93.97\n")
    (d / "directory.pt").mkdir()
    torch.save({"epoch": 3, "best_prec1": 91.0}, d / "no_state.pt")
    legacy = tmp_path / "legacy.pt"  # the pre-1.6 format (a bare pickle stream), as old checkpoints are
    torch.save(build_model({"name": "mlp"}, bundle((64,), 10)).state_dict(), legacy, _use_new_zipfile_serialization=False)
    (d / "truncated_legacy.pt").write_bytes(legacy.read_bytes()[: legacy.stat().st_size // 2])
    return {"empty": (d / "empty.pt", "is empty"),
            "truncated": (d / "truncated.pt", "is truncated"),
            "truncated_legacy": (d / "truncated_legacy.pt", "is truncated"),
            "text": (d / "text.pt", "is not a PyTorch checkpoint"),
            "directory": (d / "directory.pt", "is a directory"),
            "missing": (d / "missing.pt", "does not exist"),
            "not_a_checkpoint": (d / "no_state.pt", "holds something else")}


def test_bad_files_are_one_line_config_errors(tmp_path):
    for name, (path, what) in bad_files(tmp_path).items():
        with pytest.raises(ConfigError) as err:
            load_weights(build_model({"name": "mlp"}, bundle((64,), 10)), path)
        msg = str(err.value)
        assert msg.startswith(f"model.checkpoint='{path}'") and what in msg and "\n" not in msg, name


@pytest.mark.parametrize("name", ["empty", "truncated", "text", "directory", "not_a_checkpoint"])
def test_bad_file_on_the_command_line(tmp_path, name):
    path, what = bad_files(tmp_path)[name]
    env = {**os.environ, "PRUNING_OUT_DIR": str(tmp_path / "out"), "PRUNING_DATA_DIR": str(tmp_path / "data"),
           "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "progress=false", f"model.checkpoint={path}"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(path) in lines[0] and what in lines[0], proc.stderr
    rec = json.loads(next((tmp_path / "out").rglob("result.json")).read_text())
    assert rec["status"] == "failed" and what in rec["error"]


# ---------------------------------------------------------------- the real shared files


def shared_file(shared_data: Path, *parts: str) -> Path:
    path = shared_data.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (see ../shared/data/README.md)")
    return path


def test_woodfisher_mlpnet_checkpoint_scores_on_mnist(shared_data, make_cfg, tmp_path):
    ckpt = shared_file(shared_data, "mlpnet-mnist-woodfisher-93.97.ckpt")
    root = shared_file(shared_data, "mnist-train-prefix")
    cfg = make_cfg("model=mlpnet", "dataset=mnist", f"paths.data_dir={root}", f"model.checkpoint={ckpt}",
                   "method=magnitude", "sparsity=0.0")
    rec = run(cfg, tmp_path / "run")
    # 2,262 official *training* images read as the t10k split (the checkpoint trained on them). The
    # network is small and barely fits: 93.8% here (94.5% on the 12,000 of the train split) vs 93.97%
    # on the official test set, with the reference's normalisation (0.1307, 0.3081); with none, 90.8%.
    assert rec["status"] == "completed" and rec["metrics"]["numel_prunable"] == 32_360
    assert rec["metrics"]["dense_acc"] >= 0.93
    assert rec["metrics"]["final_acc"] == rec["metrics"]["dense_acc"]


def test_woodfisher_resnet20b_checkpoint_scores_on_cifar10(shared_data, make_cfg, tmp_path):
    ckpt = shared_file(shared_data, "resnet20b-cifar10-woodfisher.pth.tar")
    root = shared_file(shared_data, "cifar10-train-prefix")
    cfg = make_cfg("model=resnet20b", "dataset=cifar10", "dataset.verify_checksums=false",
                   f"paths.data_dir={root}", f"model.checkpoint={ckpt}", "method=magnitude", "sparsity=0.0")
    rec = run(cfg, tmp_path / "run")
    # 932 training images (inflated accuracy); the model's normalisation (mean = std = 0.5) matters:
    # 98.5% with it, 56.8% with the WoodFisher loader's CIFAR statistics (conf/model/resnet20b.yaml)
    assert rec["status"] == "completed" and rec["metrics"]["numel_prunable"] == 267_264
    assert rec["metrics"]["dense_acc"] >= 0.95
