"""Benchmark of a CBS cell (Yu et al., ICML 2022) at the `oneshot_mlpnet_mnist` settings, where the
study spends most of its time: the local search's per-pass products and the training-loss scoring
of `select: loss`, each measured side by side against the slower route it replaced, then a whole
cell.

    python3 bench/bench_cbs.py                 # N = 10,000, sparsity 0.98 (the study's hardest cell)
    python3 bench/bench_cbs.py --quick         # smoke run (N = 500, 2 RMP draws)

Printed:
  pass product   t = G^T r for a float32 G and float64 residuals, once per pass: float64 slabs
                 (`cbs.SwapObjective.correlations`) vs numpy's upcast of the whole block
  loss score     the mean training loss of a masked network, scored for every start and pass:
                 tensor batches (`pruning.train.evaluate`) vs the per-example DataLoader route
  cell           one CBS cell (`method_args.cbs` of the study) with the loss scorer, its stats

Model and data as bench_papers.py (the reference MLPNet checkpoint and the MNIST dev prefix in
../shared/data when present, else random weights and inputs: speed only). The CPU is shared on
development machines: read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import numpy as np
import torch
from bench_papers import MNIST_DEV, method_config, setup  # sibling module of this script

import pruning.train as train_mod
from pruning import methods
from pruning.data import build_dataset
from pruning.gradients import compute_gradient_matrix
from pruning.layout import get_flat, set_flat
from pruning.methods import cbs
from pruning.methods.base import PruningProblem


def best_of(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 500, 2 RMP draws (smoke run)")
    ap.add_argument("--n", type=int, default=None, help="rows of G (default 10000, the study's)")
    ap.add_argument("--sparsity", type=float, default=0.98)
    ap.add_argument("--repeat", type=int, default=3, help="best of this many timings per product")
    args = ap.parse_args()
    n = args.n or (500 if args.quick else 10_000)
    torch.manual_seed(0)
    model, layout, x, y, notes = setup(n, torch.device("cpu"))
    G = compute_gradient_matrix(model, layout, x, y, chunk_size=256)
    w = get_flat(model, layout).clone()
    cfg = method_config("cbs", None)
    if args.quick:
        cfg = dataclasses.replace(cfg, init_trials=2, max_iter=3)
    print(f"CBS cell benchmark: N = {G.num_rows}, p = {G.num_cols}, sparsity {args.sparsity}, {notes}\n")

    # ------------------------------------------------------------- pass product
    obj = cbs.SwapObjective(G, [slice(0, G.num_cols)])
    rng = np.random.default_rng(0)
    R = rng.standard_normal((G.num_rows, 1))
    slabs = best_of(lambda: obj.correlations(R), args.repeat)
    whole = best_of(lambda: obj.cols[0].T @ R[:, 0], args.repeat)  # numpy upcasts the float32 block
    err = float(np.abs(obj.correlations(R) - obj.cols[0].T @ R[:, 0]).max())

    # ------------------------------------------------------------- loss score
    calib: Any = torch.utils.data.TensorDataset(x.cpu(), y.cpu())
    if MNIST_DEV.is_dir():  # the pipeline's own calibration view: uint8 images decoded per batch
        calib = build_dataset({"name": "mnist", "download": False, "mean": [0.1307], "std": [0.3081]},
                              MNIST_DEV).calib
    if train_mod.tensor_batches(calib, 512) is None:
        raise SystemExit("tensor batches unavailable for the calibration set")

    def loss(v: torch.Tensor, _n: int = 0) -> float:
        saved = get_flat(model, layout).clone()
        set_flat(model, layout, v.to(saved))
        try:
            return train_mod.evaluate(model, calib, torch.device("cpu"))["loss"]
        finally:
            set_flat(model, layout, saved)

    fast = best_of(lambda: loss(w), args.repeat)
    original = train_mod.tensor_batches
    train_mod.tensor_batches = lambda d, b: None  # the DataLoader route: per-example __getitem__ + collate
    try:
        slow = best_of(lambda: loss(w), args.repeat)
    finally:
        train_mod.tensor_batches = original

    # ------------------------------------------------------------- cell
    problem = PruningProblem(layout=layout, w=w.clone(), w_bar=w.clone(), grads=G, progress=False, loss=loss,
                             mask=torch.ones(layout.numel, dtype=torch.bool),
                             generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    res = methods.get("cbs").prune(problem, args.sparsity, cfg)
    cell = time.perf_counter() - t0
    scored = 1 + cfg.init_trials + int(res.info.get("passes", 0)) if cfg.select == "loss" else 0

    print("| what | new s | old s | old / new |")
    print("|---|---:|---:|---:|")
    print(f"| pass product G^T r (float32 G, float64 r) | {slabs:.3f} | {whole:.3f} | {whole / slabs:.1f}x "
          f"(max diff {err:.1e}) |")
    print(f"| loss score, {len(calib)} examples | {fast:.3f} | {slow:.3f} | {slow / fast:.1f}x |")
    print(f"\ncell: {cell:.1f} s, {res.info.get('passes')} passes, {res.info.get('swaps')} swaps, stop "
          f"{res.info.get('stop')}, start {res.info.get('start')}, ~{scored} loss scores; with the old routes "
          f"**estimated** {cell + int(res.info.get('passes', 0)) * (whole - slabs) + scored * (slow - fast):.0f} s")


if __name__ == "__main__":
    main()
