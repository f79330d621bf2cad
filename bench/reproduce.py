"""Ours vs published, side by side: run a reproduction study on its reference checkpoint and print
each cell next to the paper's number (`pruning.published`).

    python3 bench/reproduce.py mlpnet                        # oneshot_mlpnet_mnist, all cells, 1 seed
    python3 bench/reproduce.py mlpnet --seeds 3 --sparsity 0.9 0.95 0.98 --methods magnitude woodfisher
    python3 bench/reproduce.py resnet20b --data-dir /data    # oneshot_resnet20_cifar10 on official CIFAR-10
    python3 bench/reproduce.py mlpnet-chitapp --seeds 5      # chitapp_mlpnet_mnist: CHITA++ beside magnitude

Each preset names the study, the published checkpoint in `../shared/data/` and a data folder. By
default the data are the development prefixes in `../shared/data/` (the first MNIST / CIFAR-10
*training* images, which the reference checkpoints were trained on: accuracies are inflated, so
compare orderings and gaps there, and absolute numbers only on the official test sets via
`--data-dir`). The study runs exactly as a user would launch it (`launch.py -cd sweeps -cn ...`,
its own per-method settings, no extra flags), into `--out`; re-running skips finished cells.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@dataclass(frozen=True)
class Preset:
    study: str
    checkpoint: str
    dev_data: str
    extra: tuple[str, ...] = ()


PRESETS = {
    "mlpnet": Preset("oneshot_mlpnet_mnist", "mlpnet-mnist-woodfisher-93.97.ckpt", "mnist-train-prefix"),
    "mlpnet-chitapp": Preset("chitapp_mlpnet_mnist", "mlpnet-mnist-woodfisher-93.97.ckpt", "mnist-train-prefix"),
    "resnet20b": Preset("oneshot_resnet20_cifar10", "resnet20b-cifar10-woodfisher.pth.tar", "cifar10-train-prefix",
                        ("dataset.verify_checksums=false",)),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", choices=sorted(PRESETS))
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..S-1 (the papers average 5)")
    p.add_argument("--sparsity", type=float, nargs="*", help="sparsities (default: the study's)")
    p.add_argument("--methods", nargs="*", help="methods (default: the study's)")
    p.add_argument("--data-dir", help="paths.data_dir (default: the development prefix in ../shared/data)")
    p.add_argument("--checkpoint", help="model.checkpoint (default: the published file in ../shared/data)")
    p.add_argument("--out", default=str(ROOT / "outputs" / "reproduce"), help="paths.out_root of the runs")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. calibration.num_samples=1000")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; Hydra overrides may come before or after the options."""
    return _parser().parse_intermixed_args(argv)


def command(args: argparse.Namespace) -> list[str]:
    preset = PRESETS[args.preset]
    checkpoint = args.checkpoint or str(SHARED / preset.checkpoint)
    data_dir = args.data_dir or str(SHARED / preset.dev_data)
    for what, path in (("checkpoint", checkpoint), ("data folder", data_dir)):
        if not Path(path).exists():
            raise SystemExit(f"error: {what} {path} does not exist (see ../shared/data/README.md)")
    cmd = [sys.executable, str(ROOT / "launch.py"), "-cd", str(ROOT / "sweeps"), "-cn", preset.study,
           f"model.checkpoint={checkpoint}", f"paths.data_dir={data_dir}", f"paths.out_root={args.out}",
           f"seed=range({args.seeds})", "hydra.callbacks.report.enabled=false", *preset.extra]
    if args.sparsity:
        cmd.append("sparsity=" + ",".join(f"{s:g}" for s in args.sparsity))
    if args.methods:
        cmd.append("method=" + ",".join(args.methods))
    return cmd + list(args.overrides)


def side_by_side(sweep_dir: Path) -> str:
    """Rows = sparsity, columns = method: ours (mean over seeds, percent) / published."""
    from pruning.published import find_table
    from pruning.report import (
        OFF_NOMINAL,
        below_target_note,
        dense_baseline,
        load_local,
        magnitude_gains,
        markdown_table,
        off_nominal_cells,
        repairs_pruned_model,
        summarize,
    )

    df = load_local(sweep_dir)
    done = df[(df["status"] == "completed") & (df["noise"].fillna("none") == "none")]
    if done.empty:
        return "no completed runs"
    lines = []
    for (model, dataset, schedule, variant), grp in done.groupby(["model", "dataset", "schedule", "variant"],
                                                                 dropna=False):
        # the published one-shot protocols neither fine-tune nor re-estimate BatchNorm
        repaired = repairs_pruned_model(grp, "final_acc")
        table = None if repaired else find_table(model, dataset, schedule)
        summary = summarize(grp, "final_acc")
        methods = sorted(set(summary["method_label"]), key=lambda m: (m != "magnitude", m))
        by_gain = magnitude_gains(summary, table)
        off = off_nominal_cells(grp)
        rows, gains = [], []
        for s, cell in summary.groupby("sparsity"):
            row, gain = [f"{s:g}"], [f"{s:g}"]
            for m in methods:
                r = cell[cell["method_label"] == m]
                mark = f" {OFF_NOMINAL}" if (m, float(s)) in off else ""
                ours = f"{100 * float(r['mean'].iloc[0]):.2f}" if len(r) else "–"
                pub = table.value(m.split("[", 1)[0], float(s)) if table else None
                row.append((f"{ours} / {pub:.2f}" if pub is not None else ours) + mark)
                if m != "magnitude":
                    ours_gain, pub_gain = by_gain.get((float(s), m), (None, None))
                    gain.append("–" if ours_gain is None else f"{ours_gain:+.2f}"
                                + ("" if pub_gain is None else f" / {pub_gain:+.2f}") + mark)
            rows.append(row)
            gains.append(gain)
        dense = dense_baseline(grp, "final_acc")
        d = 100 * float(dense["mean"].mean()) if not dense.empty else math.nan
        setting = " / ".join(str(v) for v in (model, dataset, schedule, variant) if isinstance(v, str) and v)
        head = f"{setting}: dense {d:.2f}"
        if table:
            head += f" (published {table.dense:.2f}; {table.tag}: {table.source})"
        times = grp.groupby("method_label")["time_total"].mean() if "time_total" in grp else None
        cells = "cells: ours / published, accuracy in percent" if table else "cells: ours, accuracy in percent"
        if repaired and find_table(model, dataset, schedule) is not None:
            cells += " (no published column: the published protocol does not repair the pruned model)"
        lines += [head, cells, "",
                  markdown_table(["sparsity", *methods], rows)]
        if "magnitude" in methods and len(methods) > 1:  # a different test split shifts accuracies, not gains
            lines += ["", "gain over magnitude pruning, ours / published (points)", "",
                      markdown_table(["sparsity", *[m for m in methods if m != "magnitude"]], gains)]
        short = below_target_note(off)
        if short:
            lines += ["", short]
        if times is not None:
            lines += ["", "mean time per run: " + ", ".join(f"{m} {times[m]:.1f}s" for m in methods if m in times)]
        lines.append("")
    failed = df[df["status"] != "completed"]
    if not failed.empty:
        lines.append(f"{len(failed)} run(s) not completed: " + ", ".join(str(r) for r in failed["run"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cmd = command(args)
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=ROOT)
    print(f"study finished in {time.perf_counter() - t0:.0f} s (exit {rc})\n")
    print(side_by_side(Path(args.out) / "sweeps" / PRESETS[args.preset].study))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
