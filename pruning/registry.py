"""The one registry: every method, noise model, model and dataset, by the key a config selects it with
(`method=<key>`, `noise=<key>`, `model=<key>`, `dataset=<key>`; one conf/<group>/<key>.yaml each,
which tests/test_registry.py checks).

Methods (`METHODS`: config class, entry point, kind, whether the run computes G for it):
  magnitude   weights  -  global or layer-wise magnitude pruning (baseline)
  woodfisher  weights  G  WoodFisher: block empirical-Fisher OBS (Singh & Alistarh, NeurIPS 2020)
  cbs         weights  G  Combinatorial Brain Surgeon (Yu et al., ICML 2022)
  lr          weights  G  CHITA-style sparse linear regression by IHT (Benbaki et al., ICML 2023)
  swap        weights  G  SWAP: entropic Wasserstein regression (You & Cheng, ICLR 2024)
  gfs         train    -  Greedy Forward Selection (Ye et al., ICML 2020)
  grda        train    -  gRDA directional pruning (Chao et al., NeurIPS 2020)
  sdprun      train    -  structured directional pruning (Li et al., 2021)

Noise models (`NOISE`: config class, `build(cfg) -> NoiseModel`):
  none         no perturbation
  gradient     noise on the rows of G: SWAP's entry noise (You & Cheng, ICLR 2024) or outlier
               samples (pruning/noise/gradient.py)
  analog       phase-change-memory weight perturbation: programming noise, drift, read noise
               (Nandakumar et al., ICECS 2019; aihwkit PCMLikeNoiseModel) (pruning/noise/analog.py)
  adversarial  FGSM (Goodfellow et al., ICLR 2015) / PGD (Madry et al., ICLR 2018) inputs, on the
               calibration data and/or at evaluation (pruning/noise/adversarial.py)

Models (`MODELS`: `build(cfg, data) -> nn.Module`, the network inside `pruning.models.Classifier`):
  mlp          small MLP for the embedded digits default                     mlp.py
  mlpnet       MLPNet 784-40-20-10, no biases (WoodFisher/CBS/CHITA MNIST)   mlpnet.py
  resnet20     CIFAR ResNet-20, option-A shortcuts (akamaster checkpoints)   resnet_cifar.py
  resnet20b    CIFAR ResNet-20, option-B 1x1-conv shortcuts (WoodFisher)     resnet_cifar.py
  resnet32     CIFAR ResNet-32                                               resnet_cifar.py
  resnet56     CIFAR ResNet-56                                               resnet_cifar.py
  vgg16        VGG-16 with batch norm for CIFAR                              vgg.py
  wrn28_10     Wide ResNet 28-10 for CIFAR                                   wide_resnet.py
  mobilenetv1  MobileNetV1 for ImageNet (STR/WoodFisher layout)              mobilenet.py
  mobilenetv2  MobileNetV2 for ImageNet (torchvision)                        mobilenet.py
  resnet50     ResNet-50 for ImageNet (torchvision)                          resnet_imagenet.py

Datasets (`DATASETS`: `load(cfg, data_dir) -> pruning.data.DataBundle`):
  digits     scikit-learn's bundled 8x8 handwritten digits (no download)        digits.py
  synthetic  generated Gaussian-prototype classification data (fixed seed)      synthetic.py
  mnist      MNIST via torchvision (<data_dir>/MNIST/raw/*-ubyte)                mnist.py
  cifar10    CIFAR-10 via torchvision (<data_dir>/cifar-10-batches-py/)         cifar.py
  cifar100   CIFAR-100 via torchvision (<data_dir>/cifar-100-python/)           cifar.py
  imagenet   ImageNet in ImageFolder layout (<data_dir>/imagenet/{train,val}/<wnid>/*)  imagenet.py

Entries are `module:attribute` references imported on first use: the model and dataset modules pull in
torchvision (seconds per process), and the method modules import the packages that import this one.
A method's `Config` is a frozen dataclass whose defaults are the method's defaults (the one place they
live; `pruning.hydra_conf` registers them with Hydra), with an optional `validate()` raising
`pruning.errors.ConfigError`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from pruning.methods.base import PruneResult, PruningProblem, TrainContext


class WeightsEntry(Protocol):
    """A weight-space method: prune `problem` to `sparsity` in one step (the schedule calls it per stage)."""

    def __call__(self, problem: PruningProblem, sparsity: float, cfg: Any) -> PruneResult: ...


class TrainEntry(Protocol):
    """A train-time method: prunes while it trains `ctx.model` (no schedule)."""

    def __call__(self, ctx: TrainContext, cfg: Any) -> PruneResult: ...


@dataclass(frozen=True)
class Ref:
    """`module:attribute`, imported when `load()` is first called."""

    path: str

    @property
    def module(self) -> str:
        return self.path.partition(":")[0]

    def load(self) -> Any:
        module, _, attr = self.path.partition(":")
        return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class MethodSpec:
    """The method contract: `config` is its frozen Config dataclass; `entry` is `prune(problem,
    sparsity, cfg)` (kind "weights", `WeightsEntry`) or `run(ctx, cfg)` (kind "train", `TrainEntry`);
    `needs_gradients`: the run computes the gradient matrix G and passes it as `problem.grads`."""

    config: Ref
    entry: Ref
    kind: Literal["weights", "train"]
    needs_gradients: bool


def _method(name: str, kind: Literal["weights", "train"], needs_gradients: bool) -> MethodSpec:
    module = f"pruning.methods.{name}"
    return MethodSpec(Ref(f"{module}:Config"), Ref(f"{module}:{'prune' if kind == 'weights' else 'run'}"),
                      kind, needs_gradients)


METHODS: dict[str, MethodSpec] = {
    "magnitude": _method("magnitude", "weights", needs_gradients=False),
    "woodfisher": _method("woodfisher", "weights", needs_gradients=True),
    "cbs": _method("cbs", "weights", needs_gradients=True),
    "lr": _method("lr", "weights", needs_gradients=True),
    "swap": _method("swap", "weights", needs_gradients=True),
    "gfs": _method("gfs", "train", needs_gradients=False),
    "grda": _method("grda", "train", needs_gradients=False),
    "sdprun": _method("sdprun", "train", needs_gradients=False),
}


@dataclass(frozen=True)
class NoiseSpec:
    """`config`: the model's Config dataclass (None: no settings); `build(cfg) -> NoiseModel`;
    `level`: the Config key that is the run index's noise_level (`NoiseModel.level`)."""

    config: Ref | None
    build: Ref
    level: str | None = None


