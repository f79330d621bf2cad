"""Benchmark of issue 4B: one full `swap` pruning stage against one full `lr` stage, on CPU.

    python3 bench/bench_solvers.py            # N = 1000, ResNet-20 and MLPNet, 2 repeats
    python3 bench/bench_solvers.py --quick    # smoke variant (N = 100, 1 repeat)
    python3 bench/bench_solvers.py --convergence --models mlpnet --sparsity 0.95   # lr: cg vs gradient steps

A stage is what `pruning.task` does per pruning step for these methods: the gradient matrix G
(N per-sample gradients at the current weights, `compute_gradient_matrix`) and the method's
`prune` (lr: CHITA active-set IHT with line search on 1/2||G w_bar - G w||^2 + ridge; swap: the
Sinkhorn plan of the 1-D squared cost plus the same solver on the EWR objective), one-shot from the
dense weights to `--sparsity`, with the methods' default configs (their `Config` dataclasses).

Models: ResNet-20 (`pruning.models` `resnet20`, the public CIFAR-10 checkpoint from
../shared/data when present, else its random initialisation; 267,264 prunable weights) and
MLPNet 784-40-20-10 without bias (`mlpnet`, random initialisation; 32,360 weights). Inputs are
the project's `synthetic` dataset of the right shape: timing only, no accuracy claims.

Printed side by side: G seconds, solve seconds (swap: of which plan), stage seconds, peak memory
(largest growth of anonymous resident memory, RssAnon, over the stage, sampled every 2 ms), and
the ratios swap / lr. Timings are the minimum over `--repeats` (methods alternate). Target: a swap
stage at most 1.3x an lr stage on ResNet-20.

`--convergence` (issue 17): one G, then lr's solve with steepest-descent steps on a fixed support
(CHITA's, `support_steps: gradient`) against conjugate steps (`cg`, lr's default), both without
the zero-column drop and the final backsolve so that they solve the same problem, plus lr's
defaults: iterations, stop reason, whether max_iter was hit, Q and solve seconds (min over
repeats). Target: cg stops on ftol at equal or lower Q in at most the time of gradient steps.
"Q before finish" is Q of the last IHT iterate, before lr's exact backsolve on its support (solved
in float64; in float32 its Woodbury form lost to cancellation on ResNet-20 and the finish was
skipped); "to the end" runs lr's defaults with ftol 0 and max_iter 1000, the Q the stop gives up.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from typing import Any

import torch
from benchlib import RESNET20_CHECKPOINT, PeakRSS  # sibling module of this script

from pruning import methods
from pruning.data import build_dataset
from pruning.gradients import compute_gradient_matrix
from pruning.layout import get_flat, make_layout
from pruning.methods.base import PruningProblem
from pruning.models import available as available_models
from pruning.models import build_model, load_weights

CHECKPOINT = RESNET20_CHECKPOINT


def setup(model_name: str, n: int) -> tuple[torch.nn.Module, Any, torch.Tensor, torch.Tensor, str]:
    if model_name not in available_models():
        raise SystemExit(f"model {model_name!r} is not in pruning.models.available() = {available_models()}")
    shape = [3, 32, 32] if model_name == "resnet20" else [1, 28, 28]
    data = build_dataset({"name": "synthetic", "num_train": n, "num_test": 16, "num_classes": 10, "shape": shape,
                          "seed": 0})
    if model_name == "resnet20":
        model = build_model({"name": "resnet20", "normalize": {"mean": [0.485, 0.456, 0.406],
                                                               "std": [0.229, 0.224, 0.225]}}, data)
        if CHECKPOINT.is_file():
            load_weights(model, CHECKPOINT)
            note = f"checkpoint {CHECKPOINT.name}"
        else:
            note = "random init (checkpoint not found)"
    else:
        model = build_model({"name": "mlpnet", "hidden": [40, 20], "bias": False, "normalize": None}, data)
        note = "random init"
    x = torch.stack([data.train[i][0] for i in range(n)])
    y = torch.tensor([int(data.train[i][1]) for i in range(n)])
    return model.eval(), make_layout(model), x, y, note


def stage(method: str, model: torch.nn.Module, layout: Any, x: torch.Tensor, y: torch.Tensor,
          sparsity: float, chunk: int) -> dict[str, Any]:
    module = methods.get(method)
    cfg = methods.make_config(method, {})  # the defaults (its Config dataclass)
    w = get_flat(model, layout)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        G = compute_gradient_matrix(model, layout, x, y, mini_batch=1, chunk_size=chunk)
        t1 = time.perf_counter()
        problem = PruningProblem(layout=layout, w=w.clone(), w_bar=w.clone(),
                                 mask=torch.ones(layout.numel, dtype=torch.bool), grads=G)
        res = module.prune(problem, sparsity, cfg)
        t2 = time.perf_counter()
    del G, problem
    info = res.info
    return {"g": t1 - t0, "solve": t2 - t1, "stage": t2 - t0, "peak_mb": mem.mb,
            "plan": info.get("plan_seconds", 0.0), "iterations": info.get("iterations"),
            "objective": info.get("objective"), "nnz": int(res.mask.sum()), "plan_kind": info.get("plan", "-"),
            "sinkhorn": info.get("sinkhorn_method", "-"), "stop": info.get("stop", "-"),
            "no_progress": bool(info.get("no_progress", False))}


def run_model(model_name: str, n: int, sparsity: float, repeats: int, chunk: int) -> dict[str, Any]:
    model, layout, x, y, note = setup(model_name, n)
    compute_gradient_matrix(model, layout, x[:chunk], y[:chunk], mini_batch=1, chunk_size=chunk)  # warm-up
    best: dict[str, dict[str, Any]] = {}
    for _ in range(repeats):
        for method in ("lr", "swap"):
            r = stage(method, model, layout, x, y, sparsity, chunk)
            b = best.setdefault(method, r)
            for key in ("g", "solve", "stage", "plan"):
                b[key] = min(b[key], r[key])
            b["peak_mb"] = max(b["peak_mb"], r["peak_mb"])
    return {"model": model_name, "note": note, "n": n, "p": layout.numel, "lr": best["lr"], "swap": best["swap"]}


def report(rows: list[dict[str, Any]], sparsity: float, repeats: int) -> None:
    print(f"\none pruning stage, one-shot to sparsity {sparsity}, CPU ({torch.get_num_threads()} threads), "
          f"min over {repeats} repeat(s)")
    head = (f"{'model':<10}{'N':>6}{'p':>9} | {'G lr':>7}{'G swap':>8} | {'solve lr':>9}{'solve swap':>11}"
            f"{'(plan)':>8} | {'stage lr':>9}{'stage swap':>11}{'ratio':>7} | {'peak lr':>8}{'peak swap':>10}"
            f"{'ratio':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        a, b = r["lr"], r["swap"]
        print(f"{r['model']:<10}{r['n']:>6}{r['p']:>9} | {a['g']:>6.2f}s{b['g']:>7.2f}s | {a['solve']:>8.2f}s"
              f"{b['solve']:>10.2f}s{b['plan']:>7.2f}s | {a['stage']:>8.2f}s{b['stage']:>10.2f}s"
              f"{b['stage'] / a['stage']:>6.2f}x | {a['peak_mb']:>6.0f}MB{b['peak_mb']:>8.0f}MB"
              f"{b['peak_mb'] / max(a['peak_mb'], 1e-9):>6.2f}x")
    print()
    for r in rows:
        a, b = r["lr"], r["swap"]
        g = min(a["g"], b["g"])  # the same G code for both: compare on equal G time too
        print(f"{r['model']}: {r['note']}; lr {a['iterations']} IHT steps (Q={a['objective']:.6g}, stop {a['stop']}), "
              f"swap {b['iterations']} steps (Q={b['objective']:.6g}, stop {b['stop']}, plan "
              f"{b['plan_kind']}/{b['sinkhorn']}); "
              f"nnz {a['nnz']} / {b['nnz']}; stage ratio at equal G time "
              f"{(g + b['solve']) / (g + a['solve']):.2f}x; solve ratio {b['solve'] / a['solve']:.2f}x")
    res20 = [r for r in rows if r["model"] == "resnet20"]
    if res20:
        r = res20[0]
        ratio = r["swap"]["stage"] / r["lr"]["stage"]
        # a swap solve that stopped at once (no descent from its start) is cheap for the wrong reason
        stalled = r["swap"]["no_progress"] or (r["swap"]["iterations"] or 0) <= 1
        verdict = (f"not comparable: swap stopped after {r['swap']['iterations']} step(s) ({r['swap']['stop']})"
                   if stalled else ("met" if ratio <= 1.3 else "NOT met"))
        print(f"\ntarget (ResNet-20): swap stage <= 1.3x lr stage: {ratio:.2f}x -> {verdict}")


CONVERGENCE = {
    "gradient": {"support_steps": "gradient", "drop_zero_columns": False, "finish": "none"},
    "cg": {"support_steps": "cg", "drop_zero_columns": False, "finish": "none"},
    "lr default": {},
    # the reference the stop is judged against: the same defaults run until no step lowers Q
    "to the end": {"ftol": 0.0, "max_iter": 1000},
}


def convergence(model_name: str, n: int, sparsity: float, repeats: int, chunk: int) -> None:
    model, layout, x, y, note = setup(model_name, n)
    G = compute_gradient_matrix(model, layout, x, y, mini_batch=1, chunk_size=chunk)
    w = get_flat(model, layout)
    base = dataclasses.asdict(methods.make_config("lr", {}))
    print(f"\nlr convergence, {model_name} ({note}), N = {n}, p = {layout.numel}, sparsity {sparsity}, "
          f"max_iter {base['max_iter']}, ftol {base['ftol']}, min over {repeats} repeat(s)")
    print(f"{'variant':<12}{'iters':>7}{'stop':>16}{'capped':>8}{'Q':>16}{'Q before finish':>17}{'solve s':>9}"
          f"  round stops")
    for name, over in CONVERGENCE.items():
        cfg = methods.make_config("lr", {**base, **over})
        best = math.inf
        for _ in range(repeats):
            problem = PruningProblem(layout=layout, w=w.clone(), w_bar=w.clone(),
                                     mask=torch.ones(layout.numel, dtype=torch.bool), grads=G, progress=False)
            t0 = time.perf_counter()
            info = methods.get("lr").prune(problem, sparsity, cfg).info
            best = min(best, time.perf_counter() - t0)
        print(f"{name:<12}{info['iterations']:>7}{info['stop']:>16}{str(info['max_iter_hit']):>8}"
              f"{info['objective']:>16.8g}{info.get('objective_iht', math.nan):>17.8g}{best:>9.2f}"
              f"  {info.get('stops', '-')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 100, 1 repeat (smoke run)")
    ap.add_argument("--n", type=int, default=None, help="rows of G (default 1000, --quick 100)")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=None, help="default 2 (--quick 1)")
    ap.add_argument("--chunk", type=int, default=128, help="rows per vmap call when computing G")
    ap.add_argument("--models", default="resnet20,mlpnet")
    ap.add_argument("--convergence", action="store_true", help="lr: cg vs gradient steps on a fixed support")
    args = ap.parse_args()
    n = args.n or (100 if args.quick else 1000)
    repeats = args.repeats or (1 if args.quick else 2)
    if args.convergence:
        for m in args.models.split(","):
            if m:
                convergence(m, n, args.sparsity, repeats, args.chunk)
        return
    rows = [run_model(m, n, args.sparsity, repeats, args.chunk) for m in args.models.split(",") if m]
    report(rows, args.sparsity, repeats)


if __name__ == "__main__":
    main()
