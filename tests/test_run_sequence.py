"""The run as a sequencer (issue 16): schedules are modules behind one registry, invalid
schedule/method combinations are config errors before any data is loaded, fine-tuning can train
under the noise hooks, and the record is changed only through RunRecord's methods."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pruning import schedules
from pruning.errors import ConfigError
from pruning.task import run

ROOT = Path(__file__).resolve().parents[1]


def test_every_schedule_group_has_its_module():
    names = sorted(p.stem for p in (ROOT / "conf" / "schedule").glob("*.yaml"))
    assert names == sorted(schedules.available())
    for name in names:
        module = schedules.get(name)
        assert callable(module.run) and callable(module.validate) and "20" in module.__doc__  # a cited year
    with pytest.raises(ConfigError, match="schedule.name='weekly'"):
        schedules.get("weekly")


def _no_data(monkeypatch):
    """Loading data fails the test: the error must come from validation, before it."""
    import pruning.dense

    def load(*args, **kwargs):
        raise AssertionError("data loaded before the config error")

    monkeypatch.setattr(pruning.dense, "build_dataset", load)


@pytest.mark.parametrize(("method", "schedule"), [("grda", "multistage"), ("sdprun", "gradual"),
                                                  ("gfs", "multistage")])
def test_a_train_time_method_with_another_schedule_is_a_config_error(make_cfg, tmp_path, monkeypatch,
                                                                     method, schedule):
    _no_data(monkeypatch)
    with pytest.raises(ConfigError) as err:
        run(make_cfg(f"method={method}", f"schedule={schedule}"), tmp_path / "run")
    assert err.value.key == "schedule" and err.value.value == schedule
    assert f"method={method}" in str(err.value) and "oneshot" in str(err.value)
    rec = json.loads((tmp_path / "run" / "result.json").read_text())
    assert rec["status"] == "failed" and rec["error_type"] == "config" and rec["index"]["schedule"] == schedule


def test_inconsistent_gradual_epochs_are_a_config_error_before_data(make_cfg, tmp_path, monkeypatch):
    _no_data(monkeypatch)
    with pytest.raises(ConfigError, match="is inconsistent"):
        run(make_cfg("schedule=gradual", "schedule.epochs=3", "schedule.end=3"), tmp_path / "run")
    with pytest.raises(ConfigError, match="schedule.stages=0"):
        run(make_cfg("schedule=multistage", "schedule.stages=0"), tmp_path / "run2")


def test_train_time_method_with_oneshot_runs_and_gradual_magnitude_is_allowed(make_cfg, tmp_path):
    from omegaconf import OmegaConf

    from pruning.runconfig import validate

    validate(make_cfg("method=magnitude", "schedule=gradual"))  # Zhu & Gupta's gradual magnitude pruning
    validate(make_cfg("method=grda", "schedule=oneshot"))
    assert OmegaConf.select(make_cfg("method=grda"), "schedule.name") == "oneshot"


def _finetune_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "step"} for r in rows if r.get("phase") == "finetune"]


def test_finetune_noise_hooks_change_only_noisy_runs(make_cfg, tmp_path):
    """`finetune.noise_hooks` trains under the noise model's hooks: a noise-free run is unchanged
    by it, a run under gradient noise fine-tunes on noisy gradients (different weights)."""
    common = ("finetune=short", "finetune.epochs=1", "finetune.batch_size=256", "sparsity=0.5")
    results = {}
    for noise in ("none", "gradient"):
        for hooks in (False, True):
            extra = ("+finetune.noise_hooks=true",) if hooks else ()
            name = f"{noise}-{hooks}"
            results[name] = run(make_cfg(*common, f"noise={noise}", *extra), tmp_path / name)
    clean, clean_hooked = results["none-False"], results["none-True"]
    assert clean["metrics"] == clean_hooked["metrics"]
    assert _finetune_rows(tmp_path / "none-False") == _finetune_rows(tmp_path / "none-True")
    noisy, noisy_hooked = results["gradient-False"], results["gradient-True"]
    assert noisy["metrics"]["pruned_acc"] == noisy_hooked["metrics"]["pruned_acc"]
    assert _finetune_rows(tmp_path / "gradient-False") != _finetune_rows(tmp_path / "gradient-True")


def test_finetune_noise_hooks_must_be_a_flag(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="finetune.noise_hooks"):
        run(make_cfg("finetune=short", "+finetune.noise_hooks=3"), tmp_path / "run")


def test_the_record_is_changed_only_through_its_methods():
    """No module but pruning/record.py assigns into or mutates `record.data`."""
    edit = re.compile(r"record\.data(\[[^\]]*\])*\s*(=(?!=)|\.(update|append|setdefault|pop|clear)\()")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "pruning").rglob("*.py") if p.name != "record.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if edit.search(line)]
    assert offenders == []
