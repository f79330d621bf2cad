"""Integrity of everything a run reuses (issue 14 items 1, 2, 6 and "disk full").

A record that says `completed` must come from sound inputs: no code runs from a planted pickle at
any load site (stage state, gradient cache, dense cache, model.checkpoint); a garbled, truncated
or short cache entry or state file fails its digest and is recomputed (or the run starts over)
with a warning naming the file; a full disk leaves `failed` in result.json; records and caches
get the umask's mode; and `pruning-report` lists unreadable records as failed cells.

Each case is checked against an independent reference: the same run on untouched files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import compose_config
from omegaconf import DictConfig, open_dict

from pruning import record as record_mod
from pruning.checkpoint import StageCheckpoint
from pruning.report import main as report_main
from pruning.state import RunState
from pruning.task import run

# a one-shot WoodFisher job: it reads the dense cache and computes G through the gradient cache
WF = ("method=woodfisher", "deterministic=true")
FT = ("finetune=short", "finetune.epochs=2", "finetune.batch_size=256", "deterministic=true")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(root: Path, cache: Path, *overrides: str) -> DictConfig:
    cfg = compose_config([f"paths.out_root={root / 'outputs'}", f"paths.data_dir={root / 'data'}",
                          f"paths.cache_dir={cache}", "progress=false", "calibration.num_samples=64", *overrides])
    with open_dict(cfg):
        cfg.device = "cpu"
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory holding the dense digits MLP, trained once for this module."""
    root = tmp_path_factory.mktemp("integrity")
    run(_cfg(root, root / "cache"), root / "train")
    return root / "cache"


