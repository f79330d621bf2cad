#!/usr/bin/env bash
# The issue-17 benchmarks on a CUDA device, in one go (each step time-boxed, a failing step does not
# stop the others). Writes each step's full output to OUTDIR and prints the tables.
#
#   bash bench/gpu.sh [OUTDIR] [SEEDS]      # OUTDIR default bench-gpu/, SEEDS of the MLPNet study default 1
#
# Needs ../shared/data (the published checkpoints and the development prefixes; bench/reproduce.py).
# Steps:
#   1. bench_papers.py --device cuda: the MLPNet table cell at N = 10,000 (G vs the batched floor and the
#      per-sample loop, the Woodbury factorisation, each method's first and extra cell, swap vs lr stage)
#   2. reproduce.py mlpnet device=cuda: the whole oneshot_mlpnet_mnist study for SEEDS seeds, launched as a
#      user would (wall time printed), ours beside the published cells
#   3. reproduce.py resnet20b device=cuda at 0.5 and 0.9, one seed: option-B ResNet-20, CHITA's protocol
set -u
out=${1:-bench-gpu}
seeds=${2:-1}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
failed=0
step() {  # step NAME SECONDS CMD...: run, keep the log, print its tail and the wall time
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$out/$name.log"
    echo "=== $name: exit $rc, wall $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2
# without a usable CUDA device every step would fail job by job: stop here with one line
if ! python3 -c "import sys, torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else ''); sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device visible to torch (torch.cuda.is_available() is False); bench/gpu.sh needs a GPU" >&2
    exit 2
fi
step bench_papers "${LIMIT_PAPERS:-240}" python3 bench/bench_papers.py --device cuda
step reproduce_mlpnet "${LIMIT_MLPNET:-240}" python3 bench/reproduce.py mlpnet --seeds "$seeds" \
    --out "${REPRO_OUT:-/tmp/bench-gpu-runs}" device=cuda progress=false
step reproduce_resnet20b "${LIMIT_RESNET:-150}" python3 bench/reproduce.py resnet20b --seeds 1 --sparsity 0.5 0.9 \
    --out "${REPRO_OUT:-/tmp/bench-gpu-runs}" device=cuda progress=false
echo "=== $failed step(s) failed"
exit $((failed > 0))
