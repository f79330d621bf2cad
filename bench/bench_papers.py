"""Benchmark per paper setting (issue 17): the MLPNet one-shot table cell of `oneshot_mlpnet_mnist`
(CBS, Yu et al. ICML 2022; WoodFisher, Singh & Alistarh NeurIPS 2020; CHITA's lr) at its own
settings, measured in one run, with the factorisation cache (`pruning.factor_cache`).

    python3 bench/bench_papers.py                 # N = 10,000 (the study's), CPU or --device auto
    python3 bench/bench_papers.py --n 2000        # a smaller G: the same table, ~N^2 cheaper algebra
    python3 bench/bench_papers.py --quick         # smoke run (N = 200)

Model: MLPNet 784-40-20-10 without bias (32,360 prunable weights) with the reference checkpoint
../shared/data/mlpnet-mnist-woodfisher-93.97.ckpt when this tree can load it safely (else random
weights: speed only), on the MNIST development prefix ../shared/data/mnist-train-prefix when present
(else random inputs). Every method gets the study's `method_args` (woodfisher and cbs: damp 1e-3,
one full Fisher block; woodfisher c_u 0.9). Printed:

  G         `compute_gradient_matrix` (N per-sample gradients) vs the batched forward+backward floor
            over the same N samples and a per-sample autograd loop (on --loop-n rows, scaled to N)
  factor    the N x N Gram matrix G G^T and the Cholesky + diag(F^-1) of the Woodbury form
            (`pruning.factor_cache`), the O(N^2 B) work a cell would otherwise repeat
  cells     each method at --sparsity (first cell: cold cache) and at --second (reusing the
            factorisation from memory, and from disk as a new job of the same seed would):
            "extra cell / first" is the time of another sparsity as a fraction of the first
  stages    one full swap stage vs one full lr stage (G + solve, the methods' own defaults,
            bench_solvers.stage) at --stage-n rows
  study     an extrapolation (clearly labelled) of the whole study (4 methods x 7 sparsities x
            5 seeds) from the measured cells, with and without the cache

The CPU is shared on development machines: measure once, read the ratios, not the seconds.
With --device auto a CUDA device is used when present (G, the Woodbury algebra and the lr/swap
solvers stay on it; CBS's local search runs on the host by design).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from benchlib import ROOT  # sibling module of this script
from omegaconf import OmegaConf

from pruning import factor_cache, methods
from pruning.data import build_dataset
from pruning.fisher import cached_inverse, masked_block
from pruning.gradients import compute_gradient_matrix
from pruning.layout import get_flat, make_layout
from pruning.methods.base import PruningProblem
from pruning.models import build_model, load_weights

SHARED = ROOT.parent / "shared" / "data"
MLPNET_CKPT = SHARED / "mlpnet-mnist-woodfisher-93.97.ckpt"
MNIST_DEV = SHARED / "mnist-train-prefix"
STUDY = ROOT / "sweeps" / "oneshot_mlpnet_mnist.yaml"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Any, device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def setup(n: int, device: torch.device) -> tuple[torch.nn.Module, Any, torch.Tensor, torch.Tensor, str]:
    """MLPNet with the reference weights when loadable, inputs from the MNIST prefix when present."""
    notes = []
    data = None
    if MNIST_DEV.is_dir():
        try:
            data = build_dataset({"name": "mnist", "download": False, "mean": [0.1307], "std": [0.3081]}, MNIST_DEV)
            notes.append("MNIST dev prefix")
        except Exception as exc:  # noqa: BLE001 (any failure: fall back to random inputs, say why)
            notes.append(f"random inputs (MNIST prefix unreadable: {type(exc).__name__})")
    if data is None:
        data = build_dataset({"name": "synthetic", "num_train": n, "num_test": 16, "num_classes": 10,
                              "shape": [1, 28, 28], "seed": 0})
        notes.append("random inputs") if not notes else None
    model = build_model({"name": "mlpnet", "hidden": [40, 20], "bias": False, "normalize": None}, data)
    if MLPNET_CKPT.is_file():
        try:
            load_weights(model, MLPNET_CKPT)
            notes.append(f"weights {MLPNET_CKPT.name}")
        except Exception as exc:  # noqa: BLE001 (a pickled checkpoint needs the safe loader of a later branch)
            notes.append(f"random weights ({MLPNET_CKPT.name} not loadable here: {type(exc).__name__})")
    else:
        notes.append("random weights")
    n = min(n, len(data.train))
    x = torch.stack([data.train[i][0] for i in range(n)]).to(device)
    y = torch.tensor([int(data.train[i][1]) for i in range(n)], device=device)
    return model.to(device).eval(), make_layout(model), x, y, ", ".join(notes)


def method_config(name: str, cbs_max_iter: int | None) -> Any:
    extra = OmegaConf.load(STUDY).get("method_args", {}).get(name, {})
    cfg = OmegaConf.to_container(OmegaConf.create(extra), resolve=True)  # over the Config defaults
    if name == "cbs" and cbs_max_iter is not None:
        cfg["max_iter"] = cbs_max_iter
    return methods.make_config(name, cfg)


def cell(name: str, G: Any, layout: Any, w: torch.Tensor, sparsity: float, cfg: Any,
         device: torch.device) -> tuple[float, dict[str, Any]]:
    problem = PruningProblem(layout=layout, w=w.clone(), w_bar=w.clone(), grads=G, progress=False,
                             mask=torch.ones(layout.numel, dtype=torch.bool, device=w.device),
                             generator=torch.Generator().manual_seed(0))
    seconds, res = timed(lambda: methods.get(name).prune(problem, sparsity, cfg), device)
    return seconds, res.info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 200, stage N = 100 (smoke run)")
    ap.add_argument("--n", type=int, default=None, help="rows of G (default 10000, the study's)")
    ap.add_argument("--sparsity", type=float, default=0.9, help="first cell")
    ap.add_argument("--second", type=float, default=0.95, help="second cell, reusing the factorisation")
    ap.add_argument("--methods", default="magnitude,woodfisher,cbs,lr")
    ap.add_argument("--stage-n", type=int, default=None, help="rows of the swap/lr stages (default 1000)")
    ap.add_argument("--loop-n", type=int, default=200, help="rows of the per-sample loop (scaled to N)")
    ap.add_argument("--cbs-max-iter", type=int, default=None, help="cap CBS passes (default: the config's)")
    ap.add_argument("--chunk", type=int, default=128, help="rows per vmap call")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto (cuda when present)")
    ap.add_argument("--no-factor", action="store_true", help="skip timing the factorisation alone (Gram, Cholesky)")
    args = ap.parse_args()
    n = args.n or (200 if args.quick else 10_000)
    stage_n = args.stage_n or (100 if args.quick else 1000)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    names = [m for m in args.methods.split(",") if m]
    model, layout, x, y, note = setup(n, device)
    n = x.shape[0]
    print(f"MLPNet 784-40-20-10, p = {layout.numel:,}, N = {n:,}, device {device}, "
          f"{torch.get_num_threads()} threads; {note}", flush=True)

    # ---------------------------------------------------------------------------- G and its floor
    from bench_core import floor, loop  # sibling module: the same floor and loop as bench_core

    compute_gradient_matrix(model, layout, x[:8], y[:8], chunk_size=8)  # warm-up (vmap tracing)
    t_floor, _ = timed(lambda: floor(model, layout, x, y, args.chunk), device)
    t_g, G = timed(lambda: compute_gradient_matrix(model, layout, x, y, chunk_size=args.chunk), device)
    loop_n = min(args.loop_n, n)
    t_loop = timed(lambda: loop(model.cpu(), layout, x[:loop_n].cpu(), y[:loop_n].cpu()), device)[0] * n / loop_n
    model.to(device)
    w = get_flat(model, layout).detach()

    with tempfile.TemporaryDirectory(prefix="bench-papers-") as tmp:
        G.key, G.entry = "bench-papers", Path(tmp)  # as if G came through the gradient cache
        rows: dict[str, dict[str, Any]] = {}
        # ---------------------------------------------------------------- the factorisation alone
        full, ones = slice(0, layout.numel), torch.ones(layout.numel, dtype=torch.bool, device=device)
        wf_cfg = method_config("woodfisher", None)
        factor_cache.clear_memory()
        stats = factor_cache.CacheStats()
        t_gram = t_inv = float("nan")
        if not args.no_factor:
            Gb = masked_block(G, full, ones, device, torch.float64)
            t_gram, _ = timed(lambda: factor_cache.gram(G, Gb, full, ones, stats), device)
            t_inv, _ = timed(lambda: cached_inverse(G, full, ones, wf_cfg.damp, wf_cfg.inverse, device,
                                                    torch.float64, stats), device)
            Gb = None  # free the block before the cells
        factors = sorted(Path(tmp, factor_cache.FACTORS_DIR).glob("*.pt"))
        disk_mb = sum(p.stat().st_size for p in factors) / 2**20
        print(f"G {t_g:.2f}s  floor {t_floor:.2f}s  loop {t_loop:.2f}s  Gram {t_gram:.2f}s  "
              f"Cholesky+diag {t_inv:.2f}s  (factor files {disk_mb:.0f} MB)", flush=True)

        # --------------------------------------------------------------------------- the cells
        for name in names:
            cfg = method_config(name, args.cbs_max_iter)
            for p in factors:  # a cold start: nothing cached, in memory or on disk
                p.unlink(missing_ok=True)
            factor_cache.clear_memory()
            first, info1 = cell(name, G, layout, w, args.sparsity, cfg, device)
            second, info2 = cell(name, G, layout, w, args.second, cfg, device)  # same process
            factor_cache.clear_memory()
            disk, info3 = cell(name, G, layout, w, args.second, cfg, device)  # a new job of the seed
            rows[name] = {"first": first, "second": second, "disk": disk,
                          "cache": "/".join(str(i.get("factor_cache", "-")) for i in (info1, info2, info3))}
            print(f"  {name}: first {first:.2f}s, second {second:.2f}s, from disk {disk:.2f}s "
                  f"(cache {rows[name]['cache']})", flush=True)
            factors = sorted(Path(tmp, factor_cache.FACTORS_DIR).glob("*.pt"))
    G = None  # free G before the stages
    factor_cache.clear_memory()

    # --------------------------------------------------------------------- swap vs lr stages
    from bench_solvers import stage  # sibling module: one full stage, the methods' defaults

    stages = {m: stage(m, model, layout, x[:stage_n], y[:stage_n], args.sparsity, args.chunk)
              for m in ("lr", "swap")}

    # ---------------------------------------------------------------------------- the table
    print(f"\nMLPNet table cell, N = {n:,}, sparsity {args.sparsity} then {args.second} "
          f"(one measurement on a shared CPU: read the ratios)")
    print("| step | seconds | ratio |")
    print("|---|---:|---|")
    print(f"| G (vmap) | {t_g:.2f} | {t_g / t_floor:.2f}x the batched fwd+bwd floor ({t_floor:.2f} s), "
          f"{t_loop / t_g:.1f}x faster than the per-sample loop ({t_loop:.1f} s, from {loop_n} rows) |")
    print(f"| Gram G G^T (N^2 B) | {t_gram:.2f} | {t_gram / t_g:.1f}x G |")
    print(f"| Cholesky + diag(F^-1) | {t_inv:.2f} | {t_inv / t_g:.1f}x G |")
    for name, r in rows.items():
        print(f"| {name}: first cell | {r['first']:.2f} | |")
        print(f"| {name}: extra cell, same process | {r['second']:.2f} | {r['second'] / r['first']:.3f} of the first |")
        print(f"| {name}: extra cell, new job (disk) | {r['disk']:.2f} | {r['disk'] / r['first']:.3f} of the first "
              f"(cache {r['cache']}) |")
    lr_s, sw_s = stages["lr"], stages["swap"]
    print(f"| lr stage (N = {stage_n}) | {lr_s['stage']:.2f} | G {lr_s['g']:.2f} + solve {lr_s['solve']:.2f} |")
    print(f"| swap stage (N = {stage_n}) | {sw_s['stage']:.2f} | {sw_s['stage'] / lr_s['stage']:.2f}x lr "
          f"(plan {sw_s['plan']:.2f}) |")

    # ------------------------------------------------------------- study (an extrapolation)
    sweep = OmegaConf.load(STUDY).hydra.sweeper.params
    n_sp = len(str(sweep.sparsity).split(","))
    n_seeds = len(range(*[int(v) for v in str(sweep.seed).removeprefix("range(").rstrip(")").split(",")]))
    study_methods = str(sweep.method).split(",")
    if all(m in rows for m in study_methods):
        # per method and seed: G once (cached after), the first cell cold, the other sparsities from disk
        with_cache = sum(t_g + rows[m]["first"] + (n_sp - 1) * rows[m]["disk"] for m in study_methods)
        without = sum(t_g + n_sp * rows[m]["first"] for m in study_methods)
        print(f"\nEXTRAPOLATION (not measured): study {STUDY.stem}, {len(study_methods)} methods x {n_sp} "
              f"sparsities x {n_seeds} seeds, sequential on this machine, from the cells above (every "
              f"sparsity costed as the measured ones): with the factor cache {n_seeds * with_cache / 3600:.2f} h, "
              f"without {n_seeds * without / 3600:.2f} h (G counted once per method and seed; job start-up, "
              "dense model and evaluation not counted)")


if __name__ == "__main__":
    main()
