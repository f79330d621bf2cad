"""Calibration rows read from a dataset a block at a time (issue 9): the same G as in-memory
tensors, one block of examples held at a time, sub-batched rows equal whole mini-batches, and
calibration-input noise drawn per block so that G does not depend on the chunking."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pruning.calibration import DatasetRows, TensorRows
from pruning.gradients import build_gradient_matrix, compute_gradient_matrix, compute_gradients
from pruning.layout import make_layout


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 1.5)
    return net


def dataset(n: int = 40) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 2, 5, 5, generator=g), torch.randint(3, (n,), generator=g))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mini_batch,block_rows,chunk", [(1, 4, 3), (3, 2, 5), (3, 1, 2)])
def test_dataset_rows_equal_tensor_rows(mini_batch, block_rows, chunk):
    model, ds = conv_net(), dataset()
    layout = make_layout(model)
    n_rows = 9
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(2))[:n_rows * mini_batch]
    x, y = ds.tensors[0][idx], ds.tensors[1][idx]
    rows = DatasetRows(ds, idx.view(n_rows, mini_batch), key="toy", block_rows=block_rows)
    G = compute_gradient_matrix(model, layout, rows, mini_batch=mini_batch, chunk_size=chunk).dense()
    ref = compute_gradients(model, layout, x, y, mini_batch=mini_batch, chunk_size=64)
    assert rel(G, ref) < 1e-6
    # read in order, each block once, even when chunks straddle blocks
    assert rows.blocks_read == -(-n_rows // block_rows)


def test_one_block_of_examples_at_a_time():
    model, ds = conv_net(), dataset()
    seen = []

    def prepare(x: torch.Tensor, y: torch.Tensor, block: int) -> torch.Tensor:
        seen.append((block, x.shape[0]))
        return x

    rows = DatasetRows(ds, torch.arange(36).view(12, 3), key="toy", prepare=prepare, block_rows=5)
    compute_gradient_matrix(model, make_layout(model), rows, mini_batch=3, chunk_size=4)
    assert seen == [(0, 15), (1, 15), (2, 6)]  # 5 rows x 3 examples, then the 2-row tail


@pytest.mark.parametrize("sub_batch", [1, 2, 4])
def test_sub_batches_give_the_mini_batch_gradient(sub_batch):
    model, ds = conv_net(), dataset()
    layout = make_layout(model)
    x, y = ds.tensors[0][:35], ds.tensors[1][:35]
    ref = compute_gradients(model, layout, x, y, mini_batch=5, chunk_size=3)
    G = compute_gradients(model, layout, TensorRows(x, y, 5), mini_batch=5, chunk_size=3, sub_batch=sub_batch)
    assert rel(G, ref) < 1e-5


def noisy_rows(ds: TensorDataset, idx: torch.Tensor, key: str = "toy") -> DatasetRows:
    def prepare(x: torch.Tensor, y: torch.Tensor, block: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(100 + block)
        return x + 0.5 * torch.randn(x.shape, generator=g)

    return DatasetRows(ds, idx, key=key, prepare=prepare, block_rows=3)


def test_input_noise_per_block_does_not_depend_on_chunking(tmp_path):
    model, ds = conv_net(), dataset()
    layout = make_layout(model)
    idx = torch.arange(20).view(10, 2)
    a = compute_gradient_matrix(model, layout, noisy_rows(ds, idx), mini_batch=2, chunk_size=4).dense()
    b = compute_gradient_matrix(model, layout, noisy_rows(ds, idx), mini_batch=2, chunk_size=7).dense()
    # stream mode with one pass per tensor: the rows are read (and noised) once per pass
    c = compute_gradient_matrix(model, layout, noisy_rows(ds, idx), mini_batch=2, chunk_size=5, stream=True,
                                stream_cols=1, store_dir=tmp_path / "g").dense()
    clean = compute_gradient_matrix(model, layout, DatasetRows(ds, idx, key="toy"), mini_batch=2).dense()
    assert rel(a, b) < 1e-6 and rel(c, a) < 1e-6
    assert rel(a, clean) > 1e-2  # the noise is there


def test_cache_keys_on_the_source(tmp_path):
    model, ds = conv_net(), dataset()
    layout = make_layout(model)
    idx = torch.arange(12).view(6, 2)
    cal = {"mini_batch": 2, "chunk_size": 4, "cache": True}
    G1 = build_gradient_matrix(model, layout, noisy_rows(ds, idx), None, idx, cal, cache_dir=tmp_path, seed=0)
    G2 = build_gradient_matrix(model, layout, noisy_rows(ds, idx), None, idx, cal, cache_dir=tmp_path, seed=0)
    G3 = build_gradient_matrix(model, layout, noisy_rows(ds, idx, key="other noise"), None, idx, cal,
                               cache_dir=tmp_path, seed=0)
    assert G1.key == G2.key != G3.key
    changed = TensorDataset(ds.tensors[0] + 1.0, ds.tensors[1])  # same key, other data: the first row shows it
    G4 = build_gradient_matrix(model, layout, noisy_rows(changed, idx), None, idx, cal, cache_dir=tmp_path, seed=0)
    assert G4.key != G1.key
    assert torch.equal(G1.dense(), G2.dense())
    assert len(list(tmp_path.iterdir())) == 3


def test_job_reads_calibration_rows_in_blocks(make_cfg, tmp_path, monkeypatch):
    """A pruning job builds G from rows read block by block; sub-batching a row's m examples
    gives the same pruned model as one vmap call per row."""
    import json

    from pruning import calibration
    from pruning.task import run

    reads = []
    orig = calibration.DatasetRows.block

    def spy(self, b):
        before = self.blocks_read
        x, y = orig(self, b)
        if self.blocks_read > before:  # a read, not the held block handed out again
            reads.append(tuple(x.shape[:2]))
        return x, y

    monkeypatch.setattr(calibration.DatasetRows, "block", spy)
    common = ("method=woodfisher", "sparsity=0.8", "calibration.num_samples=40", "calibration.mini_batch=4",
              "calibration.chunk_size=16", "calibration.cache=false")
    run(make_cfg(*common), tmp_path / "whole")
    assert reads and all(r[0] * r[1] <= calibration.BLOCK_EXAMPLES for r in reads)
    assert sum(r[0] for r in reads) == 40
    run(make_cfg(*common, "calibration.sub_batch=3"), tmp_path / "sub")
    a, b = (json.loads((tmp_path / d / "result.json").read_text())["metrics"] for d in ("whole", "sub"))
    assert a["pruned_acc"] == b["pruned_acc"] and a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-5)


def test_loader_processes_change_nothing_but_speed():
    """Training order (make_loader) and calibration rows are the same with loader processes."""
    from pruning.train import make_loader

    ds = dataset(30)
    orders = [[y.tolist() for _, y in make_loader(ds, 8, seed=3, num_workers=w)] for w in (0, 2)]
    assert orders[0] == orders[1]
    model = conv_net()
    layout = make_layout(model)
    idx = torch.arange(24).view(8, 3)
    G0, G2 = (compute_gradient_matrix(model, layout, DatasetRows(ds, idx, key="toy", block_rows=3, num_workers=w),
                                      mini_batch=3, chunk_size=4).dense() for w in (0, 2))
    assert torch.equal(G0, G2)


def test_num_workers_is_validated(make_cfg):
    from pruning.config import validate
    from pruning.errors import ConfigError

    with pytest.raises(ConfigError, match="dataset.num_workers"):
        validate(make_cfg("+dataset.num_workers=-1"))
    with pytest.raises(ConfigError, match="calibration.sub_batch"):
        validate(make_cfg("calibration.sub_batch=0"))


def test_imagenet_job_streams_decoded_rows_with_loader_processes(make_cfg, tmp_path):
    """End to end on real ImageFolder files (JPEG/PNG decoded by torchvision): a WoodFisher job
    with mini-batch rows, sub-batches and two loader processes gives the G, and the pruned model,
    of the same job read in-process without sub-batches."""
    import json

    from test_data import write_imagefolder

    from pruning.task import run

    data = tmp_path / "data"
    write_imagefolder(data, {"n01440764": 8, "n01443537": 8}, "train", 0)
    write_imagefolder(data, {"n01440764": 3, "n01443537": 3}, "val", 1)
    common = ("model=resnet20", "model.train.epochs=1", "model.train.batch_size=8", "model.train.milestones=[1]",
              "dataset=imagenet", "dataset.image_size=16", "dataset.resize_size=20", "dataset.batch_size=8",
              "method=woodfisher", "sparsity=0.5", "calibration.num_samples=6", "calibration.mini_batch=2",
              "calibration.chunk_size=4", "calibration.cache=false")
    a = run(make_cfg(*common, "dataset.num_workers=2", "calibration.sub_batch=1"), tmp_path / "workers")
    b = run(make_cfg(*common, "dataset.num_workers=0"), tmp_path / "in_process")
    assert a["status"] == b["status"] == "completed"
    ma, mb = (json.loads((tmp_path / d / "result.json").read_text())["metrics"] for d in ("workers", "in_process"))
    assert ma["pruned_loss"] == pytest.approx(mb["pruned_loss"], rel=1e-5)
    assert ma["sparsity_prunable"] == mb["sparsity_prunable"] == pytest.approx(0.5, abs=1e-4)


def test_multistage_caches_the_first_stage_only(make_cfg, tmp_path):
    """A 3-stage lr job caches G of stage 1 (dense weights: other jobs of the seed reuse it); the
    later stages' G, at this job's own weights, is kept only with cache_stages=all. The result does
    not depend on it."""
    import json

    from pruning.config import validate
    from pruning.errors import ConfigError
    from pruning.task import run

    metrics = {}
    for stages_cached, entries in (("first", 1), ("all", 3)):
        cache = tmp_path / f"cache-{stages_cached}"
        cfg = make_cfg("method=lr", "sparsity=0.8", "schedule=multistage", "schedule.stages=3",
                       f"paths.cache_dir={cache}", f"calibration.cache_stages={stages_cached}")
        run(cfg, tmp_path / stages_cached)
        assert len([p for p in (cache / "grads").iterdir() if not p.name.startswith(".")]) == entries
        rec = json.loads((tmp_path / stages_cached / "result.json").read_text())
        assert len(rec["stages"]) == 3
        metrics[stages_cached] = rec["metrics"]
    for key in ("pruned_acc", "final_acc", "final_loss", "nnz_prunable"):
        assert metrics["first"][key] == metrics["all"][key]
    with pytest.raises(ConfigError, match="calibration.cache_stages"):
        validate(make_cfg("calibration.cache_stages=last"))
