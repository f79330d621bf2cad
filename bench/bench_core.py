"""Core benchmark of issue 4A: the gradient matrix G and the WoodFisher block inverse, on CPU.

    python3 bench/bench_core.py            # N = 1000, B = 2000 (about a minute on 2 cores)
    python3 bench/bench_core.py --quick    # smoke variant (N = 64, B = 256)

For MLPNet 784-40-20-10 (no bias) and ResNet-20 (the public CIFAR-10 checkpoint from
../shared/data when present; random inputs, which is fine for timing), it prints side by side:

  floor    a plain batched forward + backward over the same N samples, in the same chunks,
           w.r.t. the prunable weights (what one mini-batch gradient costs: the lower bound)
  G        `compute_gradient_matrix` (vmap of grad of functional_call, rows written into blocks)
  G torchBN  the same with eval-mode BatchNorm left to torch under vmap (what the affine fast
           path `pruning.gradients.compute.affine_batchnorm` saves)
  vmap     the same vmap pass with every chunk of rows dropped instead of stored: G minus
           materialising it (page faults of N x p fresh floats and the copy into the blocks)
  stream   the same in `stream` mode (one pass per tensor into memory-mapped files)
  loop     a Python loop of N per-sample autograd.grad calls (the naive reference)
  write    allocating and filling an N x p float32 matrix: the unavoidable cost of producing G
           at all (page faults + memory bandwidth), which dominates on MLPNet where the floor
           is a few milliseconds

and for WoodFisher on one B-column block of the ResNet-20 G (N rows): the Woodbury closed form
(diag(F^-1) and F^-1 v from the N x N system) against the rank-1 Sherman-Morrison recursion,
at equal results. Targets (2 CPU cores): G within 1.25x of the floor and never slower than the
loop; the closed form at least 10x faster than the recursion. Timings are the minimum over
`--repeats`; peak memory is the largest growth of anonymous resident memory (RssAnon) seen while
the step runs (sampled every 2 ms).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from benchlib import RESNET20_CHECKPOINT, PeakRSS  # sibling module of this script
from torch import nn

from pruning.calibration import TensorRows
from pruning.fisher import BlockInverse, fisher_inverse_rank1
from pruning.gradients import compute as grad_compute
from pruning.gradients import compute_gradient_matrix
from pruning.layout import ParamLayout, get_params, make_layout

CHECKPOINT = RESNET20_CHECKPOINT


@dataclass
class Measure:
    seconds: float
    peak_mb: float
    result: Any = None


def measure(fn: Callable[[], Any], repeats: int = 1) -> Measure:
    best, peak, out = float("inf"), 0.0, None
    for _ in range(repeats):
        out = None
        gc.collect()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t0
        best, peak = min(best, dt), max(peak, mem.mb)
    return Measure(best, peak, out)


# ---------------------------------------------------------------------------------- models
def mlpnet() -> tuple[nn.Module, tuple[int, ...], str]:
    try:
        from pruning.models.mlpnet import MLPNet

        return MLPNet(784, (40, 20), 10, bias=False), (1, 28, 28), "MLPNet 784-40-20-10 (pruning.models)"
    except ImportError:
        net = nn.Sequential(nn.Flatten(), nn.Linear(784, 40, bias=False), nn.ReLU(), nn.Linear(40, 20, bias=False),
                            nn.ReLU(), nn.Linear(20, 10, bias=False))
        return net, (1, 28, 28), "MLP 784-40-20-10 no bias (local stand-in)"


def resnet20() -> tuple[nn.Module, tuple[int, ...], str] | None:
    try:
        from pruning.models.resnet_cifar import CifarResNet
    except ImportError:
        return None
    net = CifarResNet(20, 10, 3)
    label = "ResNet-20 (random weights)"
    if CHECKPOINT.is_file():
        sd = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
        net.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})
        label = f"ResNet-20 ({CHECKPOINT.name})"
    return net, (3, 32, 32), label


# ------------------------------------------------------------------------------ G variants
@contextlib.contextmanager
def torch_batchnorm() -> Any:
    """Inside: G's builder leaves eval-mode BatchNorm to torch (no affine fast path), to show
    what `pruning.gradients.affine_batchnorm` saves, side by side."""
    # patched where G's builder looks it up (pruning.gradients.compute), not the package re-export
    saved = grad_compute.affine_batchnorm
    grad_compute.affine_batchnorm = lambda model: contextlib.nullcontext([])
    try:
        yield
    finally:
        grad_compute.affine_batchnorm = saved


def floor(model: nn.Module, layout: ParamLayout, x: torch.Tensor, y: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    """Plain batched forward + backward of the summed loss, same chunks, eval mode."""
    model.eval()
    params = get_params(model, layout)
    acc = [torch.zeros_like(p) for p in params]
    for s in range(0, x.shape[0], chunk):
        loss = F.cross_entropy(model(x[s:s + chunk]), y[s:s + chunk], reduction="sum")
        for a, g in zip(acc, torch.autograd.grad(loss, params)):
            a.add_(g)
    return acc


def loop(model: nn.Module, layout: ParamLayout, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """N per-sample autograd.grad calls, rows written into a preallocated G."""
    model.eval()
    params = get_params(model, layout)
    G = torch.empty(x.shape[0], layout.numel)
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        G[i] = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    return G


def bench_g(name: str, model: nn.Module, shape: tuple[int, ...], n: int, chunk: int, repeats: int,
            loop_n: int) -> tuple[dict[str, Any], torch.Tensor, ParamLayout]:
    layout = make_layout(model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, *shape, generator=g), torch.randint(10, (n,), generator=g)
    compute_gradient_matrix(model, layout, x[:4], y[:4], chunk_size=4)  # warm-up (vmap tracing)
    floor(model, layout, x[:4], y[:4], 4)
    fl = measure(lambda: floor(model, layout, x, y, chunk), repeats)
    gm = measure(lambda: compute_gradient_matrix(model, layout, x, y, chunk_size=chunk), repeats)
    src = TensorRows(x, y, 1)
    vp = measure(lambda: grad_compute._row_gradients(model, layout, src, layout.names, lambda s, e, g: None,
                                                  chunk_size=chunk, loss_fn=F.cross_entropy, progress=False), repeats)
    with torch_batchnorm():  # the same G with BatchNorm as torch runs it under vmap
        gb = measure(lambda: compute_gradient_matrix(model, layout, x, y, chunk_size=chunk), repeats)
    gb.result = None
    G = gm.result.dense()
    gm.result = None
    with tempfile.TemporaryDirectory(prefix="bench-grads-") as tmp:
        st = measure(lambda: compute_gradient_matrix(model, layout, x, y, chunk_size=chunk, stream=True,
                                                     store_dir=Path(tmp) / "g"), 1)
        st_err = float((st.result.dense() - G).abs().max() / G.abs().max())
        st.result = None
    wr = measure(lambda: torch.empty(n, layout.numel).fill_(1.0), repeats)
    wr.result = None
    lp = measure(lambda: loop(model, layout, x[:loop_n], y[:loop_n]), 1)
    # median row relative error: a row can legitimately differ when float32 rounding flips a ReLU
    # whose pre-activation is ~1e-7 (the float64 gradient itself jumps by ~1e-2 there)
    lp_err = float(((lp.result - G[:loop_n]).norm(dim=1) / G[:loop_n].norm(dim=1).clamp_min(1e-30)).median())
    lp_seconds = lp.seconds * n / loop_n  # extrapolated when the loop ran on fewer samples
    row = {"model": name, "N": n, "p": layout.numel, "chunk": chunk, "floor": fl, "G": gm, "G_bn": gb, "vmap": vp,
           "stream": st,
           "write": wr,
           "loop": lp, "loop_seconds": lp_seconds, "loop_n": loop_n, "loop_err": lp_err, "stream_err": st_err,
           "G_mb": n * layout.numel * 4 / 2**20}
    return row, G, layout


# ---------------------------------------------------------------------------------- WoodFisher
def bench_woodfisher(Gb: torch.Tensor, damp: float) -> dict[str, Any]:
    n, b = Gb.shape
    g = torch.Generator().manual_seed(1)
    w = torch.randn(b, generator=g, dtype=torch.float64) * 0.05
    pruned = torch.rand(b, generator=g) < 0.9

    def closed() -> tuple[torch.Tensor, torch.Tensor]:
        inv = BlockInverse(Gb, damp, "woodbury")
        d = inv.diag()
        return d, inv.matvec(torch.where(pruned, -w / d, torch.zeros_like(w)))

    def recursion() -> tuple[torch.Tensor, torch.Tensor]:
        Finv = fisher_inverse_rank1(Gb, damp)
        d = Finv.diagonal().clone()
        return d, Finv @ torch.where(pruned, -w / d, torch.zeros_like(w))

    cf = measure(closed, 1)
    rc = measure(recursion, 1)
    (d1, u1), (d2, u2) = cf.result, rc.result
    return {"N": n, "B": b, "closed": cf, "rank1": rc,
            "diag_err": float(((d1 - d2).abs() / d2.abs()).max()),
            "update_err": float((u1 - u2).norm() / u2.norm())}


def fmt_s(s: float) -> str:
    return f"{s:8.2f}s" if s >= 0.1 else f"{s * 1e3:7.1f}ms"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke variant: N=64, B=256")
    ap.add_argument("--n", type=int, default=None, help="rows of G (default 1000; 64 with --quick)")
    ap.add_argument("--block", type=int, default=None, help="WoodFisher block size B (default 2000)")
    ap.add_argument("--damp", type=float, default=1e-5)
    ap.add_argument("--repeats", type=int, default=None, help="timing repeats, minimum kept (default 2)")
    ap.add_argument("--loop-n", type=int, default=None, help="samples for the per-sample loop (default N)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default torch's)")
    args = ap.parse_args(argv)
    n = args.n or (64 if args.quick else 1000)
    block = args.block or (256 if args.quick else 2000)
    repeats = args.repeats or (1 if args.quick else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, N={n}, B={block}")
    models = [("MLPNet", *mlpnet(), n)]  # one vmap call: its output is G (no copy)
    r20 = resnet20()
    if r20 is None:
        print("ResNet-20: pruning.models.resnet_cifar is not available, skipped")
    else:
        models.append(("ResNet-20", *r20, 64))
    rows, wf = [], None
    for key, model, shape, label, chunk in models:
        print(f"\n== {label}", flush=True)
        row, G, layout = bench_g(key, model, shape, n, chunk, repeats, min(args.loop_n or n, n))
        rows.append(row)
        if key == "ResNet-20" or (wf is None and key == models[-1][0]):
            # the largest prunable tensor, cut to one B-column block
            t = max(range(len(layout.names)), key=lambda i: layout.sizes[i])
            sl = layout.slices()[t]
            cols = G[:, sl.start:sl.start + min(block, sl.stop - sl.start)]
            print(f"WoodFisher block: {cols.shape[1]} columns of {layout.names[t]}", flush=True)
            wf = bench_woodfisher(cols, args.damp)
        del G

    print("\nGradient matrix G (ratios: G time / other time; < 1 means G is faster)")
    hdr = (f"{'model':10} {'N':>5} {'p':>7} {'chunk':>5} {'floor':>9} {'write':>9} {'G':>9} {'G torchBN':>9} "
           f"{'vmap':>9} {'stream':>9} {'loop':>9}  "
           f"{'G/floor':>7} {'torchBN/floor':>13} {'vmap/floor':>10} {'G/max(floor,write)':>18} {'G/loop':>7} {'stream/floor':>12}  "
           f"{'peak MB floor/G/stream/loop':>27} {'G MB':>5}  err(loop, median row) err(stream)")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        fl, g, gb, vp, st, lp, wr = r["floor"], r["G"], r["G_bn"], r["vmap"], r["stream"], r["loop"], r["write"]
        loop_s = fmt_s(r["loop_seconds"]) + ("*" if r["loop_n"] < r["N"] else " ")
        peaks = f"{fl.peak_mb:.0f}/{g.peak_mb:.0f}/{st.peak_mb:.0f}/{lp.peak_mb:.0f}"
        print(f"{r['model']:10} {r['N']:>5} {r['p']:>7} {r['chunk']:>5} {fmt_s(fl.seconds)} {fmt_s(wr.seconds)} "
              f"{fmt_s(g.seconds)} {fmt_s(gb.seconds)} {fmt_s(vp.seconds)} {fmt_s(st.seconds)} {loop_s}"
              f"{g.seconds / fl.seconds:7.2f}x {gb.seconds / fl.seconds:12.2f}x {vp.seconds / fl.seconds:9.2f}x "
              f"{g.seconds / max(fl.seconds, wr.seconds):17.2f}x {g.seconds / r['loop_seconds']:6.3f}x "
              f"{st.seconds / fl.seconds:11.2f}x  {peaks:>27} {r['G_mb']:5.0f}  {r['loop_err']:.1e}               "
              f"{r['stream_err']:.1e}")
    if any(r["loop_n"] < r["N"] for r in rows):
        print("* loop time extrapolated linearly from --loop-n samples")
    if wf is not None:
        cf, rc = wf["closed"], wf["rank1"]
        print(f"\nWoodFisher block inverse, N={wf['N']}, B={wf['B']}, damp={args.damp:g}: diag(F^-1) and F^-1 v")
        print(f"  closed form (N x N Woodbury) {fmt_s(cf.seconds)}  peak {cf.peak_mb:7.0f} MB")
        print(f"  rank-1 recursion             {fmt_s(rc.seconds)}  peak {rc.peak_mb:7.0f} MB")
        print(f"  speed-up {rc.seconds / cf.seconds:.1f}x; max rel diff diag {wf['diag_err']:.1e}, "
              f"rel diff update {wf['update_err']:.1e}")


if __name__ == "__main__":
    main()