NOISE: dict[str, NoiseSpec] = {
    "none": NoiseSpec(None, Ref("pruning.noise:NoiseModel")),
    "gradient": NoiseSpec(Ref("pruning.noise.gradient:Config"), Ref("pruning.noise.gradient:build"), "kappa"),
    "analog": NoiseSpec(Ref("pruning.noise.analog:Config"), Ref("pruning.noise.analog:build"), "prog_noise_scale"),
    "adversarial": NoiseSpec(Ref("pruning.noise.adversarial:Config"), Ref("pruning.noise.adversarial:build"),
                             "eps"),
}

MODELS: dict[str, Ref] = {
    "mlp": Ref("pruning.models.mlp:build"),
    "mlpnet": Ref("pruning.models.mlpnet:build"),
    "resnet20": Ref("pruning.models.resnet_cifar:build"),
    "resnet20b": Ref("pruning.models.resnet_cifar:build"),
    "resnet32": Ref("pruning.models.resnet_cifar:build"),
    "resnet56": Ref("pruning.models.resnet_cifar:build"),
    "vgg16": Ref("pruning.models.vgg:build"),
    "wrn28_10": Ref("pruning.models.wide_resnet:build"),
    "mobilenetv1": Ref("pruning.models.mobilenet:build"),
    "mobilenetv2": Ref("pruning.models.mobilenet:build"),
    "resnet50": Ref("pruning.models.resnet_imagenet:build"),
}

DATASETS: dict[str, Ref] = {
    "digits": Ref("pruning.data.digits:load"),
    "synthetic": Ref("pruning.data.synthetic:load"),
    "mnist": Ref("pruning.data.mnist:load"),
    "cifar10": Ref("pruning.data.cifar:load"),
    "cifar100": Ref("pruning.data.cifar:load"),
    "imagenet": Ref("pruning.data.imagenet:load"),
}
