"""The gradient matrix G (issue 4A): vmap rows equal a per-sample autograd loop, blocked and
streamed storage equal the dense matrix, and the disk cache hits and misses on the right keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pruning.gradients.cache as gmod
from pruning.calibrate import apply_row_noise
from pruning.gradients import (
    GradientMatrix,
    affine_batchnorm,
    build_gradient_matrix,
    compute_gradient_matrix,
    compute_gradients,
    stream_groups,
)
from pruning.layout import ParamLayout, get_params, make_layout
from pruning.noise import NoiseModel


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 4))


def conv_bn() -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 3, 3, stride=2, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(3 * 2 * 2, 5))
    with torch.no_grad():  # non-trivial running statistics, so eval mode differs from train mode
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    net.train()  # G must switch to eval mode itself, and restore this afterwards
    return net


def loop_reference(model: nn.Module, layout, x: torch.Tensor, y: torch.Tensor, m: int) -> torch.Tensor:
    """Independent reference: one autograd.grad call per mini-batch, model in eval mode."""
    was = model.training
    model.eval()
    params = get_params(model, layout)
    rows = []
    for i in range(x.shape[0] // m):
        loss = F.cross_entropy(model(x[i * m:(i + 1) * m]), y[i * m:(i + 1) * m])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    model.train(was)
    return torch.stack(rows)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def data(shape: tuple[int, ...], n: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(classes, (n,), generator=g)


@pytest.mark.parametrize("mini_batch", [1, 3])
def test_mlp_rows_match_autograd_loop(mini_batch):
    model = mlp()
    layout = make_layout(model)
    x, y = data((3, 4), 30, 4)
    G = compute_gradients(model, layout, x, y, mini_batch=mini_batch, chunk_size=4)
    ref = loop_reference(model, layout, x, y, mini_batch)
    assert G.shape == (30 // mini_batch, layout.numel)
    assert rel_err(G, ref) < 1e-5
    assert torch.allclose(G, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mini_batch", [1, 2])
def test_batchnorm_model_uses_eval_mode(mini_batch):
    model = conv_bn()
    layout = make_layout(model)  # the three conv/linear weights; BN parameters are not prunable
    x, y = data((2, 5, 5), 12, 5, seed=3)
    G = compute_gradient_matrix(model, layout, x, y, mini_batch=mini_batch, chunk_size=5).dense()
    ref = loop_reference(model, layout, x, y, mini_batch)
    assert model.training  # restored
    assert rel_err(G, ref) < 1e-5
    # and it is not what train-mode BatchNorm would give
    model.train()
    params = get_params(model, layout)
    loss = F.cross_entropy(model(x[:mini_batch]), y[:mini_batch])
    train_row = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    assert rel_err(train_row, ref[0]) > 1e-3


@pytest.mark.parametrize("block_size", [None, 20, 1000])
def test_blocked_and_streamed_equal_dense(block_size, tmp_path):
    model = conv_bn()
    layout = make_layout(model)
    x, y = data((2, 5, 5), 11, 5, seed=4)
    dense = compute_gradients(model, layout, x, y, chunk_size=4)
    mem = compute_gradient_matrix(model, layout, x, y, block_size=block_size, chunk_size=4)
    streamed = compute_gradient_matrix(model, layout, x, y, block_size=block_size, chunk_size=4, stream=True,
                                       store_dir=tmp_path / "store")
    # one pass per tensor (a tiny column budget) into a scratch directory
    scratch = compute_gradient_matrix(model, layout, x, y, block_size=block_size, chunk_size=3, stream=True,
                                      stream_cols=1)
    assert streamed.on_disk and not mem.on_disk
    assert mem.blocks == layout.blocks(block_size) == streamed.blocks
    for gm in (mem, streamed, scratch):
        assert all(d.shape == (11, sl.stop - sl.start) for sl, d in zip(gm.blocks, gm.data))
        assert rel_err(gm.dense(), dense) < 1e-6  # bit-equal at equal chunk size; rounding otherwise
    w = torch.randn(layout.numel, dtype=torch.float32)
    r = torch.randn(11)
    assert torch.allclose(streamed.matvec(w), dense @ w, rtol=1e-4, atol=1e-5)
    assert torch.allclose(streamed.rmatvec(r), dense.T @ r, rtol=1e-4, atol=1e-5)
    # columns across block boundaries, and rows
    sl = slice(5, min(60, layout.numel))
    assert torch.equal(mem.columns(sl), dense[:, sl])
    assert torch.allclose(streamed.rows(2, 7), dense[2:7], rtol=1e-6, atol=1e-8)


def test_stream_groups_bound_columns_per_pass():
    layout = ParamLayout(("a", "b", "c", "d"), ((10,), (30,), (5,), (50,)))
    assert stream_groups(layout, 40) == [[0, 1], [2], [3]]
    assert stream_groups(layout, 1000) == [[0, 1, 2, 3]]
    assert stream_groups(layout, 1) == [[0], [1], [2], [3]]


class CountingCompute:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = gmod.compute_gradient_matrix

        def wrapped(*a, **kw):
            self.calls += 1
            return real(*a, **kw)

        monkeypatch.setattr(gmod, "compute_gradient_matrix", wrapped)


@pytest.mark.parametrize("stream", [False, True])
def test_cache_hit_and_miss(stream, tmp_path, monkeypatch):
    counter = CountingCompute(monkeypatch)
    model = mlp()
    layout = make_layout(model)
    x, y = data((3, 4), 16, 4)
    idx = torch.arange(16).view(8, 2)
    cal = {"mini_batch": 2, "chunk_size": 3, "block_size": None, "cache": True, "stream": stream}
    G1 = build_gradient_matrix(model, layout, x, y, idx, cal, cache_dir=tmp_path, seed=0)
    assert counter.calls == 1 and G1.key is not None
    # a hit: same G bit for bit, also with another block size and in the other storage mode
    G2 = build_gradient_matrix(model, layout, x, y, idx, {**cal, "block_size": 5}, cache_dir=tmp_path, seed=0)
    G3 = build_gradient_matrix(model, layout, x, y, idx, {**cal, "stream": not stream}, cache_dir=tmp_path, seed=0)
    assert counter.calls == 1
    assert torch.equal(G2.dense(), G1.dense()) and torch.equal(G3.dense(), G1.dense())
    assert G2.key == G1.key and torch.equal(G2.indices, idx) and G3.on_disk == (not stream)
    assert torch.equal(G1.dense(), compute_gradients(model, layout, x, y, mini_batch=2, chunk_size=3))
    # every key component misses
    changed = [
        dict(idx=idx.flip(0)),
        dict(seed=1),
        dict(x=x + 1e-3),
        dict(y=(y + 1) % 4),
        dict(extra={"noise": "weights"}),
    ]
    for i, ch in enumerate(changed):
        build_gradient_matrix(model, layout, ch.get("x", x), ch.get("y", y), ch.get("idx", idx), cal,
                              cache_dir=tmp_path, seed=ch.get("seed", 0), key_extra=ch.get("extra"))
        assert counter.calls == 2 + i, ch
    G4 = build_gradient_matrix(model, layout, x[:12], y[:12], idx[:6], cal, cache_dir=tmp_path, seed=0)  # N
    assert counter.calls == 7 and G4.num_rows == 6
    G5 = build_gradient_matrix(model, layout, x, y, idx.view(16, 1), {**cal, "mini_batch": 1},
                               cache_dir=tmp_path, seed=0)  # m
    assert counter.calls == 8 and G5.num_rows == 16
    with torch.no_grad():
        model[1].bias.add_(0.01)  # a non-prunable parameter changes G too
    build_gradient_matrix(model, layout, x, y, idx, cal, cache_dir=tmp_path, seed=0)
    assert counter.calls == 9
    # cache off: always computed, nothing written
    before = sorted(p.name for p in tmp_path.iterdir())
    build_gradient_matrix(model, layout, x, y, idx, {**cal, "cache": False}, cache_dir=tmp_path, seed=0)
    assert counter.calls == 10 and sorted(p.name for p in tmp_path.iterdir()) == before


def test_bad_flag_is_a_config_error(tmp_path):
    from pruning.errors import ConfigError

    model = mlp()
    x, y = data((3, 4), 4, 4)
    with pytest.raises(ConfigError, match="calibration.stream"):
        build_gradient_matrix(model, make_layout(model), x, y, torch.arange(4).view(4, 1),
                              {"stream": "yes"}, cache_dir=tmp_path)


class ScaleRows(NoiseModel):
    kind = "scale"
    ACTS_ON = frozenset({"gradient_rows"})

    def gradients(self, G: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return G * torch.arange(1, G.shape[0] + 1, dtype=G.dtype).unsqueeze(1) if G.shape[0] == 9 else G * 2


@pytest.mark.parametrize("stream", [False, True])
def test_row_noise_after_cache(stream):
    model = mlp()
    layout = make_layout(model)
    x, y = data((3, 4), 9, 4)
    G = compute_gradient_matrix(model, layout, x, y, block_size=10, stream=stream)
    assert apply_row_noise(G, NoiseModel(), torch.Generator()) is G
    out = apply_row_noise(G, ScaleRows(), torch.Generator(), chunk_rows=9)
    assert isinstance(out, GradientMatrix) and out.blocks == G.blocks and out.on_disk == stream
    expected = G.dense() * torch.arange(1, 10, dtype=torch.float32).unsqueeze(1)
    assert torch.allclose(out.dense(), expected)
    assert not torch.allclose(G.dense(), expected)  # the cached matrix itself is untouched


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("bn_cls,shape", [(nn.BatchNorm1d, (6, 4)), (nn.BatchNorm1d, (6, 4, 3)),
                                          (nn.BatchNorm2d, (6, 4, 3, 5))])
def test_affine_batchnorm_equals_eval_batchnorm(bn_cls, shape, affine):
    g = torch.Generator().manual_seed(0)
    bn = bn_cls(4, affine=affine)
    bn.running_mean.copy_(torch.randn(4, generator=g))
    bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
    if affine:
        with torch.no_grad():
            bn.weight.copy_(torch.randn(4, generator=g))
            bn.bias.copy_(torch.randn(4, generator=g))
    bn.eval()
    x = torch.randn(*shape, generator=g)
    ref = bn(x)
    with affine_batchnorm(bn) as patched:
        assert patched == [bn]
        out = bn(x)
    assert "forward" not in bn.__dict__  # restored
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_affine_batchnorm_leaves_batch_statistics_alone():
    net = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3, track_running_stats=False), nn.BatchNorm2d(3))
    net[0].eval()
    net[1].eval()  # no running statistics: normalises with the batch's even in eval mode
    net[2].train()
    with pytest.raises(RuntimeError, match="boom"), affine_batchnorm(net) as patched:
        assert patched == [net[0]]
        raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in net)  # restored on error too


def test_rows_match_the_loop_when_batchnorm_parameters_are_prunable():
    """The affine BatchNorm path reads the module's weight and bias at call time, so rows over
    BatchNorm parameters (swapped in by functional_call) are differentiated too."""
    model = conv_bn()
    layout = make_layout(model, ["*"])  # every parameter, BatchNorm's weight and bias included
    assert any("1.weight" == n for n in layout.names)
    x, y = data((2, 5, 5), 10, 5, seed=5)
    G = compute_gradient_matrix(model, layout, x, y, chunk_size=4).dense()
    assert rel_err(G, loop_reference(model, layout, x, y, 1)) < 1e-5


@pytest.mark.parametrize("stream", [False, True])
def test_nonfinite_entries_are_counted_while_g_is_written(stream, tmp_path):
    """The NaN/inf count taken by the writer (and by the cache's verification read) equals a
    count over the dense G, and the calibration step refuses such a G without another pass."""
    from pruning.calibrate import check_finite
    from pruning.errors import ConfigError

    model = mlp()
    layout = make_layout(model)
    x, y = data((3, 4), 8, 4)
    x[3, 1, 2] = float("nan")  # one example: its row of G is NaN
    cal = {"mini_batch": 1, "chunk_size": 3, "stream": stream, "cache": True}
    idx = torch.arange(8).view(8, 1)
    fresh = build_gradient_matrix(model, layout, x, y, idx, cal, cache_dir=tmp_path, seed=0)
    cached = build_gradient_matrix(model, layout, x, y, idx, cal, cache_dir=tmp_path, seed=0)
    assert cached.entry is not None
    expected = int((~torch.isfinite(fresh.dense())).sum())
    assert expected > 0 and fresh.nonfinite == expected and cached.nonfinite == expected
    with pytest.raises(ConfigError, match=f"has {expected} NaN/inf entries"):
        check_finite(cached, 1)
    clean = compute_gradient_matrix(model, layout, x[:3], y[:3], stream=stream)
    assert clean.nonfinite == 0
    check_finite(clean, 1)


def test_gradients_never_import_the_noise_models():
    """Noise meets G in pruning.calibrate only: the gradients package does not know noise models."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, pruning.gradients; print(sorted(m for m in sys.modules if m.startswith('pruning.noise')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
    src = "".join(p.read_text() for p in (Path(__file__).resolve().parents[1] / "pruning" / "gradients").glob("*.py"))
    assert "pruning.noise" not in src and "import noise" not in src


def test_nonfinite_counts_survive_an_overflowing_sum():
    """The fast path (a finite sum has no NaN/inf terms) falls back to an exact count, so large
    finite entries whose sum overflows are not counted, and every NaN/inf is."""
    import numpy as np

    from pruning.gradients import nonfinite_entries
    from pruning.gradients.storage import count_nonfinite

    big = np.full((4, 5), 3e38, dtype=np.float32)
    assert count_nonfinite(big) == 0 and nonfinite_entries(torch.from_numpy(big)) == 0
    big[1, 2], big[3, 0], big[0, 0] = np.nan, np.inf, -np.inf
    assert count_nonfinite(big) == 3 and nonfinite_entries(torch.from_numpy(big)) == 3
