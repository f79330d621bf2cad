"""W&B mirror of a run (issue 8): real offline run files through `pruning.task.run`, a
deterministic id that a re-entered run directory resumes, and W&B failures that only warn.

The `.wandb` transaction log is protobuf without compression, so the keys and values we log
appear in it verbatim; the tests check those bytes instead of mocking wandb.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from pruning.errors import ConfigError
from pruning.task import run
from pruning.tracking import Tracker, WandbTracker, build_tracker, run_label, wandb_config

# a 2-epoch dense model (cached for the session): these tests check plumbing, not accuracy
FAST = "model.train.epochs=2"


def _wandb_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def _records(path: Path, last: str = "exit", timeout: float = 30.0) -> list:
    """The records of an offline `.wandb` file, decoded with wandb's own protobuf (`wandb.proto`).

    The file is a LevelDB-style log (as wandb's former `sdk.internal.datastore` wrote and read it):
    a 7-byte header `:W&B` + magic + version, then 32 KiB blocks of chunks, each with a 7-byte
    header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last). Waits until a `last` record
    is there (wandb's core service writes the file shortly after finish())."""
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + timeout
    while True:
        data = path.read_bytes()
        assert data[:4] == b":W&B", path
        pos, block, buf, out = 7, 32768, b"", []
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # a block tail too short for a header is padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0 or pos + 7 + length > len(data):
                break
            chunk = data[pos + 7:pos + 7 + length]
            pos += 7 + length
            buf = chunk if kind in (1, 2) else buf + chunk
            if kind in (1, 4):
                rec = pb.Record()
                rec.ParseFromString(buf)
                out.append(rec)
                buf = b""
        if any(r.WhichOneof("record_type") == last for r in out) or time.monotonic() > deadline:
            return out
        time.sleep(0.3)


def _summary(records: list) -> dict:
    """The final summary: the summary records' updates applied in order."""
    summary: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            for item in r.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary


def _flushed(path: Path, marker: bytes = b"time/total", timeout: float = 30.0) -> bytes:
    """The transaction log once written: wandb's core service writes it shortly after finish()."""
    deadline = time.monotonic() + timeout
    previous = b""
    while True:
        blob = path.read_bytes()
        if marker in blob and blob == previous:
            return blob
        if time.monotonic() > deadline:
            return blob
        previous = blob
        time.sleep(0.3)


def test_offline_run_writes_real_wandb_files(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg(FAST, "logger=wandb", "finetune=short", "finetune.epochs=1", "sweep_name=wbtest")
    assert cfg.logger.mode == "offline"  # the default follows WANDB_MODE
    run_dir = tmp_path / "run"
    rec = run(cfg, run_dir)
    assert rec["status"] == "completed"
    files = _wandb_files(run_dir)
    assert len(files) == 1, files
    run_id = rec["run_id"]
    assert files[0].name == f"run-{run_id}.wandb"
    blob = _flushed(files[0])
    expected = [
        run_id, "wbtest", "magnitude-s0.9-seed0",          # id, group, name
        rec["cell_id"],                                     # the report keeps one run per cell
        "noise_level", "cfg", '"hidden":[128,64]',          # flat index keys + resolved config
        "dense/acc", "prune/acc", "prune/sparsity", "prune/loss", "finetune/acc", "final/acc",  # history
        "final_acc", "finetuned_acc", "time/total", '"completed"',  # summary
    ]
    for text in expected:
        assert text.encode() in blob, text


def test_fresh_start_gets_a_new_wandb_run_and_a_resumed_attempt_continues_it(make_cfg, tmp_path, monkeypatch):
    """Attempt 1 is interrupted after dense_eval; attempt 2 resumes from its state and continues its
    W&B run (same id); attempt 3 starts over (resume=false): its steps restart at 1, so it gets a
    new W&B run `<run_id>-a3` instead of having its rows dropped as steps going backwards."""
    from pruning.task import Job

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        def preempted(self):
            raise SystemExit(-1)  # what submitit's requeue handler raises

        m.setattr(Job, "prune", preempted)
        with pytest.raises(SystemExit):
            run(make_cfg(FAST, "logger=wandb", "sparsity=0.5"), run_dir)
    first = json.loads((run_dir / "result.json").read_text())
    run_id = first["run_id"]
    assert first["wandb_id"] == run_id and first["status"] == "failed"
    second = run(make_cfg(FAST, "logger=wandb", "sparsity=0.5"), run_dir)
    assert second["attempt"] == 2 and second["resumed_from"] == "dense_eval" and second["wandb_id"] == run_id
    third = run(make_cfg(FAST, "logger=wandb", "sparsity=0.5", "resume=false"), run_dir)
    assert third["attempt"] == 3 and third["wandb_id"] == f"{run_id}-a3"
    names = [f.name for f in _wandb_files(run_dir)]
    assert sorted(names) == sorted([f"run-{run_id}.wandb"] * 2 + [f"run-{run_id}-a3.wandb"])
    fresh = [f for f in _wandb_files(run_dir) if f.name.endswith("-a3.wandb")][0]
    steps = [r.history.step.num for r in _records(fresh, "exit") if r.WhichOneof("record_type") == "history"]
    assert steps and steps[0] == 1 and steps == sorted(steps)


def test_wandb_init_failure_only_warns(make_cfg, tmp_path, monkeypatch, capsys):
    """An invalid project name makes the real wandb.init raise; the run still completes."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg(FAST, "logger=wandb", "logger.project=bad/project")
    rec = run(cfg, tmp_path / "run")
    assert rec["status"] == "completed"
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "completed"
    err = capsys.readouterr().err
    assert "warning: W&B init failed" in err and "project" in err
    assert not _wandb_files(tmp_path / "run")


def test_wandb_init_exception_only_warns(make_cfg, tmp_path, monkeypatch, capsys):
    import wandb

    def boom(*args, **kwargs):
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(wandb, "init", boom)
    rec = run(make_cfg(FAST, "logger=wandb", "logger.mode=online"), tmp_path / "run")
    assert rec["status"] == "completed"
    assert "network unreachable" in capsys.readouterr().err


def test_failed_run_still_finishes_wandb_run(make_cfg, tmp_path, monkeypatch):
    """A run that fails after the W&B run started finishes it (exit code 1, status failed)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg(FAST, "logger=wandb", f"model.checkpoint={tmp_path / 'nope.pt'}")
    with pytest.raises(ConfigError):
        run(cfg, tmp_path / "run")
    rec = json.loads((tmp_path / "run" / "result.json").read_text())
    assert rec["status"] == "failed"
    files = _wandb_files(tmp_path / "run")
    assert len(files) == 1
    blob = _flushed(files[0], marker=b'"failed"')
    assert b'"failed"' in blob and b"does not exist" in blob  # summary status and error


def test_build_tracker_modes():
    assert type(build_tracker({"name": "local"})) is Tracker
    assert type(build_tracker({"name": "wandb", "mode": "disabled"})) is Tracker  # no wandb import needed
    assert isinstance(build_tracker({"name": "wandb", "mode": "offline"}), WandbTracker)
    with pytest.raises(ConfigError, match="logger.mode='offlne'.*online, offline, disabled"):
        build_tracker({"name": "wandb", "mode": "offlne"})
    with pytest.raises(ConfigError, match="allowed: local, wandb"):
        build_tracker({"name": "tensorboard"})


def test_run_label_and_config():
    index = {"model": "mlp", "dataset": "digits", "method": "swap", "schedule": "oneshot",
             "noise": "gradient", "noise_level": 1.0, "sparsity": 0.95, "seed": 3, "sweep": "s1"}
    assert run_label(index) == "swap-s0.95-gradient1-seed3"
    assert run_label({**index, "noise": "none", "schedule": "gradual"}) == "swap-s0.95-gradual-seed3"
    flat = wandb_config({"index": index, "run_id": "abc", "overrides": ["method=swap"]},
                        {"model": {"name": "mlp"}, "sparsity": 0.95})
    assert flat["model"] == "mlp" and flat["method"] == "swap" and flat["noise_level"] == 1.0
    assert flat["cfg"] == {"model": {"name": "mlp"}, "sparsity": 0.95}
    assert flat["run_id"] == "abc" and flat["overrides"] == ["method=swap"]


def _by_type(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def test_offline_run_defines_phase_axes_and_logs_the_model_artifact(make_cfg, tmp_path, monkeypatch):
    """Read back from the offline `.wandb` file: each phase has its own x-axis (`prune/*` against
    `prune/stage`, `finetune/*` against `finetune/epoch`), the loop accuracy summarises as max while
    `final_acc` stays the final value, and model.pt is a "model" artifact named after the run_id."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    rec = run(make_cfg(FAST, "logger=wandb", "finetune=short", "finetune.epochs=2", "sparsity=0.8"), run_dir)
    records = _records(_wandb_files(run_dir)[0])
    metrics = {m.glob_name or m.name: m for m in _by_type(records, "metric")}
    assert metrics["prune/*"].step_metric == "prune/stage"
    assert metrics["finetune/*"].step_metric == "finetune/epoch"
    assert metrics["finetune/acc"].summary.max and metrics["finetune/loss"].summary.min
    assert not any(k.startswith(("dense/", "final/")) for k in metrics)  # single rows: the global step

    summary = _summary(records)
    assert summary["final_acc"] == rec["metrics"]["final_acc"]  # the record's final value, not a max
    assert summary["finetune/acc"]["max"] == max(r["acc"] for r in _metrics_rows(run_dir, "finetune"))
    assert set(summary["metric_names"]) == set(rec["metrics"])

    (art,) = _by_type(records, "artifact")
    assert art.type == "model" and art.name == f"model-{rec['run_id']}"
    assert {"latest", "attempt1"} <= set(art.aliases)
    assert [c.path for c in art.manifest.contents] == ["model.pt"]
    meta = json.loads(art.metadata)
    assert meta["sha256"] == rec["model_file"]["sha256"] and meta["run_id"] == rec["run_id"]
    assert meta["final_acc"] == rec["metrics"]["final_acc"] and meta["sparsity"] == 0.8 and meta["model"] == "mlp"


def test_log_model_false_logs_no_artifact(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    run(make_cfg(FAST, "logger=wandb", "logger.log_model=false"), run_dir)
    assert (run_dir / "model.pt").is_file()
    assert not _by_type(_records(_wandb_files(run_dir)[0]), "artifact")


def _metrics_rows(run_dir: Path, phase: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("phase") == phase]


def test_report_from_wandb_keeps_metrics_with_a_slash(make_cfg, tmp_path, monkeypatch):
    """The PCM study's `analog/acc_mean@t=...` metrics survive the W&B round trip: the run's config
    and summary as written to the offline file, shaped like a `wandb.Api` run, give the record's
    metrics back (and no history keys such as `prune/acc`)."""
    from types import SimpleNamespace

    from pruning.report import record_from_wandb, rows_from_wandb, to_frame

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    rec = run(make_cfg(FAST, "logger=wandb", "noise=analog", "noise.n_draws=2", "noise.t_inference=[0.0,3600.0]",
                       "sparsity=0.5"), run_dir)
    assert "analog/acc_mean@t=3600" in rec["metrics"]
    records = _records(_wandb_files(run_dir)[0])
    (run_rec,) = _by_type(records, "run")
    config = {item.key: json.loads(item.value_json) for item in run_rec.config.update}
    api_run = SimpleNamespace(id=run_rec.run_id, group=run_rec.run_group, state="finished",
                              job_type=run_rec.job_type, config=config,
                              summary=SimpleNamespace(_json_dict=_summary(records)))
    back = record_from_wandb(api_run)
    expected = {k: v for k, v in rec["metrics"].items() if v is None or isinstance(v, (int, float))}
    assert back["metrics"] == pytest.approx(expected) and back["status"] == "completed"
    assert back["index"] == rec["index"]
    frame = to_frame(rows_from_wandb([api_run]))
    assert frame.loc[0, "analog/acc_mean@t=3600"] == rec["metrics"]["analog/acc_mean@t=3600"]
    assert "prune/acc" not in frame.columns

    # a run logged before `metric_names` existed: history and time keys are told apart by their phase
    old = {k: v for k, v in api_run.summary._json_dict.items() if k != "metric_names"}
    back = record_from_wandb(SimpleNamespace(**{**vars(api_run), "summary": SimpleNamespace(_json_dict=old)}))
    assert back["metrics"] == pytest.approx({k: v for k, v in expected.items() if v is not None})


def test_to_wandb_defaults_to_offline_and_says_so(tmp_path, monkeypatch, capsys, make_cfg):
    """`pruning-report --to-wandb` without WANDB_MODE writes offline, as logger=wandb does."""
    from pruning.report import main

    monkeypatch.delenv("WANDB_MODE", raising=False)
    sweep = tmp_path / "sweep"
    run(make_cfg(FAST, "sparsity=0.5"), sweep / "a" / "seed=0")
    assert main([str(sweep), "--to-wandb", "--no-plots"]) == 0
    out = capsys.readouterr().out
    (offline,) = (sweep / "report" / "wandb").glob("offline-run-*-report-*")
    assert f"written offline to {offline}" in out and "nothing uploaded" in out and "uploaded to" not in out


def test_gradual_prune_rows_keep_the_stage_axis(make_cfg, tmp_path, monkeypatch):
    """Gradual pruning logs prune rows (with their epoch) inside its training loop: `prune/*` is
    still against `prune/stage`, the loop's rows against `gradual/epoch`."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    run(make_cfg(FAST, "logger=wandb", "schedule=gradual", "schedule.epochs=3", "schedule.end=1",
                 "dataset.batch_size=256", "save_model=false"), run_dir)
    records = _records(_wandb_files(run_dir)[0])
    metrics = {m.glob_name or m.name: m for m in _by_type(records, "metric")}
    assert metrics["prune/*"].step_metric == "prune/stage"
    assert metrics["gradual/*"].step_metric == "gradual/epoch" and metrics["gradual/acc"].summary.max
    assert not _by_type(records, "artifact")  # no model file, no artifact
