"""bench/reproduce.py: every preset names a shipped study, and the command it builds is the user's
launch (`launch.py -cd sweeps -cn <study>`) with the checkpoint, data folder, seeds and cells asked for."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import ROOT


def _reproduce():
    """bench/reproduce.py as a module (bench/ is scripts, not a package); registered before it runs,
    as its dataclasses need their module in sys.modules."""
    if "bench_reproduce" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_reproduce", ROOT / "bench" / "reproduce.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_reproduce"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_reproduce"]


@pytest.mark.parametrize("preset", sorted(_reproduce().PRESETS))
def test_preset_names_a_study(preset: str):
    study = _reproduce().PRESETS[preset].study
    assert (ROOT / "sweeps" / f"{study}.yaml").is_file(), f"preset {preset}: no sweeps/{study}.yaml"


def test_command_is_the_study_launch(tmp_path: Path):
    rep = _reproduce()
    ckpt, data = tmp_path / "weights.ckpt", tmp_path / "data"
    ckpt.write_bytes(b"")
    data.mkdir()
    args = rep.parse_args(["mlpnet-chitapp", "--seeds", "3", "--sparsity", "0.95", "0.98",
                           "--checkpoint", str(ckpt), "--data-dir", str(data), "--out", str(tmp_path / "o"),
                           "calibration.num_samples=100"])
    cmd = rep.command(args)
    assert cmd[1:6] == [str(ROOT / "launch.py"), "-cd", str(ROOT / "sweeps"), "-cn", "chitapp_mlpnet_mnist"]
    for expected in (f"model.checkpoint={ckpt}", f"paths.data_dir={data}", "seed=range(3)",
                     "sparsity=0.95,0.98", "calibration.num_samples=100"):
        assert expected in cmd
    assert not any(c.startswith("method=") for c in cmd)  # the study's own methods


def test_missing_checkpoint_is_one_line(tmp_path: Path):
    rep = _reproduce()
    args = rep.parse_args(["mlpnet", "--checkpoint", str(tmp_path / "absent.ckpt"), "--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="checkpoint .*absent.ckpt does not exist"):
        rep.command(args)


def test_side_by_side_keeps_variants_apart(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Two stage counts of one study are two tables; before, their runs shared one cell per method."""
    import pandas as pd

    import pruning.report

    rows = [{"model": "mlpnet", "dataset": "mnist", "schedule": "multistage", "noise": "none",
             "noise_label": "none", "noise_level": 0.0, "variant": f"schedule.stages={t}", "method": m,
             "method_label": m, "sparsity": 0.98, "seed": seed, "status": "completed",
             "final_acc": acc + seed / 1000, "dense_acc": 0.9377, "time_total": 1.0}
            for t, m, acc in ((5, "magnitude", 0.30), (5, "lr", 0.60), (20, "magnitude", 0.30), (20, "lr", 0.83))
            for seed in range(2)]
    monkeypatch.setattr(pruning.report, "load_local", lambda _: pd.DataFrame(rows))
    text = _reproduce().side_by_side(tmp_path)
    tables = {part.split(":", 1)[0]: part for part in text.split("mlpnet / mnist / multistage / ")[1:]}
    assert sorted(tables) == ["schedule.stages=20", "schedule.stages=5"]
    assert "| 0.98 | 30.05 | 60.05 |" in tables["schedule.stages=5"] and "+30.00" in tables["schedule.stages=5"]
    assert "| 0.98 | 30.05 | 83.05 |" in tables["schedule.stages=20"] and "+53.00" in tables["schedule.stages=20"]


def test_side_by_side_puts_no_published_number_beside_a_repaired_variant(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path):
    """finetune=bn re-estimates BatchNorm after pruning, which the published one-shot table does not."""
    import pandas as pd

    import pruning.report

    rows = [{"model": "mlpnet", "dataset": "mnist", "schedule": "oneshot", "noise": "none",
             "noise_label": "none", "noise_level": 0.0, "variant": variant, "method": "cbs",
             "method_label": "cbs", "sparsity": 0.98, "seed": 0, "status": "completed",
             "final_acc": 0.5, "dense_acc": 0.9377, "time_total": 1.0}
            for variant in ("finetune=none", "finetune=bn")]
    monkeypatch.setattr(pruning.report, "load_local", lambda _: pd.DataFrame(rows))
    text = _reproduce().side_by_side(tmp_path)
    tables = {part.split(":", 1)[0]: part for part in text.split("mlpnet / mnist / oneshot / ")[1:]}
    assert "| 0.98 | 50.00 / 55.45 |" in tables["finetune=none"]
    assert "| 0.98 | 50.00 |" in tables["finetune=bn"] and "55.45" not in tables["finetune=bn"]
    assert "no published column" in tables["finetune=bn"]


def test_side_by_side_names_cells_below_their_nominal_sparsity(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """CBS with the CBS code's rounding keeps 712 weights at "0.98": the table says which cells
    reached which sparsity (from the records' sparsity_below_target), and names no other."""
    import pandas as pd

    import pruning.report

    rows = [{"model": "mlpnet", "dataset": "mnist", "schedule": "oneshot", "noise": "none",
             "noise_label": "none", "noise_level": 0.0, "variant": "", "method": m, "method_label": m,
             "sparsity": 0.98, "seed": seed, "status": "completed", "final_acc": acc, "dense_acc": 0.9377,
             "time_total": 1.0, "sparsity_prunable": reached,
             "sparsity_below_target": 0.98 - reached if reached < 0.98 else None}
            for m, acc, reached in (("magnitude", 0.30, 0.98), ("cbs", 0.53, 1 - 712 / 32360))
            for seed in range(2)]
    monkeypatch.setattr(pruning.report, "load_local", lambda _: pd.DataFrame(rows))
    text = _reproduce().side_by_side(tmp_path)
    assert "cbs at 0.98 reached 0.9780 (2 run(s))" in text and "magnitude at" not in text
    # the off-nominal cell and its gain carry the mark the note explains; magnitude's cell does not
    row = next(line for line in text.splitlines() if line.startswith("| 0.98 | 30.00"))
    assert "30.00 / 32.25 |" in row and "53.00 / 55.45 †" in row
    assert "| 0.98 | +23.00 / +23.20 † |" in text and text.count("†") == 3
