"""Published accuracies that the studies reproduce, for the report to print beside ours.

Every number is copied from `shared/reference/algorithms.md` section 10 with its certainty tag:
``verified`` (read from the authors' code or data files), ``RECALL`` (remembered from a paper's
table and not yet checked against the PDF: compare, never assert). Accuracies are top-1 in
percent on the official test split; the report scales our fractions by 100 before comparing.

A table applies to runs whose model, dataset and schedule match and that ran without noise: the
published numbers are noise-free. Method names are this project's (`lr` stands for CHITA, the
sparse-regression solver it implements).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PublishedTable:
    """One published table: accuracy (percent) per method and sparsity, plus the dense model's."""

    source: str                                   # paper, table, and where the numbers were read
    tag: str                                      # verified | RECALL
    models: tuple[str, ...]                       # project model names the table applies to
    dataset: str
    schedule: str
    dense: float
    acc: Mapping[str, Mapping[float, float]]      # method -> sparsity -> accuracy (percent)
    note: str = ""
    approx: Mapping[str, tuple[float, ...]] = field(default_factory=dict)  # "≈" cells (least certain)

    def value(self, method: str, sparsity: float) -> float | None:
        for s, v in self.acc.get(method, {}).items():
            if abs(float(s) - float(sparsity)) < 1e-9:
                return float(v)
        return None

    def is_approx(self, method: str, sparsity: float) -> bool:
        return any(abs(float(s) - float(sparsity)) < 1e-9 for s in self.approx.get(method, ()))


_S = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
_R20 = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_MBV1 = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)

TABLES: tuple[PublishedTable, ...] = (
    PublishedTable(
        source="CBS (Yu et al., ICML 2022), MLPNet one-shot table; yuxwind/CBS@cce03e7 analyse/exp_table.txt "
               "(algorithms.md 10.2); mean of 5 runs, no fine-tuning",
        tag="verified",
        models=("mlpnet",),
        dataset="mnist",
        schedule="oneshot",
        dense=93.97,
        acc={
            "magnitude": dict(zip(_S, (93.93, 93.78, 93.62, 92.89, 90.30, 83.64, 32.25))),
            "woodfisher": dict(zip(_S, (94.02, 93.82, 93.77, 93.57, 91.69, 85.54, 38.26))),
            "cbs": dict(zip(_S, (93.96, 93.96, 93.98, 93.90, 93.14, 88.92, 55.45))),
        },
        note=("settings: N = 10,000, m = 1, damp 1e-3, one full Fisher block; WF update scale 0.9; "
              "CBS from the CBS code's RMP starts, which keep more weights than the nominal sparsity "
              "(712 of 32,360 at 0.98, 1,780 at 0.95, 3,382 at 0.9)"),
    ),
    PublishedTable(
        source="CHITA (Benbaki et al., ICML 2023) Table 2, ResNet-20 rows (algorithms.md 10.3)",
        tag="RECALL",
        models=("resnet20b",),
        dataset="cifar10",
        schedule="oneshot",
        dense=91.36,
        acc={
            "magnitude": dict(zip(_R20, (89.98, 88.44, 85.24, 78.79, 54.01, 11.79))),
            "woodfisher": dict(zip(_R20, (90.23, 88.42, 84.33, 78.8, 54.1, 12.5))),
            "cbs": dict(zip(_R20, (90.58, 88.88, 81.84, 51.28, 13.68, 10.0))),
            "lr": dict(zip(_R20, (91.19, 90.60, 89.22, 84.12, 57.90, 15.60))),
        },
        approx={"woodfisher": (0.7, 0.8, 0.9), "cbs": (0.9,)},
        note="unverified recollection of the table; the option-B checkpoint scores 91.96, not 91.36",
    ),
    PublishedTable(
        source="CHITA (Benbaki et al., ICML 2023) Table 2, MobileNetV1 rows (algorithms.md 10.3)",
        tag="RECALL",
        models=("mobilenetv1",),
        dataset="imagenet",
        schedule="oneshot",
        dense=71.95,
        acc={
            "magnitude": dict(zip(_MBV1, (71.56, 69.87, 64.3, 44.2, 2.0, 0.1))),
            "woodfisher": dict(zip(_MBV1, (71.15, 69.8, 64.0, 44.1, 2.0, 0.1))),
            "cbs": dict(zip(_MBV1, (71.45, 70.21, 66.37, 55.11, 16.4, 0.1))),
            "lr": dict(zip(_MBV1, (71.68, 71.2, 70.1, 67.5, 59.1, 29.8))),
        },
        approx={"magnitude": (0.5, 0.6, 0.7, 0.8), "woodfisher": (0.4, 0.5, 0.6, 0.7, 0.8),
                "cbs": (0.7, 0.8), "lr": (0.4, 0.5, 0.6, 0.7, 0.8)},
        note="unverified recollection of the table",
    ),
    PublishedTable(
        source="WoodFisher (Singh & Alistarh, NeurIPS 2020), gradual pruning, ResNet-50 final epoch; "
               "IST-DASLab/WoodFisher plotmaker data (algorithms.md 10.4)",
        tag="verified",
        models=("resnet50",),
        dataset="imagenet",
        schedule="gradual",
        dense=77.01,
        acc={
            "woodfisher": {0.8: 76.63, 0.9: 75.09, 0.95: 72.03, 0.98: 65.23},
            "magnitude": {0.8: 76.52, 0.9: 75.00, 0.95: 71.54, 0.98: 64.02},
        },
        note="100 epochs with fine-tuning between pruning steps; final epoch",
    ),
)


def find_table(model: str, dataset: str, schedule: str) -> PublishedTable | None:
    """The published table for runs of `model` on `dataset` under `schedule`, if there is one."""
    for table in TABLES:
        if str(model) in table.models and str(dataset) == table.dataset and str(schedule) == table.schedule:
            return table
    return None
