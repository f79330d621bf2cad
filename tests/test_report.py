"""Sweep reports (issue 8): golden Markdown from synthetic run records, the paired t-interval by
hand, failed/missing cells from multirun.yaml, plots, the W&B loader on objects shaped like
`wandb.Api` runs, `--to-wandb` in offline mode, and the multirun-end callback end to end.

Regenerate the golden file after an intended format change with
`UPDATE_GOLDEN=1 python -m pytest tests/test_report.py -k golden`.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

from pruning.callbacks import ReportCallback
from pruning.config import result_overrides, run_dirname
from pruning.record import atomic_write_json, read_json, run_id_for
from pruning.report import (
    load_local,
    main,
    metric_label,
    one_row_per_cell,
    paired_ci,
    paired_differences,
    paired_figures,
    render_markdown,
    report_sweep,
    rows_from_wandb,
    sparsity_figures,
    summarize,
    to_frame,
)
from pruning.sweep import expected_grid, sweep_status
from pruning.tracking import wandb_config, wandb_summary

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "report_synth.md"

# final_acc = BASE[method, sparsity] - 0.05 (kappa - 1) + OFFSET[method][seed]
BASE = {("magnitude", 0.5): 0.90, ("magnitude", 0.9): 0.70, ("swap", 0.5): 0.92, ("swap", 0.9): 0.80}
OFFSET = {"magnitude": (0.0, 0.01, 0.02), "swap": (0.01, 0.03, 0.02)}
FAILED = ("swap", 0.9, 2, 2)       # (method, sparsity, kappa, seed): result.json says failed
MISSING = ("magnitude", 0.9, 2, 2)  # never ran: no directory


def synthetic_multirun(sweep_dir: Path) -> None:
    """A multirun.yaml as Hydra writes it for `launch.py -cd sweeps -cn synth noise=gradient 'seed=range(3)'`."""
    cfg = {
        "hydra": {
            "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                        "max_batch_size": None,
                        "params": {"method": "magnitude,swap", "sparsity": "0.5,0.9", "noise.kappa": "1,2"}},
            "overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": ["noise=gradient", "seed=range(3)"]},
            "job": {"config_name": "synth"},
            "runtime": {"cwd": "/project",
                        "config_sources": [{"path": "/project/sweeps", "schema": "file", "provider": "main"}]},
        },
        "sweep_name": "synth",
        "seed": 0,
    }
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(cfg), sweep_dir / "multirun.yaml")


def synthetic_record(method: str, sparsity: float, kappa: int, seed: int) -> tuple[list[str], dict]:
    job = [f"method={method}", f"sparsity={sparsity}", f"noise.kappa={kappa}", "noise=gradient", f"seed={seed}"]
    overrides = result_overrides(job)
    failed = (method, sparsity, kappa, seed) == FAILED
    metrics = {"dense_acc": 0.95, "dense_loss": 0.2}
    if not failed:
        acc = BASE[method, sparsity] - 0.05 * (kappa - 1) + OFFSET[method][seed]
        metrics.update(pruned_acc=acc - 0.1, finetuned_acc=None, final_acc=acc, final_loss=1.0 - acc,
                       sparsity_prunable=sparsity)
    rec = {
        "schema": 1, "status": "failed" if failed else "completed",
        "run_id": run_id_for("synth", overrides, seed), "sweep": "synth", "overrides": overrides,
        "index": {"model": "mlp", "dataset": "digits", "method": method, "schedule": "oneshot",
                  "noise": "gradient", "noise_level": float(kappa), "sparsity": sparsity, "seed": seed,
                  "sweep": "synth"},
        "metrics": metrics, "stages": [], "noise": {"kind": "gradient", "kappa": kappa},
        "timings": {"total": 1.5}, "env": {},
        "error": "RuntimeError: CUDA out of memory\nTraceback ..." if failed else None,
        "attempt": 1,
    }
    return job, rec


def write_synthetic_sweep(root: Path) -> Path:
    sweep_dir = root / "sweeps" / "synth"
    synthetic_multirun(sweep_dir)
    for method in ("magnitude", "swap"):
        for sparsity in (0.5, 0.9):
            for kappa in (1, 2):
                for seed in range(3):
                    if (method, sparsity, kappa, seed) == MISSING:
                        continue
                    job, rec = synthetic_record(method, sparsity, kappa, seed)
                    run_dir = sweep_dir / run_dirname(job) / f"seed={seed}"
                    rec["run_dir"] = str(run_dir)
                    atomic_write_json(run_dir / "result.json", rec)
    return sweep_dir


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    return write_synthetic_sweep(tmp_path)


# ------------------------------------------------------------------ golden

def test_golden_markdown(sweep_dir):
    report = report_sweep(sweep_dir, plots=False)
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(report.markdown)
    assert report.markdown == GOLDEN.read_text()
    assert (sweep_dir / "report" / "table.md").read_text() == report.markdown


def test_golden_numbers_by_hand(sweep_dir):
    """Spot-check the golden table against hand computation (not against the code)."""
    md = report_sweep(sweep_dir, plots=False).markdown
    # magnitude, s=0.5, kappa=1: 0.90, 0.91, 0.92 -> mean 0.91, sample std 0.01
    # swap,      s=0.5, kappa=1: 0.93, 0.95, 0.94 -> mean 0.94, sample std 0.01 (best in the row)
    # dense: one dense model per seed, shared by both methods -> n = 3 seeds, not 6 runs
    assert "| 0.5 | 0.9500 ± 0.0000 (n=3) | 0.9100 ± 0.0100 (n=3) | **0.9400 ± 0.0100 (n=3)** |" in md
    # s=0.9, kappa=2: magnitude seeds 0, 1 (seed 2 missing): 0.65, 0.66; swap seeds 0, 1 (2 failed): 0.76, 0.78
    assert "| 0.9 | 0.9500 ± 0.0000 (n=2) | 0.6550 ± 0.0071 (n=2) | **0.7700 ± 0.0141 (n=2)** |" in md
    # paired swap - magnitude at s=0.5, kappa=1: 0.03, 0.04, 0.02 -> mean 0.03, sd 0.01,
    # half width t(0.975, 2) * 0.01 / sqrt(3) = 4.302653 * 0.0057735 = 0.024841
    assert "| 0.5 | swap | 3 | +0.0300 | [+0.0052, +0.0548] * |" in md


# ------------------------------------------------------------------ paired

def test_off_nominal_cells_are_marked_in_both_tables_and_explained_once():
    """A method that kept more weights than the nominal sparsity on purpose (`sparsity_below_target`,
    e.g. cbs with the CBS code's rounding): its cell and every paired difference that involves it
    carry the mark; the other cells and sparsities do not; one note under the table explains it."""
    def row(method: str, seed: int, acc: float, sparsity: float, reached: float | None = None) -> dict:
        return {"model": "m", "dataset": "d", "method": method, "method_label": method, "schedule": "oneshot",
                "noise": "none", "noise_level": 0.0, "noise_label": "none", "variant": "",
                "sparsity": sparsity, "seed": seed, "status": "completed", "final_acc": acc, "run": f"{method}{seed}{sparsity}",
                "sparsity_prunable": sparsity if reached is None else reached,
                "sparsity_below_target": None if reached is None else sparsity - reached}

    df = to_frame([row(m, seed, acc + 0.01 * seed, s, reached)
                   for seed in range(3)
                   for m, acc, s, reached in (("magnitude", 0.30, 0.98, None), ("cbs", 0.53, 0.98, 0.978),
                                              ("lr", 0.45, 0.98, None), ("magnitude", 0.80, 0.9, None),
                                              ("cbs", 0.90, 0.9, None), ("lr", 0.89, 0.9, None))])
    md = render_markdown(df)
    lines = md.splitlines()
    table_98 = next(line for line in lines if line.startswith("| 0.98 | – |"))
    cells = [c.strip() for c in table_98.strip("|").split("|")]
    # columns: sparsity, dense, magnitude, cbs (best: bold), lr
    assert cells[3] == "**0.5400 ± 0.0100 (n=3)** †" and "†" not in cells[2] + cells[4]
    assert "†" not in next(line for line in lines if line.startswith("| 0.9 | – |"))
    paired = [line for line in lines if line.startswith(("| 0.98 | cbs", "| 0.98 | lr", "| 0.9 | cbs"))]
    assert [line.split("|")[2].strip() for line in paired] == ["cbs", "cbs †", "lr"]
    assert md.count("† Not at their nominal sparsity") == 1
    assert "cbs at 0.98 reached 0.9780 (3 run(s))" in md


def test_paired_ci_matches_hand_computation():
    ci = paired_ci([0.02, 0.04, 0.03])
    assert ci.n == 3
    assert ci.mean == pytest.approx(0.03)
    assert ci.std == pytest.approx(0.01)
    half = 4.302652729911275 * 0.01 / math.sqrt(3)  # t_{0.975, 2} from a t table
    assert ci.low == pytest.approx(0.03 - half, abs=1e-12)
    assert ci.high == pytest.approx(0.03 + half, abs=1e-12)
    one = paired_ci([0.5])
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.low)


def test_paired_differences_only_pair_same_seed_and_cell():
    def row(method: str, seed: int, acc: float, sparsity: float = 0.9) -> dict:
        return {"model": "m", "dataset": "d", "method": method, "method_label": method, "schedule": "oneshot",
                "noise": "none", "noise_level": 0.0, "noise_label": "none", "variant": "",
                "sparsity": sparsity, "seed": seed, "status": "completed", "final_acc": acc, "run": f"{method}{seed}"}

    df = to_frame([
        row("magnitude", 0, 0.70), row("magnitude", 1, 0.72), row("magnitude", 2, 0.71),
        row("swap", 0, 0.72), row("swap", 1, 0.76), row("swap", 2, 0.74),
        row("swap", 3, 0.99),                      # no magnitude run with seed 3: not paired
        row("swap", 0, 0.10, sparsity=0.5),        # another cell without a reference: not paired
    ])
    paired = paired_differences(df, "final_acc", "magnitude")
    assert len(paired) == 1
    r = paired.iloc[0]
    assert r.method_label == "swap" and r.n == 3 and r.sparsity == 0.9
    # diffs 0.02, 0.04, 0.03
    assert r.mean_diff == pytest.approx(0.03)
    assert r.ci_low == pytest.approx(0.03 - 4.302652729911275 * 0.01 / math.sqrt(3))


# ----------------------------------------------------------- sweep status

def test_failed_and_missing_from_multirun_yaml(sweep_dir):
    status = sweep_status(sweep_dir)
    assert status.grid_size == 2 * 2 * 2 * 3 and status.grid_error is None
    assert status.counts() == {"completed": 22, "failed": 1, "running": 0, "interrupted": 0, "missing": 1}
    (failed,) = status.failed
    assert failed.overrides == ["method=swap", "sparsity=0.9", "noise.kappa=2", "noise=gradient", "seed=2"]
    assert "CUDA out of memory" in failed.error
    (missing,) = status.missing
    assert missing.overrides == ["method=magnitude", "sparsity=0.9", "noise.kappa=2", "noise=gradient", "seed=2"]
    assert missing.run_dir == sweep_dir / "method=magnitude,noise.kappa=2,noise=gradient,sparsity=0.9" / "seed=2"
    assert status.relaunch == "cd /project && python3 launch.py -m -cd /project/sweeps -cn synth noise=gradient 'seed=range(3)'"
    report_sweep(sweep_dir, plots=False)
    lines = (sweep_dir / "report" / "missing.txt").read_text().splitlines()
    assert "method=swap sparsity=0.9 noise.kappa=2 noise=gradient seed=2  # failed" in lines
    assert "method=magnitude sparsity=0.9 noise.kappa=2 noise=gradient seed=2  # missing" in lines
    text = status.summary()
    assert "22 completed, 1 failed, 0 running, 0 interrupted, 1 missing of 24 expected" in text


def test_running_record_is_listed_for_rerun(sweep_dir):
    path = next(sweep_dir.glob("method=swap,noise.kappa=1,*sparsity=0.5/seed=0/result.json"))
    rec = read_json(path)
    rec["status"] = "running"  # killed mid-run: never finished, and nobody holds its run lock
    atomic_write_json(path, rec)
    status = sweep_status(sweep_dir)
    assert [c.run_dir for c in status.interrupted] == [path.parent] and not status.running
    assert len(status.to_rerun) == 3
    from pruning.lock import RunLock

    with RunLock(path.parent):  # a live process runs it
        status = sweep_status(sweep_dir)
    assert [c.run_dir for c in status.running] == [path.parent] and len(status.to_rerun) == 3


def test_sweep_without_runs_lists_every_cell_missing(tmp_path):
    sweep_dir = tmp_path / "empty"
    synthetic_multirun(sweep_dir)
    report = report_sweep(sweep_dir)
    assert report.status.counts()["missing"] == 24
    assert "No completed runs yet." in report.markdown and report.markdown.count("| missing |") == 24
    assert not list((sweep_dir / "report").glob("*.png"))


def test_cli_overrides_replace_sweeper_params(tmp_path):
    cfg = OmegaConf.create({"hydra": {"sweeper": {"params": {"seed": "range(5)", "sparsity": "0.5,0.9"}},
                                      "overrides": {"task": ["seed=0,1", "method=swap"]}}})
    grid = expected_grid(cfg)
    assert len(grid) == 4
    assert grid[0] == ["seed=0", "sparsity=0.5", "method=swap"]


def test_without_multirun_yaml_lists_existing_runs(sweep_dir):
    (sweep_dir / "multirun.yaml").unlink()
    status = sweep_status(sweep_dir)
    assert status.grid_size is None and "no multirun.yaml" in status.grid_error
    assert status.counts() == {"completed": 22, "failed": 1, "running": 0, "interrupted": 0, "missing": 0}


# ------------------------------------------------------------------- plots

def test_plots_are_written_as_png(sweep_dir):
    report = report_sweep(sweep_dir, plots=True)
    stems = ["acc_vs_noise", "acc_vs_sparsity", "paired_vs_sparsity"]
    pngs = sorted(p.name for p in (sweep_dir / "report").glob("*.png"))
    assert pngs == [f"{s}.png" for s in stems]
    assert sorted(p.name for p in (sweep_dir / "report").glob("*.pdf")) == [f"{s}.pdf" for s in stems]
    for name in pngs:
        data = (sweep_dir / "report" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        with Image.open(sweep_dir / "report" / name) as im:
            assert round(im.info["dpi"][0]) == 300 and im.size[0] >= 1500
    for stem in stems:
        assert (sweep_dir / "report" / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
    assert "![acc_vs_sparsity](acc_vs_sparsity.png)" in report.markdown
    assert "![paired_vs_sparsity](paired_vs_sparsity.png)" in report.markdown and ".pdf" not in report.markdown
    csv = pd.read_csv(sweep_dir / "report" / "results.csv")
    assert len(csv) == 23 and set(csv["status"]) == {"completed", "failed"}
    assert {"method_label", "noise_label", "final_acc", "dense_acc"} <= set(csv.columns)



def test_acc_vs_noise_keeps_other_noise_parameters_apart(tmp_path, monkeypatch):
    """A kappa x fraction grid: one line per fraction, never the two fractions pooled as seeds
    (the x axis is the level, kappa)."""
    import pruning.report as report_mod

    rows = [{"model": "m", "dataset": "d", "schedule": "oneshot", "noise": "gradient", "variant": "",
             "noise_level": float(k), "noise_label": f"gradient(fraction={f},kappa={k})", "method": "magnitude",
             "method_label": "magnitude", "sparsity": 0.9, "seed": seed, "status": "completed",
             "final_acc": acc + k / 100 + seed / 1000, "dense_acc": 0.95}
            for f, acc in ((0.25, 0.8), (0.5, 0.6)) for k in (1, 4) for seed in range(3)]
    figs = []
    monkeypatch.setattr(report_mod, "_save", lambda fig, out_dir, stem: figs.append(fig) or [])
    report_mod.plot_acc_vs_noise(pd.DataFrame(rows), tmp_path)
    (ax,) = figs[0].axes
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines() if not ln.get_label().startswith("_")}
    assert lines.pop("dense") and sorted(lines) == ["magnitude fraction=0.25 (n=3)", "magnitude fraction=0.5 (n=3)"]
    assert lines["magnitude fraction=0.25 (n=3)"] == pytest.approx([0.811, 0.841])
    assert lines["magnitude fraction=0.5 (n=3)"] == pytest.approx([0.611, 0.641])
    assert "kappa" in ax.get_xlabel()


def test_other_noise_params_drop_only_the_level():
    from pruning.report import other_noise_params

    assert other_noise_params("gradient", "gradient(fraction=0.25,kappa=1)") == "fraction=0.25"
    assert other_noise_params("gradient", "gradient(2)") == ""
    assert other_noise_params("analog", "analog(prog_noise_scale=1,t_inference=[0,3600])") == "t_inference=[0,3600]"
    assert other_noise_params("adversarial", "adversarial(eps=0.03,fraction=0.5)") == "fraction=0.5"
    assert other_noise_params("none", "none") == ""


def tick_labels(ax) -> dict[float, str]:
    """x tick position (kept fraction) -> its label, as the formatter draws it."""
    fmt = ax.xaxis.get_major_formatter()
    return {round(float(t), 9): fmt(t, i) for i, t in enumerate(ax.get_xticks())}


def test_sparsity_axis_is_log_of_kept_fraction_reversed_with_sparsity_ticks(sweep_dir):
    df = load_local(sweep_dir)
    [(suffix, fig)] = sparsity_figures(df)
    assert suffix == ""
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 2  # one panel per noise setting: kappa 1 and 2
    for ax in axes:
        assert ax.get_xscale() == "log" and ax.xaxis_inverted()
        assert sorted(round(t, 9) for t in ax.get_xticks()) == [0.1, 0.5]     # 1 - 0.9, 1 - 0.5
        assert tick_labels(ax) == {0.1: "0.9", 0.5: "0.5"}
        assert ax.get_xlabel().startswith("sparsity")
        xs = sorted(round(float(x), 9) for x in ax.get_lines()[0].get_xdata())
        assert xs == [0.1, 0.5]
    assert axes[0].get_ylabel() == "test accuracy" and "final_acc" not in axes[0].get_ylabel()
    assert [ax.get_title() for ax in axes] == ["noise: gradient(kappa=1)", "noise: gradient(kappa=2)"]
    legend = [t.get_text() for t in axes[1].get_legend().get_texts()]
    # kappa=2: magnitude misses seed 2 at 0.9 and swap's seed 2 failed there
    assert legend == ["magnitude (n=2-3)", "swap (n=2-3)", "dense"]
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["magnitude (n=3)", "swap (n=3)", "dense"]


def test_paired_plot_error_bars_are_the_hand_computed_interval(sweep_dir):
    """swap - magnitude at sparsity 0.5, kappa 1: per-seed diffs 0.03, 0.04, 0.02 -> mean 0.03,
    sd 0.01, half width t(0.975, 2) 0.01 / sqrt(3) = 0.024841 (as in test_paired_ci)."""
    [(_, fig)] = paired_figures(load_local(sweep_dir))
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.xaxis_inverted()
    assert ax.get_ylabel() == "test accuracy: method - magnitude"
    assert any(list(line.get_ydata()) == [0.0, 0.0] for line in ax.get_lines())  # zero line
    [container] = ax.containers
    data_line, caps, _ = container.lines
    x = [round(float(v), 9) for v in data_line.get_xdata()]
    i = x.index(0.5)
    assert data_line.get_ydata()[i] == pytest.approx(0.03, abs=1e-9)
    half = 4.302652729911275 * 0.01 / math.sqrt(3)
    assert sorted([caps[0].get_ydata()[i], caps[1].get_ydata()[i]]) == \
        [pytest.approx(0.03 - half, abs=1e-9), pytest.approx(0.03 + half, abs=1e-9)]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["swap (n=3)"]


def test_noise_settings_share_one_figure_with_a_panel_each():
    """A sweep over noise kinds (none and gradient) gives one figure, noise-free panel first."""
    rows = []
    for kind, label, level in (("gradient", "gradient(kappa=2)", 2.0), ("none", "none", 0.0)):
        for method in ("magnitude", "woodfisher"):
            for s in (0.5, 0.9, 0.95, 0.98):
                for seed in range(2):
                    rows.append({"model": "mlp", "dataset": "digits", "schedule": "oneshot", "noise": kind,
                                 "noise_label": label, "noise_level": level, "variant": "", "method": method,
                                 "method_label": method, "sparsity": s, "seed": seed, "status": "completed",
                                 "final_acc": 0.9 - s / 2 + (0.05 if method == "woodfisher" else 0.0) + seed / 100,
                                 "dense_acc": 0.97})
    df = pd.DataFrame(rows)
    [(_, fig)] = sparsity_figures(df)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["noise: none", "noise: gradient(kappa=2)"]
    assert sorted(tick_labels(axes[0]).values()) == ["0.5", "0.9", "0.95", "0.98"]
    assert tick_labels(axes[0])[0.02] == "0.98"
    assert metric_label("pruned_acc").startswith("test accuracy") and metric_label("my_metric") == "my metric"


def test_variants_differing_late_in_a_long_key_get_their_own_figures():
    """Two settings whose keys share their first 120 characters (a long checkpoint path, then a
    `model.prunable` variant) used to be saved under one file name, the second over the first."""
    head = "model.checkpoint=/data/" + "x" * 120
    rows = [{"model": "resnet20b", "dataset": "cifar10", "schedule": "oneshot", "noise": "none",
             "noise_label": "none", "noise_level": 0.0, "variant": f"{head} {tail}", "method": "lr",
             "method_label": "lr", "sparsity": s, "seed": 0, "status": "completed", "final_acc": 0.5,
             "dense_acc": 0.9} for tail in ("", "model.prunable=[a,b]") for s in (0.5, 0.9)]
    suffixes = [suffix for suffix, _ in sparsity_figures(pd.DataFrame(rows))]
    assert len(suffixes) == 2 and len(set(suffixes)) == 2
    assert all(len(sfx) <= 121 for sfx in suffixes)  # "_" + at most 120


# -------------------------------------------------------------------- W&B

def _api_run(rec: dict, state: str = "finished", job_type: str | None = None) -> SimpleNamespace:
    """An object shaped like a `wandb.Api().runs(...)` item logged by WandbTracker."""
    summary = {**wandb_summary(rec), "_step": 12, "_runtime": 3.5, "prune/acc": 0.1,
               "plots/x": {"_type": "image-file", "path": "media/x.png"}}
    return SimpleNamespace(id=rec["run_id"], name="label", group="synth", state=state,
                           job_type=job_type or rec["index"]["method"],
                           config={**wandb_config(rec, {"seed": rec["index"]["seed"]}), "_wandb": {"x": 1}},
                           summary=SimpleNamespace(_json_dict=summary))


def test_wandb_runs_convert_to_the_local_schema(sweep_dir):
    """`--from-wandb` cannot be tested against a server here: this checks the conversion of objects
    shaped like wandb.Api runs (config, summary._json_dict, state, job_type) into the same rows."""
    local = load_local(sweep_dir)
    runs = []
    for path in sorted(sweep_dir.glob("**/result.json")):
        rec = read_json(path)
        state = "failed" if rec["status"] == "failed" else "finished"
        runs.append(_api_run(rec, state))
    # a crashed run that never wrote its summary status; and the report run of the group
    crashed = dict(runs[0].summary._json_dict)
    crashed.pop("status")
    runs[0] = SimpleNamespace(**{**vars(runs[0]), "state": "crashed", "summary": SimpleNamespace(_json_dict=crashed)})
    runs.append(SimpleNamespace(id="report-1", group="synth", state="finished", job_type="report",
                                config={"sweep": "synth"}, summary=SimpleNamespace(_json_dict={})))
    remote = to_frame(rows_from_wandb(runs))
    assert len(remote) == len(local) == 23
    assert (remote["status"] == "failed").sum() == 2  # the failed one and the crashed one
    local.loc[local["run_id"] == runs[0].id, "status"] = "failed"
    cols = ["model", "dataset", "method_label", "noise_label", "noise_level", "sparsity", "seed", "status",
            "final_acc", "dense_acc", "time_total", "run_id"]
    key = ["run_id"]
    pd.testing.assert_frame_equal(local[cols].sort_values(key).reset_index(drop=True),
                                  remote[cols].sort_values(key).reset_index(drop=True), check_dtype=False)
    pd.testing.assert_frame_equal(summarize(local), summarize(remote))
    assert "prune/acc" not in remote.columns and "_step" not in remote.columns


def test_wandb_attempts_and_repeats_of_a_cell_count_once(sweep_dir):
    """An attempt that started over is a second W&B run (`<run_id>-a2`) of the same record: the report
    keeps the completed one, whichever came first. Runs of one cell_id in two ad-hoc sweeps of a
    group count once too; distinct cells are untouched."""
    recs = [read_json(p) for p in sorted(sweep_dir.glob("**/result.json"))]
    done = next(r for r in recs if r["status"] == "completed")
    failed_first = {**done, "status": "failed", "attempt": 1, "metrics": {}, "error": "killed"}
    retried = {**done, "attempt": 2}
    runs = [_api_run(failed_first, "failed"), _api_run(retried)]
    runs[1].id = f"{done['run_id']}-a2"
    twin = {**done, "run_id": "another-sweep-run", "cell_id": "cell-x"}
    twin_done = {**twin, "run_id": "third", "status": "completed"}
    twin_failed = {**twin, "status": "failed", "metrics": {}}
    other = next(r for r in recs if r["run_id"] != done["run_id"])
    runs += [_api_run(twin_failed, "failed"), _api_run(twin_done), _api_run(other)]
    rows = rows_from_wandb(runs)
    assert [(r["run_id"], r["status"]) for r in rows] == [
        (done["run_id"], "completed"), ("third", "completed"), (other["run_id"], other["status"])]
    assert rows[0]["attempt"] == 2 and rows[0]["run"] == f"wandb:{done['run_id']}-a2"
    assert one_row_per_cell([(None, {"status": "failed"}), (None, {"status": "completed"})]) == [
        {"status": "failed"}, {"status": "completed"}]


def test_to_wandb_offline_writes_report_run(sweep_dir, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main([str(sweep_dir), "--to-wandb", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "written offline to " in out and "W&B run report-" in out and "group synth" in out
    files = list((sweep_dir / "report").glob("wandb/offline-run-*/run-report-*.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0


def test_cli_errors_are_one_line(tmp_path, sweep_dir, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(sweep_dir), "--metric", "final_accc", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "final_accc" in err and "final_acc" in err.split("available:")[1]
    assert main(["--from-wandb", "me/proj"]) == 2
    assert "--group" in capsys.readouterr().err


def test_render_without_status_lists_failed_runs(sweep_dir):
    md = render_markdown(load_local(sweep_dir))
    assert "Runs: 22 completed, 1 failed, 0 running." in md
    assert "| failed |" in md and "CUDA out of memory" in md


# ------------------------------------------------------- callback / e2e

def test_callback_never_raises(tmp_path, capsys):
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "does-not-exist")}}})
    ReportCallback().on_multirun_end(cfg)
    assert "warning: the sweep report could not be written" in capsys.readouterr().err
    ReportCallback(enabled=False).on_multirun_end(cfg)
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_multirun_writes_report_via_callback(tmp_path, session_cache):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "launch.py"), "-m", "sparsity=0.5,0.8", "seed=0,1",
           f"hydra.sweep.dir={sweep}", f"paths.out_root={tmp_path / 'out'}", f"paths.cache_dir={session_cache}",
           f"paths.data_dir={tmp_path / 'data'}", "model.train.epochs=2", "progress=false", "device=cpu",
           "calibration.num_samples=64", "sweep_name=e2e"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 completed, 0 failed, 0 running, 0 interrupted, 0 missing of 4 expected" in proc.stdout
    md = (sweep / "report" / "table.md").read_text()
    assert "# Sweep report: e2e" in md and "| 0.8 |" in md and "(n=2)" in md
    assert (sweep / "report" / "acc_vs_sparsity.png").stat().st_size > 0
    assert len(pd.read_csv(sweep / "report" / "results.csv")) == 4


def test_sweep_where_every_run_failed_still_reports_the_failures(tmp_path):
    """No completed run means no metric columns at all: the report must still list the failures."""
    sweep_dir = tmp_path / "sweeps" / "synth"
    synthetic_multirun(sweep_dir)
    for method in ("magnitude", "swap"):
        job, rec = synthetic_record(method, 0.5, 1, 0)
        rec.update(status="failed", metrics={}, error="ValueError: boom")
        atomic_write_json(sweep_dir / run_dirname(job) / "seed=0" / "result.json", rec)
    report = report_sweep(sweep_dir, plots=False)
    assert report.status.counts()["failed"] == 2 and report.summary.empty
    missing = (sweep_dir / "report" / "missing.txt").read_text()
    assert missing.count("# failed") == 2
