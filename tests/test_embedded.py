"""The embedded default end to end (issue 2): run record keys and sane values, skip on re-launch."""

from __future__ import annotations

import json

import pytest

from pruning.task import run


def test_default_runs_end_to_end(make_cfg, tmp_path):
    cfg = make_cfg()
    run_dir = tmp_path / "run"
    data = run(cfg, run_dir)
    rec = json.loads((run_dir / "result.json").read_text())
    assert rec == data or rec["status"] == "completed"
    assert rec["status"] == "completed" and rec["schema"] == 1
    for key in ("model", "dataset", "method", "noise", "noise_level", "sparsity", "seed", "sweep"):
        assert key in rec["index"]
    assert rec["index"]["model"] == "mlp" and rec["index"]["method"] == "magnitude"
    m = rec["metrics"]
    for key in ("dense_acc", "dense_loss", "pruned_acc", "pruned_loss", "finetuned_acc", "final_acc",
                "sparsity_prunable", "sparsity_total", "nnz_prunable", "nnz_total"):
        assert key in m
    assert abs(m["sparsity_prunable"] - cfg.sparsity) <= 0.005
    assert 0.0 <= m["pruned_acc"] <= 1.0 and 0.0 <= m["dense_acc"] <= 1.0
    assert m["dense_acc"] > 0.9  # a trained MLP on digits
    assert set(rec["timings"]) >= {"setup", "dense_eval", "prune", "finetune", "eval", "total"}
    assert rec["env"]["packages"]["torch"] and rec["env"]["packages"]["pruning-noise"]
    assert {"git_commit", "git_dirty", "git_diff_sha1"} <= set(rec["env"])
    assert (run_dir / "config.resolved.json").is_file()


def test_git_state_says_when_tracked_files_were_edited(tmp_path):
    """A run from an edited checkout is not recorded as if it ran HEAD's code."""
    import hashlib
    import subprocess

    from pruning.record import git_state

    assert git_state(tmp_path) == {"git_commit": None, "git_dirty": None, "git_diff_sha1": None}
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "notes.txt").write_text("untracked files are not the code\n")
    assert git_state(tmp_path) == {"git_commit": head, "git_dirty": False, "git_diff_sha1": None}
    (tmp_path / "a.py").write_text("x = 2\n")
    diff = subprocess.run([*git, "diff", "HEAD"], capture_output=True, text=True, check=True).stdout
    state = git_state(tmp_path)
    assert state["git_commit"] == head and state["git_dirty"] is True
    assert state["git_diff_sha1"] == hashlib.sha1(diff.encode()).hexdigest()


def test_relaunch_skips_completed(make_cfg, tmp_path, capsys):
    cfg = make_cfg()
    run(cfg, tmp_path / "run")
    first = json.loads((tmp_path / "run" / "result.json").read_text())
    capsys.readouterr()
    run(cfg, tmp_path / "run")
    assert "skip" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "result.json").read_text()) == first


def test_dense_cache_ignores_keys_that_cannot_change_the_dense_model(make_cfg, tmp_path):
    from pruning.dense import cache_path

    path = cache_path(make_cfg())
    assert cache_path(make_cfg("dataset.batch_size=32")) == path
    assert cache_path(make_cfg("model.train.epochs=3")) != path
    assert cache_path(make_cfg("dataset.test_fraction=0.3")) != path


def test_a_sparse_checkpoint_keeps_its_pruned_weights_pruned(make_cfg, tmp_path):
    """A run's model.pt as model.checkpoint: its zeros count as pruned (out of G, never regrown by
    fine-tuning), and a target below its sparsity prunes nothing more, with a warning, instead of
    filling the mask with pruned weights picked by index."""
    first = run(make_cfg("sparsity=0.9"), tmp_path / "first")
    ckpt = tmp_path / "first" / "model.pt"
    rec = run(make_cfg(f"model.checkpoint={ckpt}", "method=woodfisher", "sparsity=0.5", "finetune=short",
                       "finetune.epochs=1"), tmp_path / "second")
    warnings = rec.get("warnings", [])
    assert any("are exactly zero: they count as pruned" in w for w in warnings), warnings
    assert any("keeps more weights than the" in w and "stay pruned" in w for w in warnings), warnings
    # after fine-tuning: still the first run's 90 %, on the same support
    assert rec["metrics"]["nnz_prunable"] == first["metrics"]["nnz_prunable"]
    assert rec["metrics"]["sparsity_prunable"] == pytest.approx(first["metrics"]["sparsity_prunable"])