@pytest.fixture(scope="module")
def reference(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Records of the untouched runs (their own copy of the cache), by name."""
    root = tmp_path_factory.mktemp("reference")
    out = {}
    for name, overrides in (("wf", WF), ("wf-stream", (*WF, "calibration.stream=true")), ("ft", FT)):
        cache = root / f"cache-{name}"
        shutil.copytree(trained, cache)
        out[name] = run(_cfg(root, cache, *overrides), root / name)
    return out


@pytest.fixture
def cache(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained cache: tests garble its files."""
    shutil.copytree(trained, tmp_path / "cache")
    return tmp_path / "cache"


def _result(rec: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics and stages without wall-clock fields (nor whether the factor cache was hit)."""
    skip = ("seconds", "factor_cache", "factor_seconds")
    return rec["metrics"], [{k: v for k, v in s.items() if k not in skip} for s in rec["stages"]]


def _dense_file(cache: Path) -> Path:
    (path,) = [p for p in (cache / "dense").iterdir() if p.suffix == ".pt"]
    return path


def _grad_entry(cache: Path) -> Path:
    (entry,) = [p for p in (cache / "grads").iterdir() if not p.name.startswith(".")]
    return entry


def _forge_digest(path: Path) -> None:
    """What an attacker who can write the file can also write: a sidecar that matches it."""
    data = path.read_bytes()
    Path(str(path) + ".sha256").write_text(json.dumps({"sha256": hashlib.sha256(data).hexdigest(),
                                                        "bytes": len(data)}))


def _garble_zip_tensor(path: Path) -> None:
    """Overwrite bytes inside the largest tensor record of a torch zip file (the archive stays valid)."""
    with zipfile.ZipFile(path) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        n, m = np.frombuffer(f.read(4), dtype="<u2")
        start = info.header_offset + 30 + int(n) + int(m)
        f.seek(start + info.file_size // 4)
        f.write(np.full(info.file_size // 8, 7.5, dtype=np.float32).tobytes()[: info.file_size // 2])


class Plant:
    """A pickle whose loading creates `marker` (a stand-in for any command)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


# ------------------------------------------------------------------ 1. no code runs from a file

def _plant_state(run_dir: Path, marker: Path, forge: bool) -> Path:
    path = run_dir / "ckpt" / "state.pt"
    path.parent.mkdir(parents=True)
    torch.save({"version": 1, "fingerprint": "x", "boundaries": ["dense_eval"], "payload": Plant(marker)}, path)
    if forge:
        _forge_digest(path)
    return path


def _plant_grads(entry: Path, marker: Path, name: str) -> Path:
    """Replace one file of a gradient cache entry with a pickled object array, digest forged."""
    path = entry / name
    np.save(path, np.array([Plant(marker)], dtype=object), allow_pickle=True)
    meta = json.loads((entry / "meta.json").read_text())
    if "digests" in meta:
        meta["digests"][name] = hashlib.sha256(path.read_bytes()).hexdigest()
        (entry / "meta.json").write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize("site", ["state", "state-forged-digest", "grads-indices", "grads-tensor", "dense",
                                  "dense-forged-digest", "model.checkpoint"])
def test_no_code_runs_from_a_planted_pickle(site: str, cache: Path, tmp_path: Path,
                                            reference: dict[str, dict[str, Any]],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "marker"
    run_dir = tmp_path / "run"
    overrides: tuple[str, ...] = WF
    if site.startswith("state"):
        planted = _plant_state(run_dir, marker, forge=site.endswith("forged-digest"))
    elif site.startswith("grads"):
        run(_cfg(tmp_path, cache, *WF), tmp_path / "prime")  # fills the gradient cache
        planted = _plant_grads(_grad_entry(cache), marker, "indices.npy" if site == "grads-indices"
                               else "tensor0001.npy")
    elif site.startswith("dense"):
        planted = _dense_file(cache)
        torch.save({"net.fc1.weight": Plant(marker)}, planted)
        if site.endswith("forged-digest"):
            _forge_digest(planted)
    else:
        planted = tmp_path / "published.pt"
        torch.save({"state_dict": {"net.fc1.weight": Plant(marker)}}, planted)
        overrides = (*WF, f"model.checkpoint={planted}")
    capsys.readouterr()
    try:
        rec = run(_cfg(tmp_path, cache, *overrides), run_dir)
    except Exception:
        rec = json.loads((run_dir / "result.json").read_text())
    assert not marker.exists(), f"loading {planted} ran code"
    if site == "model.checkpoint":  # a published checkpoint is the user's input: the run fails, never uses it
        assert rec["status"] == "failed"
        return
    # the run did not use the file: it completed from sound inputs, equal to the untouched run,
    # and the record and the console name the file that was not trusted
    assert rec["status"] == "completed"
    assert _result(rec) == _result(reference["wf"])
    assert any(str(planted) in w for w in rec["warnings"]), rec["warnings"]
    assert str(planted) in capsys.readouterr().out
    assert "resumed_from" not in rec


# ------------------------------------------------------------------ 2. digests on everything reused

def _garble_npy(path: Path) -> None:
    """Overwrite the second half of an .npy file's data with large values (header intact)."""
    arr = np.load(path)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - arr.nbytes // 2)
        f.write(np.full(arr.size // 2 + 1, 1e3, dtype=np.float32).tobytes()[: arr.nbytes // 2])


def _keep_rows(entry: Path, n: int, forge_meta: bool) -> None:
    """Rewrite every file of a G entry with its first n rows (consistent headers)."""
    for path in sorted(entry.glob("*.npy")):
        np.save(path, np.load(path)[:n])
    if forge_meta:  # an entry that is self-consistent, only not for the requested indices
        meta = json.loads((entry / "meta.json").read_text())
        meta["num_rows"] = n
        if "digests" in meta:
            for path in entry.glob("*.npy"):
                arr = np.load(path)
                body = arr.tobytes() if path.name != "indices.npy" else None
                meta["digests"][path.name] = (hashlib.sha256(body).hexdigest() if body is not None
                                              else hashlib.sha256(path.read_bytes()).hexdigest())
        (entry / "meta.json").write_text(json.dumps(meta))


G_CASES = {
    "garbled": lambda entry: _garble_npy(entry / "tensor0001.npy"),
    "garbled-indices": lambda entry: _garble_npy(entry / "indices.npy"),
    "8-of-64-rows": lambda entry: _keep_rows(entry, 8, forge_meta=False),
    "8-of-64-rows-consistent-meta": lambda entry: _keep_rows(entry, 8, forge_meta=True),
    "truncated": lambda entry: os.truncate(entry / "tensor0000.npy", 300),
    "meta-missing": lambda entry: (entry / "meta.json").unlink(),
}


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "stream"])
@pytest.mark.parametrize("case", list(G_CASES))
def test_bad_gradient_cache_entry_is_recomputed(case: str, stream: bool, cache: Path, tmp_path: Path,
                                                reference: dict[str, dict[str, Any]],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    overrides = (*WF, f"calibration.stream={str(stream).lower()}")
    ref = reference["wf-stream" if stream else "wf"]
    run(_cfg(tmp_path, cache, *overrides), tmp_path / "prime")
    entry = _grad_entry(cache)
    G_CASES[case](entry)
    capsys.readouterr()
    rec = run(_cfg(tmp_path, cache, *overrides), tmp_path / "run")
    assert rec["status"] == "completed" and _result(rec) == _result(ref)
    assert len(rec["warnings"]) == 1 and str(entry) in rec["warnings"][0], rec["warnings"]
    assert "gradient cache entry not used" in capsys.readouterr().out
    # the bad entry was replaced by a sound one: the next run reads it without a warning
    again = run(_cfg(tmp_path, cache, *overrides), tmp_path / "again")
    assert again["warnings"] == [] and _result(again) == _result(ref)


def test_gradient_digests_are_kept_while_rows_are_written(tmp_path: Path) -> None:
    """The streaming hash equals a hash of the file's data bytes read back (the independent check),
    and rows written out of order fall back to reading the file."""
    from pruning.gradients import BlockStore

    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((10, 7)).astype(np.float32), rng.standard_normal((10, 3)).astype(np.float32)]
    in_order = BlockStore.create(tmp_path / "a", (7, 3), 10)
    for s in range(0, 10, 4):
        for t in range(2):
            in_order.write_rows(t, s, rows[t][s:s + 4])
    shuffled = BlockStore.create(tmp_path / "b", (7, 3), 10)
    for s in (8, 0, 4):
        for t in range(2):
            shuffled.write_rows(t, s, rows[t][s:s + 4])
    want = {f"tensor{t:04d}.npy": hashlib.sha256(rows[t].tobytes()).hexdigest() for t in range(2)}
    assert in_order._hashers[0] is not None and shuffled._hashers[0] is None
    assert in_order.digests() == want == shuffled.digests()
    assert in_order.verify(want) is None
    assert "tensor0001.npy" in in_order.verify({**want, "tensor0001.npy": "0" * 64})
    in_order.close()
    shuffled.close()


def _interrupted_state(cfg: DictConfig, run_dir: Path, boundary: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run until the state after `boundary` is saved, then stop like a preempted Slurm job."""
    save = StageCheckpoint.save

    def save_then_exit(self: StageCheckpoint, state: RunState, key: str, *args: Any) -> None:
        save(self, state, key, *args)
        if key == boundary:
            raise SystemExit(-1)

    with monkeypatch.context() as m:
        m.setattr(StageCheckpoint, "save", save_then_exit)
        with pytest.raises(SystemExit):
            run(cfg, run_dir)
    return run_dir / "ckpt" / "state.pt"


STATE_CASES = {
    "tensor-bytes-garbled": _garble_zip_tensor,
    "truncated": lambda p: os.truncate(p, os.path.getsize(p) // 2),
    "digest-missing": lambda p: Path(str(p) + ".sha256").unlink(missing_ok=True),
}


@pytest.mark.parametrize("case", list(STATE_CASES))
def test_bad_stage_state_restarts_the_run(case: str, cache: Path, tmp_path: Path,
                                          reference: dict[str, dict[str, Any]],
                                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _cfg(tmp_path, cache, *FT)
    state = _interrupted_state(cfg, tmp_path / "run", "finetune/1", monkeypatch)
    STATE_CASES[case](state)
    capsys.readouterr()
    rec = run(cfg, tmp_path / "run")
    out = capsys.readouterr().out
    assert rec["status"] == "completed" and "resumed_from" not in rec and "continues after" not in out
    assert _result(rec) == _result(reference["ft"])
    assert len(rec["warnings"]) == 1 and str(state) in rec["warnings"][0] and str(state) in out


def test_sound_stage_state_resumes_and_holds_plain_data(cache: Path, tmp_path: Path,
                                                        reference: dict[str, dict[str, Any]],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tmp_path, cache, *FT)
    state = _interrupted_state(cfg, tmp_path / "run", "finetune/1", monkeypatch)
    assert record_mod.verify_digest(state) is None
    torch.load(state, map_location="cpu", weights_only=True)  # tensors and plain containers only
    rec = run(cfg, tmp_path / "run")
    assert rec["resumed_from"] == "finetune/1" and rec["warnings"] == []
    assert _result(rec) == _result(reference["ft"])


def test_stop_between_digest_and_state_resumes_from_the_previous_save(
        cache: Path, tmp_path: Path, reference: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A preempted job can exit after the state's new digest is written and before the new state
    replaces the old one (seen on the real Slurm cluster: "it holds 180973 bytes, its digest says
    181037", and the requeued job started over). The previous state must still verify, so the
    run resumes from the save before instead of from scratch."""
    cfg = _cfg(tmp_path, cache, *FT)
    replace, save = os.replace, StageCheckpoint.save
    saving: list[str] = []
    digests: list[dict[str, Any]] = []

    def save_key(self: StageCheckpoint, state: RunState, key: str, *args: Any) -> None:
        saving.append(key)
        save(self, state, key, *args)

    def exit_before_state_rename(src: Any, dst: Any) -> None:
        if Path(dst).name == "state.pt" and saving[-1] == "finetune/2":
            digests.append(json.loads(Path(str(dst) + ".sha256").read_text()))
            raise SystemExit(-1)
        replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(StageCheckpoint, "save", save_key)
        m.setattr(record_mod.os, "replace", exit_before_state_rename)
        with pytest.raises(SystemExit):
            run(cfg, tmp_path / "run")
    state = tmp_path / "run" / "ckpt" / "state.pt"
    assert digests[-1]["sha256"] != record_mod.sha256_file(state)  # the new digest, the old state
    assert record_mod.verify_digest(state) is None
    rec = run(cfg, tmp_path / "run")
    assert rec["resumed_from"] == "finetune/1" and rec["warnings"] == []
    assert _result(rec) == _result(reference["ft"])


def test_shrunk_model_resumes_from_its_state_dict(cache: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A structured method's physically smaller model is saved as its state dict (no pickled
    module) and rebuilt from the shapes on resume."""
    cfg = _cfg(tmp_path, cache, "method=gfs", "method.budget=width", "method.width=0.5",
               "method.num_evaluate=8", "method.finetune_batch_size=256", *FT)
    ref = run(cfg, tmp_path / "reference")
    state = _interrupted_state(cfg, tmp_path / "run", "prune", monkeypatch)
    saved = torch.load(state, map_location="cpu", weights_only=True)
    assert saved["arch"] is not None, "gfs with shrink: the architecture changed"
    rec = run(cfg, tmp_path / "run")
    assert rec["resumed_from"] == "prune" and rec["warnings"] == []
    assert _result(rec) == _result(ref)


DENSE_CASES = {
    "garbled": _garble_zip_tensor,
    "truncated": lambda p: os.truncate(p, os.path.getsize(p) // 2),
    "digest-missing": lambda p: Path(str(p) + ".sha256").unlink(missing_ok=True),
}


@pytest.mark.parametrize("case", list(DENSE_CASES))
def test_bad_dense_cache_is_retrained(case: str, cache: Path, tmp_path: Path,
                                      reference: dict[str, dict[str, Any]],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    dense = _dense_file(cache)
    DENSE_CASES[case](dense)
    capsys.readouterr()
    rec = run(_cfg(tmp_path, cache, *WF), tmp_path / "run")
    assert rec["status"] == "completed" and _result(rec) == _result(reference["wf"])
    assert len(rec["warnings"]) == 1 and str(dense) in rec["warnings"][0]
    assert f"dense cache {dense} not used" in capsys.readouterr().out
    assert record_mod.verify_digest(dense) is None  # replaced by the retrained model, with its digest
    again = run(_cfg(tmp_path, cache, *WF), tmp_path / "again")
    assert again["warnings"] == []


# ------------------------------------------------------------------ 3. disk full

class _FullDisk:
    """`tempfile` as pruning.record sees it, with mkstemp failing like a full disk once `full`."""

    def __init__(self) -> None:
        self.full = False

    def mkstemp(self, *args: Any, **kwargs: Any) -> tuple[int, str]:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return tempfile.mkstemp(*args, **kwargs)


@pytest.mark.parametrize("where", ["stage-state", "every-atomic-write"])
def test_disk_full_leaves_failed(where: str, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC in the middle of a run: the record says failed (with the reason and the file), not running."""
    disk = _FullDisk()
    save = StageCheckpoint.save

    def fill_then_save(self: StageCheckpoint, state: RunState, key: str, *args: Any) -> None:
        if key == "prune":  # the disk fills up after pruning
            disk.full = True
        save(self, state, key, *args)

    if where == "stage-state":
        import pruning.checkpoint as ckpt_mod

        write = ckpt_mod.atomic_write

        def write_or_fail(path: Any, *args: Any, **kwargs: Any) -> None:
            if disk.full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            write(path, *args, **kwargs)

        monkeypatch.setattr(ckpt_mod, "atomic_write", write_or_fail)
    else:
        monkeypatch.setattr(record_mod, "tempfile", disk)
    monkeypatch.setattr(StageCheckpoint, "save", fill_then_save)
    run_dir = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        run(_cfg(tmp_path, cache, *WF), run_dir)
    rec = json.loads((run_dir / "result.json").read_text())
    assert rec["status"] == "failed"
    assert "No space left on device" in rec["error"] and "state.pt" in rec["error"]


def test_record_written_in_place_when_no_temp_file_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = record_mod.RunRecord(tmp_path, run_id="r", sweep="s", overrides=[], index={})
    rec.start()
    disk = _FullDisk()
    disk.full = True
    monkeypatch.setattr(record_mod, "tempfile", disk)
    rec.fail("OSError: [Errno 28] No space left on device")
    data = json.loads((tmp_path / "result.json").read_text())
    assert data["status"] == "failed" and data["error"].startswith("OSError")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".result.json.")]  # no temp left over


# ------------------------------------------------------------------ 4. shared filesystems

@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_records_and_caches_get_the_umask_mode(umask: int, cache: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    old = os.umask(umask)
    try:
        shutil.rmtree(cache / "dense")  # written again under this umask
        run(_cfg(tmp_path, cache, *WF), tmp_path / "wf")
        state = _interrupted_state(_cfg(tmp_path, cache, *FT), tmp_path / "ft", "finetune/1", monkeypatch)
    finally:
        os.umask(old)
    files = [tmp_path / "wf" / "result.json", tmp_path / "wf" / "config.resolved.json",
             tmp_path / "wf" / "metrics.jsonl", state, Path(str(state) + ".sha256"),
             tmp_path / "ft" / "result.json", _dense_file(cache), Path(str(_dense_file(cache)) + ".sha256"),
             *_grad_entry(cache).iterdir()]
    modes = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def _bad_record(path: Path, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path.parent.mkdir(parents=True)
    if how == "garbled-bytes":
        path.write_bytes(b'{"status": "comp\xff\xfe\x00leted"')
    elif how == "truncated-json":
        path.write_text('{"status": "completed", "metrics": {"final_acc": 0.')
    elif how == "not-an-object":
        path.write_text("[1, 2]")
    else:  # unreadable permissions (simulated: tests may run as root, which reads mode 000 files)
        path.write_text("{}")
        real_open = open

        def deny(file: Any, *args: Any, **kwargs: Any) -> Any:
            if Path(str(file)) == path:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(record_mod, "open", deny, raising=False)


@pytest.mark.parametrize("how", ["garbled-bytes", "truncated-json", "not-an-object", "permission-denied"])
def test_report_lists_an_unreadable_record_as_failed(how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "sweep"
    good = {"schema": 1, "status": "completed", "run_id": "a", "sweep": "s", "overrides": ["sparsity=0.5"],
            "index": {"model": "mlp", "dataset": "digits", "method": "magnitude", "schedule": "oneshot",
                      "noise": "none", "noise_level": 0.0, "sparsity": 0.5, "seed": 0, "sweep": "s"},
            "metrics": {"final_acc": 0.9}, "stages": [], "timings": {}, "error": None, "attempt": 1}
    record_mod.atomic_write_json(sweep / "sparsity=0.5" / "seed=0" / "result.json", good)
    bad = sweep / "sparsity=0.9" / "seed=0" / "result.json"
    _bad_record(bad, how, monkeypatch)
    assert report_main([str(sweep), "--no-plots"]) == 0
    captured = capsys.readouterr()
    table = (sweep / "report" / "table.md").read_text()
    assert f"unreadable record {bad}" in table and str(bad) in captured.err
    csv = (sweep / "report" / "results.csv").read_text()
    assert csv.count("completed") == 1 and "failed" in csv
    assert "1 completed, 1 failed" in captured.out


def test_digest_helpers_match_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    payload = os.urandom(3 * (1 << 20) + 5)
    record_mod.atomic_write(path, lambda f: f.write(payload), binary=True, digest=True)
    assert record_mod.sha256_file(path) == hashlib.sha256(payload).hexdigest()
    assert record_mod.sha256_file(path, 7, 100) == hashlib.sha256(payload[7:107]).hexdigest()
    assert record_mod.verify_digest(path) is None
    with open(path, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"\x00" if payload[1 << 20] else b"\x01")
    assert "sha256" in record_mod.verify_digest(path)
    os.truncate(path, 10)
    assert "10 bytes" in record_mod.verify_digest(path)

