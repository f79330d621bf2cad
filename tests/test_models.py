"""Model zoo (issue 3): every model builds, runs forward and backward, has its documented parameter
counts and prunable set; the public CIFAR ResNet checkpoints load strictly; load_weights errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torchvision
from torch.utils.data import TensorDataset

from pruning.config import group_options
from pruning.data import DataBundle
from pruning.errors import ConfigError
from pruning.layout import make_layout
from pruning.models import available, build_model, load_weights
from pruning.models.resnet_cifar import ZeroPadShortcut

AKAMASTER_MEAN, AKAMASTER_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def bundle(shape: tuple[int, ...], num_classes: int) -> DataBundle:
    """Metadata of a data set with these inputs; models only read shape, classes and statistics."""
    ds = TensorDataset(torch.zeros(1, *shape), torch.zeros(1, dtype=torch.long))
    c = shape[0] if len(shape) == 3 else 1
    return DataBundle(name=f"test{shape}", train=ds, test=ds, calib=ds, input_shape=shape, num_classes=num_classes,
                      mean=(0.5,) * c, std=(0.25,) * c)


CIFAR, MNIST, IMAGENET = (3, 32, 32), (1, 28, 28), (3, 224, 224)

# name: (data shape, classes, parameters of the network, prunable weights by default, test resolution)
# Counts are exact; they follow from the architecture definitions (see conf/model/<name>.yaml):
# e.g. ResNet-20 = 18 block convs (267,264) + stem 432 + BN 1,376 + linear 650.
# Every model ends in global average pooling, so ImageNet models are tested at 64x64 (total
# stride 32: every layer still runs, on a 2x2 final map); 224x224 is checked for MobileNetV1.
ZOO = {
    "mlpnet": (MNIST, 10, 32_360, 32_360, 28),
    "resnet20": (CIFAR, 10, 269_722, 267_264, 32),
    "resnet20b": (CIFAR, 10, 272_474, 267_264, 32),  # + 2 x (1x1 conv + BN): 512+64 + 2,048+128
    "resnet32": (CIFAR, 10, 464_154, 460_800, 32),
    "resnet56": (CIFAR, 10, 853_018, 847_872, 32),
    "vgg16": (CIFAR, 10, 14_728_266, 14_715_584, 32),
    "wrn28_10": (CIFAR, 10, 36_479_194, 36_461_232, 32),
    "mobilenetv1": (IMAGENET, 1000, 4_231_976, 4_209_088, 64),
    "mobilenetv2": (IMAGENET, 1000, 3_504_872, 3_469_760, 64),
    "resnet50": (IMAGENET, 1000, 25_557_032, 25_502_912, 64),
}


def test_zoo_covers_registry_and_conf():
    assert set(ZOO) | {"mlp"} == set(available()) == set(group_options("model"))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_model_parameter_counts(name):
    shape, classes, n_params, n_prunable, _ = ZOO[name]
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_model({"name": name}, bundle(shape, classes))
    assert sum(p.numel() for p in model.net.parameters()) == n_params
    layout = make_layout(model)
    assert layout.numel == n_prunable
    assert all(n.startswith("net.") and n.endswith(".weight") for n in layout.names)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_model_forward_backward(name):
    shape, classes, _, _, res = ZOO[name]
    torch.manual_seed(0)
    model = build_model({"name": name}, bundle(shape, classes))
    layout = make_layout(model)
    x = torch.rand(2, shape[0], res, res) if len(shape) == 3 else torch.rand(2, *shape)
    out = model(x)
    assert out.shape == (2, classes) and torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    params = dict(model.named_parameters())
    for n in layout.names:
        assert params[n].grad is not None and torch.isfinite(params[n].grad).all(), n
    assert any(float(params[n].grad.abs().sum()) > 0 for n in layout.names)


def test_mobilenetv1_at_full_resolution():
    model = build_model({"name": "mobilenetv1"}, bundle(IMAGENET, 1000)).eval()
    with torch.no_grad():
        assert model(torch.rand(1, *IMAGENET)).shape == (1, 1000)


def test_cifar100_heads():
    for name, n_params in (("resnet20", 275_572), ("vgg16", 14_774_436), ("wrn28_10", 36_536_884)):
        with torch.device("meta"):
            model = build_model({"name": name}, bundle(CIFAR, 100))
        assert sum(p.numel() for p in model.net.parameters()) == n_params


def test_resnet20_default_prunable_set_is_the_18_block_convs():
    layout = make_layout(build_model({"name": "resnet20"}, bundle(CIFAR, 10)))
    expected = [f"net.layer{s}.{b}.conv{c}.weight" for s in (1, 2, 3) for b in (0, 1, 2) for c in (1, 2)]
    assert list(layout.names) == expected
    assert all(shape[2:] == (3, 3) for shape in layout.shapes)


def test_option_b_resnet20_projects_shortcuts_and_prunes_only_the_block_convs():
    model = build_model({"name": "resnet20b"}, bundle(CIFAR, 10))
    a = make_layout(build_model({"name": "resnet20"}, bundle(CIFAR, 10)))
    assert list(make_layout(model).names) == list(a.names)  # not the 1x1 shortcut convs, stem or linear
    blocks = [b for stage in (model.net.layer1, model.net.layer2, model.net.layer3) for b in stage]
    projections = [b.shortcut for b in blocks if not isinstance(b.shortcut, torch.nn.Identity)]
    assert len(projections) == 2
    for proj, (cin, cout) in zip(projections, ((16, 32), (32, 64))):
        conv, bn = proj
        assert conv.weight.shape == (cout, cin, 1, 1) and conv.stride == (2, 2) and conv.bias is None
        assert isinstance(bn, torch.nn.BatchNorm2d) and bn.num_features == cout
    x = torch.randn(2, 16, 8, 8)
    block = blocks[3].eval()  # layer2.0: out = relu(bn2(conv2(relu(bn1(conv1 x)))) + bn(conv1x1 x))
    with torch.no_grad():
        main = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
        short = block.shortcut[1](torch.nn.functional.conv2d(x, block.shortcut[0].weight, stride=2))
        assert torch.allclose(block(x), torch.relu(main + short))


def test_prunable_glob_override_gives_chita_set():
    model = build_model({"name": "resnet20"}, bundle(CIFAR, 10))
    layout = make_layout(model, ["net.conv1.weight", "net.layer*.conv*.weight", "net.linear.weight"])
    assert layout.numel == 268_336 and len(layout.names) == 20


def test_mlpnet_layers_have_no_bias():
    model = build_model({"name": "mlpnet"}, bundle(MNIST, 10))
    assert [n for n, _ in model.net.named_parameters()] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert [tuple(p.shape) for p in model.net.parameters()] == [(40, 784), (20, 40), (10, 20)]


def test_torchvision_models_keep_torchvision_parameter_names():
    for name, ref in (("resnet50", torchvision.models.resnet50), ("mobilenetv2", torchvision.models.mobilenet_v2)):
        with torch.device("meta"):
            ours = build_model({"name": name}, bundle(IMAGENET, 1000)).net.state_dict()
            theirs = ref(weights=None).state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_mobilenetv1_uses_str_woodfisher_names():
    with torch.device("meta"):
        net = build_model({"name": "mobilenetv1"}, bundle(IMAGENET, 1000)).net
    names = [n for n, _ in net.named_parameters()]
    convs = [n for n in names if n.endswith(".weight") and n.count(".") == 3 and n.split(".")[2] in ("0", "3")]
    assert convs[0] == "model.0.0.weight" and convs[-1] == "model.13.3.weight" and len(convs) == 27
    assert names[-2:] == ["fc.weight", "fc.bias"]


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    y = ZeroPadShortcut(16, 32, 2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()
    # no parameters, so the public checkpoints have no shortcut keys
    assert not list(ZeroPadShortcut(16, 32, 2).parameters())


def test_model_normalize_overrides_dataset_statistics():
    model = build_model({"name": "resnet20", "normalize": {"mean": AKAMASTER_MEAN, "std": AKAMASTER_STD}},
                        bundle(CIFAR, 10))
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor(AKAMASTER_MEAN))
    assert torch.allclose(model.normalize.std.flatten(), torch.tensor(AKAMASTER_STD))
    with pytest.raises(ConfigError, match="model.normalize"):
        build_model({"name": "resnet20", "normalize": {"mean": [0.5], "std": [0.2]}}, bundle(CIFAR, 10))


def test_build_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"model='resnet21'.*resnet20"):
        build_model({"name": "resnet21"}, bundle(CIFAR, 10))
    with pytest.raises(ConfigError, match=r"dataset=.*input shape \(64,\).*model=resnet20"):
        build_model({"name": "resnet20"}, bundle((64,), 10))
    with pytest.raises(ConfigError, match="model.depth"):
        build_model({"name": "wrn28_10", "depth": 27}, bundle(CIFAR, 10))
    with pytest.raises(ConfigError, match="RGB"):
        build_model({"name": "resnet50"}, bundle(MNIST, 10))


@pytest.mark.parametrize("name,file,best", [
    ("resnet20", "resnet20-cifar10-12fca82f.th", 91.78),
    ("resnet56", "resnet56-cifar10-4bfd9763.th", 93.62),
])
def test_public_cifar_resnet_checkpoint_loads_strictly(shared_data: Path, name, file, best):
    path = shared_data / file
    if not path.is_file():
        pytest.skip(f"{path} is absent (public akamaster checkpoint; see ../shared/data/README.md)")
    model = build_model({"name": name, "normalize": {"mean": AKAMASTER_MEAN, "std": AKAMASTER_STD}},
                        bundle(CIFAR, 10))
    extra = load_weights(model, path)
    assert extra["best_prec1"] == pytest.approx(best, abs=0.01)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    ours = model.net.state_dict()
    stripped = {k.removeprefix("module."): v for k, v in ckpt.items()}
    # every tensor of the network came from the file, and the file has nothing we did not use
    assert set(stripped) == {k for k in ours if not k.endswith("num_batches_tracked")}
    assert all(torch.equal(ours[k], v) for k, v in stripped.items())
    model.eval()
    with torch.no_grad():
        logits = model(torch.rand(8, *CIFAR, generator=torch.Generator().manual_seed(0)))
    assert logits.shape == (8, 10) and torch.isfinite(logits).all()
    assert logits.std() > 0


def test_woodfisher_option_b_checkpoint_loads_strictly(shared_data: Path):
    path = shared_data / "resnet20b-cifar10-woodfisher.pth.tar"
    if not path.is_file():
        pytest.skip(f"{path} is absent (WoodFisher's option-B ResNet-20; see ../shared/data/README.md)")
    model = build_model({"name": "resnet20b"}, bundle(CIFAR, 10))
    extra = load_weights(model, path)
    assert extra["best_top1"] == pytest.approx(91.96) and extra["arch"] == "resnet20_cifar"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    ours = model.net.state_dict()
    renamed = {k.removeprefix("module.").replace(".downsample.", ".shortcut.").replace("fc.", "linear."): v
               for k, v in ckpt.items()}
    assert set(renamed) == set(ours) and all(torch.equal(ours[k], v) for k, v in renamed.items())


def test_load_weights_rejects_missing_path(tmp_path):
    model = build_model({"name": "resnet20"}, bundle(CIFAR, 10))
    with pytest.raises(ConfigError, match="model.checkpoint") as err:
        load_weights(model, tmp_path / "nope.pt")
    assert "does not exist" in str(err.value)


def test_load_weights_rejects_checkpoint_of_another_model(tmp_path):
    path = tmp_path / "r20.pt"
    torch.save(build_model({"name": "resnet20"}, bundle(CIFAR, 10)).net.state_dict(), path)
    with pytest.raises(ConfigError, match=r"model.checkpoint.*does not fit.*missing layer1\.3"):
        load_weights(build_model({"name": "resnet32"}, bundle(CIFAR, 10)), path)
    with pytest.raises(ConfigError, match=r"shape mismatch linear.weight \(10, 64\) vs \(100, 64\)"):
        load_weights(build_model({"name": "resnet20"}, bundle(CIFAR, 100)), path)


def test_load_weights_round_trips_classifier_and_wrapped_net_state(tmp_path):
    torch.manual_seed(1)
    src = build_model({"name": "resnet32"}, bundle(CIFAR, 10))
    torch.save(src.state_dict(), tmp_path / "classifier.pt")
    wrapped = {"state_dict": {f"module.{k}": v for k, v in src.net.state_dict().items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "wrapped.pt")
    for file, extra in (("classifier.pt", {}), ("wrapped.pt", {"epoch": 3})):
        torch.manual_seed(2)
        dst = build_model({"name": "resnet32"}, bundle(CIFAR, 10))
        assert load_weights(dst, tmp_path / file) == extra
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_build_is_deterministic_under_a_seed():
    data = bundle(CIFAR, 10)
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        states.append(build_model({"name": "resnet20"}, data).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert dataclasses.is_dataclass(data)
