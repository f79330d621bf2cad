"""The pruned model every run leaves (issue 15 item 1): `<run_dir>/model.pt`, weights-only, its
sha256 in result.json, and `pruning.load_pruned` giving back a model that scores the recorded
accuracy on the run's test split."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import pruning
from pruning.config import result_overrides
from pruning.errors import ConfigError
from pruning.task import run
from pruning.train import evaluate

FAST = "model.train.epochs=2"


def _record(run_dir):
    return json.loads((run_dir / "result.json").read_text())


def test_run_saves_model_and_load_pruned_scores_final_acc(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    rec = run(make_cfg(FAST, "finetune=short", "finetune.epochs=1", "sparsity=0.8"), run_dir)
    path = run_dir / "model.pt"
    entry = _record(run_dir)["model_file"]
    assert entry["path"] == "model.pt" and entry["bytes"] == path.stat().st_size
    assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()

    blob = torch.load(path, weights_only=True)  # plain tensors and metadata only
    assert blob["meta"]["run_id"] == rec["run_id"] and blob["meta"]["index"]["sparsity"] == 0.8
    assert blob["meta"]["metrics"]["final_acc"] == rec["metrics"]["final_acc"]
    mask, state = blob["mask"], blob["state_dict"]
    flat = torch.cat([state[name].reshape(-1) for name in blob["prunable"]])
    assert mask.dtype == torch.bool and mask.numel() == flat.numel()
    assert torch.all(flat[~mask] == 0)  # the mask is the weights' zero pattern (fine-tuning kept it)
    assert int(mask.sum()) == rec["metrics"]["nnz_prunable"]

    loaded = pruning.load_pruned(run_dir)
    assert not loaded.model.training and torch.equal(loaded.mask, mask)
    acc = evaluate(loaded.model, loaded.data.test, torch.device("cpu"))["acc"]
    assert acc == pytest.approx(rec["metrics"]["final_acc"], abs=1e-12)
    assert rec["metrics"]["finetuned_acc"] == pytest.approx(acc, abs=1e-12)


def test_tampered_model_file_is_a_one_line_error(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    run(make_cfg(FAST), run_dir)
    with open(run_dir / "model.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ConfigError) as err:
        pruning.load_pruned(run_dir)
    msg = str(err.value)
    assert "\n" not in msg and str(run_dir / "model.pt") in msg and "sha256" in msg
    pruning.load_pruned(run_dir, verify=False)  # the caller may still load it knowingly
    (run_dir / "model.pt").unlink()
    with pytest.raises(ConfigError, match="model.pt.*does not exist"):
        pruning.load_pruned(run_dir)


def test_save_model_false_writes_no_model_and_keeps_run_identity(make_cfg, tmp_path):
    assert result_overrides(["save_model=false", "sparsity=0.5"]) == ["sparsity=0.5"]
    run_dir = tmp_path / "run"
    run(make_cfg(FAST, "save_model=false"), run_dir)
    assert not (run_dir / "model.pt").exists()
    assert "model_file" not in _record(run_dir)


def test_task_train_saves_dense_model_usable_as_checkpoint(make_cfg, tmp_path, caplog):
    train_dir = tmp_path / "train"
    with caplog.at_level("INFO"):
        rec = run(make_cfg(FAST, "task=train"), train_dir)
    cell = next(r.getMessage() for r in caplog.records if "cell     " in r.getMessage())
    assert "task=train" in cell and "method=" not in cell  # no pruning method played a part
    assert (train_dir / "checkpoint.pt").is_file()  # as before
    blob = torch.load(train_dir / "model.pt", weights_only=True)
    assert blob["mask"] is None and blob["meta"]["task"] == "train"
    loaded = pruning.load_pruned(train_dir)
    assert evaluate(loaded.model, loaded.data.test, torch.device("cpu"))["acc"] == pytest.approx(
        rec["metrics"]["dense_acc"], abs=1e-12)
    # model.pt is also a dense checkpoint for a new pruning run
    pruned = run(make_cfg(FAST, f"model.checkpoint={train_dir / 'model.pt'}"), tmp_path / "prune")
    assert pruned["metrics"]["dense_acc"] == pytest.approx(rec["metrics"]["dense_acc"], abs=1e-12)


def test_load_pruned_names_a_missing_run_dir(tmp_path):
    with pytest.raises(ConfigError, match="result.json.*is missing"):
        pruning.load_pruned(tmp_path / "nowhere")
