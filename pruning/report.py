"""Compare methods across a sweep: `python -m pruning.report SWEEP_DIR` (or `pruning-report`).

Reads every `<sweep_dir>/**/result.json` (or, with `--from-wandb ENTITY/PROJECT --group SWEEP`,
the runs of a W&B group; both go through `flatten_record`, so both give the same flat rows) and
writes under `<sweep_dir>/report/` (or `--out`):

  results.csv           one row per run (tidy: index keys, labels, status, all metrics)
  summary.csv           mean, std and n over seeds per (setting, method, sparsity) + dense baseline
  paired.csv            paired differences vs the reference method, with a t-based 95% CI
  table.md              comparison tables (methods x sparsity per model/dataset/noise setting,
                        best per row in bold), paired differences, failed and missing runs
  missing.txt           overrides that rerun failed, killed and missing cells
  acc_vs_sparsity*.png  metric vs sparsity per method, seed band, n per method in the legend, one
                        panel per noise setting, dense baseline dashed; x: log scale of the fraction
                        kept (1 - sparsity), reversed, ticks labelled by sparsity
  paired_vs_sparsity*   paired differences vs the reference method with their CI, same x axis
  acc_vs_noise*.png     metric vs noise level at a fixed sparsity (when the noise level varies)
  (every plot also as .pdf; PNGs at 300 dpi)

Labels derived from a run's result-relevant overrides:
  method label   the method plus its swept hyperparameters, e.g. `magnitude[scope=layerwise]`
  noise label    the noise kind plus its parameters, e.g. `gradient(kappa=2)`; `none`
  variant        any other override (e.g. `finetune=short`): a separate table
Paired differences compare runs of two methods in the same cell and with the same seed, i.e.
with the same calibration subsets and noise draws (see `pruning.seeds.derive_seed`), and the same
G at the first pruning stage (later stages compute G at each method's own weights).

`--to-wandb` uploads the tables and plots to a run with job_type="report" in the sweep's group.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import sys
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pruning.record import INDEX_KEYS, read_json, read_record

DEFAULT_METRIC = "final_acc"
DEFAULT_REFERENCE = "magnitude"
SETTING_COLS = ["model", "dataset", "schedule", "noise", "noise_label", "variant"]
PLOT_GROUP_COLS = ["model", "dataset", "schedule", "noise", "variant"]
_FRONT = ["sweep", "model", "dataset", "method", "method_label", "schedule", "noise", "noise_level",
          "noise_label", "variant", "sparsity", "seed", "status"]
_BACK = ["attempt", "run_id", "run", "overrides", "error"]
_AXIS_KEYS = ("model", "dataset", "method", "schedule", "noise", "sparsity", "seed")
_WANDB_STATE = {"finished": "completed", "running": "running", "pending": "running",
                "crashed": "failed", "failed": "failed", "killed": "failed"}


# ----------------------------------------------------------------- loading

def _split(override: str) -> tuple[str, str]:
    key, _, value = str(override).partition("=")
    return key.lstrip("+~"), value


def labels(method: Any, noise: Any, noise_level: Any, overrides: Sequence[str]) -> dict[str, str]:
    """method_label, noise_label and variant of a run from its result-relevant overrides."""
    method_params, noise_params, variant = [], [], []
    for ov in sorted(str(o) for o in overrides):
        key, value = _split(ov)
        if key.startswith("method."):
            method_params.append(f"{key[len('method.'):]}={value}")
        elif key.startswith("noise."):
            noise_params.append(f"{key[len('noise.'):]}={value}")
        elif key not in _AXIS_KEYS:
            variant.append(f"{key}={value}")
    method_label = str(method) + (f"[{','.join(method_params)}]" if method_params else "")
    noise = str(noise) if noise is not None else "none"
    if noise == "none" and not noise_params:
        noise_label = "none"
    elif noise_params:
        noise_label = f"{noise}({','.join(noise_params)})"
    else:
        level = noise_level if noise_level is not None else ""
        noise_label = f"{noise}({_g(level)})"
    return {"method_label": method_label, "noise_label": noise_label, "variant": " ".join(variant)}


def flatten_record(rec: Mapping[str, Any], run: str | None = None) -> dict[str, Any]:
    """One flat row from a run record (result.json schema). The W&B loader builds the same record
    shape from a W&B run, so local and W&B reports share this schema."""
    index = dict(rec.get("index") or {})
    row: dict[str, Any] = {k: index.get(k) for k in INDEX_KEYS}
    row["sweep"] = row.get("sweep") or rec.get("sweep")
    overrides = [str(o) for o in rec.get("overrides") or []]
    row.update(labels(row["method"], row["noise"], row["noise_level"], overrides))
    row["status"] = rec.get("status") or "running"
    for key, value in (rec.get("metrics") or {}).items():
        if isinstance(value, bool):
            value = int(value)
        if value is None or isinstance(value, (int, float, str)):
            row[key] = value
    for key, value in (rec.get("timings") or {}).items():
        row[f"time_{key}"] = value
    row["attempt"] = rec.get("attempt")
    row["run_id"] = rec.get("run_id")
    row["run"] = run if run is not None else rec.get("run_dir")
    row["overrides"] = " ".join(overrides)
    row["error"] = (str(rec["error"]).splitlines() or [""])[0][:300] if rec.get("error") else None
    return row


def to_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows -> the tidy frame, with fixed leading columns and typed index columns."""
    df = pd.DataFrame(list(rows))
    for col in _FRONT + _BACK:
        if col not in df.columns:
            df[col] = None
    for col in ("sparsity", "noise_level"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce").astype("Int64")
    for col in ("variant", "noise_label", "method_label"):
        df[col] = df[col].fillna("")
    rest = sorted(c for c in df.columns if c not in _FRONT and c not in _BACK)
    df = df[_FRONT + rest + _BACK]
    return df.sort_values(["model", "dataset", "schedule", "noise", "noise_level", "noise_label", "variant",
                           "method_label", "sparsity", "seed", "run"], na_position="last",
                          kind="mergesort").reset_index(drop=True)


def load_local(sweep_dir: str | Path) -> pd.DataFrame:
    """All run records under a sweep directory (any depth; `report/` is ignored), one row per cell."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for path in sorted(sweep_dir.glob("**/result.json")):
        rel = path.parent.relative_to(sweep_dir)
        if rel.parts[:1] == ("report",):
            continue
        rec = read_record(path)
        if rec is None:
            continue
        if rec.get("unreadable"):  # listed as a failed cell that names the file; the report goes on
            print(f"warning: {rec['error']}; listed as failed", file=sys.stderr, flush=True)
        # one cell run twice (two ad-hoc sweeps into one folder) counts once
        rows.append((rec.get("cell_id"), flatten_record(rec, run=rel.as_posix())))
    return to_frame(one_row_per_cell(rows))


def one_row_per_cell(keyed_rows: Iterable[tuple[str | None, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows in their order, one per key: a completed run over any other, then the later attempt, then
    the first seen. Rows without a key (records written before cell ids existed) all stay."""
    rows: list[dict[str, Any]] = []
    at: dict[str, int] = {}

    def rank(row: Mapping[str, Any]) -> tuple[bool, int]:
        return row.get("status") == "completed", int(row.get("attempt") or 0)

    for key, row in keyed_rows:
        if key and key in at:
            if rank(row) > rank(rows[at[key]]):
                rows[at[key]] = row
            continue
        if key:
            at[key] = len(rows)
        rows.append(row)
    return rows


# history keys in a W&B summary are `<phase>/<key>` (pruning.tracking); record metrics may also hold
# a `/` (e.g. `analog/acc_mean@t=1d`), so runs logged before `metric_names` existed fall back to these
_HISTORY_PHASE = re.compile(r"(dense|dense_train|prune|pruned|finetune|stage\d+_finetune|gradual|final|gfs|grda|"
                            r"sdprun|time|plots)/")
_SUMMARY_META = ("status", "attempt", "error", "metric_names")


def record_from_wandb(run: Any) -> dict[str, Any] | None:
    """A run record (result.json shape) from a `wandb.Api` run logged by `WandbTracker`; None for
    report runs. Uses run.config (flat index keys, overrides), run.summary and run.state.

    The record's metrics are the summary keys listed in `metric_names` (written by the tracker),
    names with a `/` included; older runs without it keep every number but history and time keys."""
    if getattr(run, "job_type", None) == "report":
        return None
    config = {k: v for k, v in dict(run.config or {}).items() if not str(k).startswith("_")}
    summary_obj = getattr(run, "summary", None) or {}
    summary = dict(getattr(summary_obj, "_json_dict", summary_obj) or {})
    index = {k: config.get(k) for k in INDEX_KEYS}
    index["sweep"] = index.get("sweep") or getattr(run, "group", None)
    names = summary.get("metric_names")
    if isinstance(names, (list, tuple)):
        metrics = {str(k): summary.get(k) for k in names}
    else:
        metrics = {k: v for k, v in summary.items() if not str(k).startswith("_") and k not in _SUMMARY_META
                   and not _HISTORY_PHASE.match(str(k))}
    metrics = {k: v for k, v in metrics.items() if v is None or isinstance(v, (int, float))}
    status = summary.get("status") or _WANDB_STATE.get(str(getattr(run, "state", "")), "running")
    return {
        "status": status,
        "run_id": config.get("run_id") or getattr(run, "id", None),
        "cell_id": config.get("cell_id"),
        "sweep": index["sweep"],
        "overrides": list(config.get("overrides") or []),
        "index": index,
        "metrics": metrics,
        "timings": {k[len("time/"):]: v for k, v in summary.items() if str(k).startswith("time/")},
        "error": summary.get("error"),
        "attempt": summary.get("attempt"),
    }


def rows_from_wandb(runs: Iterable[Any]) -> list[dict[str, Any]]:
    """Flat rows (same schema as `load_local`) from `wandb.Api().runs(...)` objects, one per cell: an
    attempt that started over is a new W&B run (`<run_id>-a<attempt>`) of the same record, and a
    cell run by two ad-hoc sweeps of one group shares its `cell_id`."""
    rows = []
    for run in runs:
        rec = record_from_wandb(run)
        if rec is not None:
            rows.append((rec.get("cell_id") or rec.get("run_id"), flatten_record(rec, run=f"wandb:{getattr(run, 'id', '')}")))
    return one_row_per_cell(rows)


def load_wandb(path: str, group: str) -> pd.DataFrame:
    """The runs of one sweep (W&B group) of ENTITY/PROJECT; needs network and a W&B login."""
    import wandb

    runs = wandb.Api().runs(path, filters={"group": group, "jobType": {"$ne": "report"}})
    return to_frame(rows_from_wandb(runs))


# -------------------------------------------------------------- statistics

def _g(x: Any) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return f"{x:g}"
    return f"{x:g}" if isinstance(x, (int, float)) else str(x)


def lower_is_better(metric: str) -> bool:
    return "loss" in metric or "error" in metric or metric.startswith("time")


def dense_metric(metric: str) -> str | None:
    """The dense baseline of a metric: dense_acc for *_acc, dense_loss for *_loss."""
    if metric.endswith("acc"):
        return "dense_acc"
    if metric.endswith("loss"):
        return "dense_loss"
    return None


def _completed(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    no_completed = df.empty or "status" not in df.columns or not (df["status"] == "completed").any()
    if no_completed and metric not in df.columns:
        # nothing finished (e.g. every run failed): empty tables, the failed list still matters
        df = df.assign(**{metric: pd.Series(dtype=float, index=df.index)})
    if metric not in df.columns:
        raise KeyError(f"metric {metric!r} is not in the run records; available: "
                       f"{', '.join(c for c in df.columns if c not in _FRONT + _BACK)}")
    done = df[df["status"] == "completed"].copy()
    done[metric] = pd.to_numeric(done[metric], errors="coerce")
    return done


def summarize(df: pd.DataFrame, metric: str = DEFAULT_METRIC) -> pd.DataFrame:
    """mean, std (ddof 1) and n over seeds per (setting, noise level, method_label, sparsity)."""
    done = _completed(df, metric)
    keys = SETTING_COLS + ["noise_level", "method_label", "sparsity"]
    if done.empty:
        return pd.DataFrame(columns=keys + ["mean", "std", "n"])
    agg = done.groupby(keys, dropna=False, sort=True)[metric].agg(["mean", "std", "count"])
    return agg.rename(columns={"count": "n"}).reset_index()


def dense_baseline(df: pd.DataFrame, metric: str = DEFAULT_METRIC) -> pd.DataFrame:
    """The dense model's value of the metric (dense_acc for *_acc, dense_loss for *_loss) of each
    (setting, noise level, sparsity) row: mean, std and n over seeds (every method of a seed prunes
    the same dense model, so its runs count once)."""
    done = _completed(df, metric)
    keys = SETTING_COLS + ["noise_level", "sparsity"]
    dm = dense_metric(metric)
    if done.empty or not dm or dm not in done.columns:
        return pd.DataFrame(columns=keys + ["mean", "std", "n"])
    done[dm] = pd.to_numeric(done[dm], errors="coerce")
    per_seed = done.groupby(keys + ["seed"], dropna=False, sort=True)[dm].mean().reset_index()
    agg = per_seed.groupby(keys, dropna=False, sort=True)[dm].agg(["mean", "std", "count"])
    return agg.rename(columns={"count": "n"}).reset_index()


@dataclass
class PairedCI:
    n: int
    mean: float
    std: float
    low: float
    high: float


def paired_ci(diffs: Sequence[float], confidence: float = 0.95) -> PairedCI:
    """Mean of paired differences with a two-sided t confidence interval (n - 1 dof).
    With n < 2 the interval is undefined (NaN)."""
    from scipy import stats

    x = [float(d) for d in diffs if d is not None and not math.isnan(float(d))]
    n = len(x)
    if n == 0:
        return PairedCI(0, math.nan, math.nan, math.nan, math.nan)
    mean = sum(x) / n
    if n < 2:
        return PairedCI(n, mean, math.nan, math.nan, math.nan)
    std = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return PairedCI(n, mean, std, mean - half, mean + half)


def paired_differences(df: pd.DataFrame, metric: str = DEFAULT_METRIC, reference: str = DEFAULT_REFERENCE,
                       confidence: float = 0.95) -> pd.DataFrame:
    """metric(method) - metric(reference) per (setting, noise level, sparsity, seed), i.e. runs that
    shared the calibration subsets and noise draws (and G at the first stage); mean and t-CI over
    seeds per method."""
    done = _completed(df, metric)
    keys = SETTING_COLS + ["noise_level", "sparsity"]
    cols = keys + ["method_label", "reference", "n", "mean_diff", "std_diff", "ci_low", "ci_high"]
    out = []
    cell = keys + ["seed"]
    ref = done[done["method_label"] == reference].groupby(cell, dropna=False)[metric].mean()
    if ref.empty:
        return pd.DataFrame(columns=cols)
    others = done[done["method_label"] != reference]
    per_seed = others.groupby(cell + ["method_label"], dropna=False)[metric].mean().reset_index()
    per_seed = per_seed.merge(ref.rename("ref").reset_index(), on=cell, how="inner")
    per_seed["diff"] = per_seed[metric] - per_seed["ref"]
    for key, grp in per_seed.groupby(keys + ["method_label"], dropna=False, sort=True):
        ci = paired_ci(grp["diff"].tolist(), confidence)
        if ci.n == 0:
            continue
        out.append([*key, reference, ci.n, ci.mean, ci.std, ci.low, ci.high])
    return pd.DataFrame(out, columns=cols)


# --------------------------------------------------------------- rendering

def _fmt(x: Any, digits: int = 4, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _cell(mean: float, std: float, n: int) -> str:
    if n is None or n == 0 or mean is None or math.isnan(mean):
        return "–"
    if n < 2 or std is None or math.isnan(std):
        return f"{_fmt(mean)} (n={int(n)})"
    return f"{_fmt(mean)} ± {_fmt(std)} (n={int(n)})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A GitHub pipe table; `align` is one of l/r per column (default: first left, rest right)."""
    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---:" if a == "r" else ":---" for a in align]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(sep), *(line(r) for r in rows)])


def _setting_title(key: Mapping[str, Any]) -> str:
    title = f"{key['model']} / {key['dataset']}, noise: {key['noise_label']}, schedule: {key['schedule']}"
    if key.get("variant"):
        title += f", {key['variant']}"
    return title


def _method_order(methods: Iterable[str], reference: str) -> list[str]:
    return sorted(set(methods), key=lambda m: (m != reference, m))


def comparison_table(summary: pd.DataFrame, dense: pd.DataFrame, metric: str,
                     reference: str = DEFAULT_REFERENCE, off_nominal: Collection[tuple[str, float]] = ()) -> str:
    """Markdown: rows = sparsity, columns = dense baseline + methods; best mean per row in bold.
    `summary` and `dense` are the rows of one setting from `summarize` / `dense_baseline`; cells in
    `off_nominal` (method label, sparsity) get the `OFF_NOMINAL` mark."""
    methods = _method_order(summary["method_label"], reference)
    lower = lower_is_better(metric)
    dense_by_s = {float(r.sparsity): r for r in dense.itertuples()}
    rows = []
    for sparsity, grp in summary.groupby("sparsity", sort=True):
        by_method = {r.method_label: r for r in grp.itertuples()}
        means = {m: round(float(r.mean), 4) for m, r in by_method.items()
                 if r.n and not math.isnan(r.mean)}
        best = (min if lower else max)(means.values()) if means else None
        d = dense_by_s.get(float(sparsity))
        cells = [_g(float(sparsity)), _cell(d.mean, d.std, d.n) if d is not None else "–"]
        for m in methods:
            r = by_method.get(m)
            text = _cell(r.mean, r.std, r.n) if r is not None else "–"
            if m in means and means[m] == best and len(means) > 1:
                text = f"**{text}**"
            if (m, float(sparsity)) in off_nominal:
                text += f" {OFF_NOMINAL}"
            cells.append(text)
        rows.append(cells)
    return markdown_table(["sparsity", "dense", *methods], rows)


def magnitude_gains(summary: pd.DataFrame, table: Any) -> dict[tuple[float, str], tuple[float, float | None]]:
    """Per (sparsity, method label) other than magnitude, in percentage points: ours minus magnitude
    pruning of the same runs, and the published method minus published magnitude (None where either
    is unpublished, or `table` is None). A different test set (e.g. a development split) shifts every
    method alike, so gains compare where absolute accuracies cannot."""
    ok = summary[(summary["n"] > 0) & summary["mean"].notna()]
    mp = {float(r.sparsity): 100 * float(r.mean) for r in ok.itertuples() if r.method_label == "magnitude"}
    out: dict[tuple[float, str], tuple[float, float | None]] = {}
    for r in ok.itertuples():
        sp = float(r.sparsity)
        if r.method_label == "magnitude" or sp not in mp:
            continue
        pub = table.value(str(r.method_label).split("[", 1)[0], sp) if table is not None else None
        pub_mp = table.value("magnitude", sp) if table is not None else None
        out[(sp, r.method_label)] = (100 * float(r.mean) - mp[sp],
                                     None if pub is None or pub_mp is None else pub - pub_mp)
    return out


def repairs_pruned_model(runs: pd.DataFrame, metric: str = DEFAULT_METRIC) -> bool:
    """Whether `metric` of these runs was measured on a repaired pruned model (fine-tuning,
    BatchNorm re-estimation), which the published one-shot protocols never do.

    Read from the records, so a repair set in a study's base config (no `finetune` override in the
    variant) counts and `finetune.epochs=0` does not: a run whose finetune stage did something has
    a `finetuned_acc` (None when the stage is off). `pruned_*` and `dense_*` are measured before the
    stage, so they stay comparable. Frames without the column fall back to the overrides: any
    `finetune` option but `none`."""
    if metric.startswith(("pruned_", "dense_")):
        return False
    cols = [c for c in ("finetuned_acc", "finetuned_loss") if c in runs.columns]
    if cols:
        return bool(runs[cols].apply(pd.to_numeric, errors="coerce").notna().to_numpy().any())
    variants = runs["variant"].dropna() if "variant" in runs.columns else []
    return any(v.startswith("finetune") and v != "finetune=none" for var in variants for v in str(var).split())


def published_table(summary: pd.DataFrame, dense: pd.DataFrame, key: Mapping[str, Any],
                    metric: str, runs: pd.DataFrame) -> str | None:
    """Markdown: ours beside the published numbers (`pruning.published`) for a noise-free setting
    whose model, dataset and schedule have a published table; None otherwise, and when the metric
    was measured on a repaired pruned model (`repairs_pruned_model` of the setting's completed
    `runs`: fine-tuning, BatchNorm re-estimation), which the published one-shot protocols do not. Ours in percent (x100) when the metric is an accuracy
    fraction."""
    from pruning.published import find_table

    if not metric.endswith("acc") or key.get("noise_label") not in ("none", None, ""):
        return None
    if repairs_pruned_model(runs, metric):
        return None
    table = find_table(key.get("model"), key.get("dataset"), key.get("schedule"))
    if table is None:
        return None
    rows = []
    d = dense.dropna(subset=["mean"]) if not dense.empty else dense
    if not d.empty:
        ours = 100 * float((d["mean"] * d["n"]).sum() / d["n"].sum())
        rows.append(["dense", "–", f"{ours:.2f}", f"{table.dense:.2f}", f"{ours - table.dense:+.2f}", "–"])
    gains = magnitude_gains(summary, table)
    for r in summary.sort_values(["sparsity", "method_label"]).itertuples():
        method, sp = str(r.method_label).split("[", 1)[0], float(r.sparsity)
        pub = table.value(method, sp)
        if pub is None or r.n == 0 or math.isnan(r.mean):
            continue
        ours = 100 * float(r.mean)
        spread = f" ± {100 * float(r.std):.2f}" if r.n > 1 and not math.isnan(r.std) else ""
        mark = "≈" if table.is_approx(method, sp) else ""
        ours_gain, pub_gain = gains.get((sp, r.method_label), (None, None))
        gain = f"{ours_gain:+.2f} / {mark}{pub_gain:+.2f}" if pub_gain is not None else "–"
        rows.append([_g(sp), r.method_label, f"{ours:.2f}{spread} (n={int(r.n)})",
                     f"{mark}{pub:.2f}", f"{ours - pub:+.2f}", gain])
    if not rows:
        return None
    variant = str(key.get("variant") or "").strip()
    caveat = (f" Caveat: these runs change the study's settings (`{variant}`), so they follow the published "
              f"protocol only if those changes are part of it." if variant else "")
    head = (f"Published ({table.tag}): {table.source}" + (f"; {table.note}" if table.note else "") + "." + caveat
            + " Accuracy in percent; the last column is each method's gain over magnitude pruning, ours / "
              "published, which a different test set shifts less than the accuracies themselves:")
    return head + "\n\n" + markdown_table(["sparsity", "method", "ours", "published", "ours - published",
                                            "gain over magnitude"], rows, "llrrrr")


# marks a cell (comparison table) or a paired difference whose runs kept more weights than the nominal
# sparsity allows; `below_target_note` explains it under the table
OFF_NOMINAL = "†"


def off_nominal_cells(runs: pd.DataFrame) -> dict[tuple[str, float], tuple[float, int]]:
    """(method label, nominal sparsity) -> (mean sparsity reached, runs) for the cells whose runs kept
    more weights than their nominal sparsity allows, on purpose (`sparsity_below_target`, recorded
    when a method declares such a rule, e.g. cbs with `rmp_rounding: reference`)."""
    if runs.empty or "sparsity_below_target" not in runs.columns:
        return {}
    short = runs[pd.to_numeric(runs["sparsity_below_target"], errors="coerce") > 0]
    return {(str(method), float(s)): (float(pd.to_numeric(grp["sparsity_prunable"], errors="coerce").mean()), len(grp))
            for (method, s), grp in short.groupby(["method_label", "sparsity"], sort=True)}


def below_target_note(off_nominal: Mapping[tuple[str, float], tuple[float, int]]) -> str | None:
    """A line naming the `off_nominal_cells` with the sparsity they reached; None when there are none."""
    cells = [f"{method} at {_g(s)} reached {reached:.4f} ({n} run(s))"
             for (method, s), (reached, n) in off_nominal.items()]
    if not cells:
        return None
    return (f"{OFF_NOMINAL} Not at their nominal sparsity (the method's declared rule keeps more weights; see the "
            "runs' warnings), so a comparison with other methods there is not at equal sparsity: "
            + "; ".join(cells) + ".")


def paired_table(paired: pd.DataFrame, confidence: float = 0.95,
                 off_nominal: Collection[tuple[str, float]] = (), reference: str = DEFAULT_REFERENCE) -> str:
    """Markdown of `paired_differences`; a difference that involves an `off_nominal_cells` cell (the
    method's or the reference's) gets the mark after the method."""
    rows = []
    for r in paired.sort_values(["sparsity", "method_label"]).itertuples():
        sig = "" if math.isnan(r.ci_low) else (" *" if r.ci_low > 0 or r.ci_high < 0 else "")
        ci = "–" if math.isnan(r.ci_low) else f"[{_fmt(r.ci_low, sign=True)}, {_fmt(r.ci_high, sign=True)}]{sig}"
        s = float(r.sparsity)
        mark = f" {OFF_NOMINAL}" if (r.method_label, s) in off_nominal or (reference, s) in off_nominal else ""
        rows.append([_g(s), f"{r.method_label}{mark}", str(int(r.n)), _fmt(r.mean_diff, sign=True), ci])
    return markdown_table(["sparsity", "method", "n", "mean diff", f"{confidence:.0%} CI"], rows, "llrrr")


def _status_rows(df: pd.DataFrame, status: Any | None) -> tuple[list[list[str]], str]:
    """Rows of the failed/missing table and the counts line."""
    rows: list[list[str]] = []
    if status is not None:
        for cell in status.to_rerun:
            try:
                run = cell.run_dir.relative_to(status.sweep_dir).as_posix()
            except ValueError:
                run = str(cell.run_dir)
            err = (cell.error or "").splitlines()[0][:160] if cell.error else ""
            rows.append([cell.status, run, f"`{cell.command_args()}`", err])
        c = status.counts()
        expected = f" of {status.grid_size} expected" if status.grid_size is not None else ""
        counts = (f"{c['completed']} completed, {c['failed']} failed, "
                  f"{c['running'] + c.get('interrupted', 0)} running or killed, "
                  f"{c['missing']} missing{expected}")
    else:
        for r in df[df["status"] != "completed"].itertuples():
            rows.append([r.status, str(r.run), f"`{r.overrides} seed={r.seed}`", r.error or ""])
        counts = ", ".join(f"{int((df['status'] == s).sum())} {s}" for s in ("completed", "failed", "running"))
    return rows, counts


def _select(df: pd.DataFrame, key: Mapping[str, Any]) -> pd.DataFrame:
    mask = pd.Series(True, index=df.index)
    for col, val in key.items():
        mask &= (df[col] == val) | (df[col].isna() & pd.isna(val))
    return df[mask]


def render_markdown(df: pd.DataFrame, metric: str = DEFAULT_METRIC, reference: str = DEFAULT_REFERENCE,
                    status: Any | None = None, plots: Sequence[str] = (), title: str | None = None,
                    confidence: float = 0.95) -> str:
    """The whole table.md: counts, one comparison table per setting with its paired differences,
    the failed/missing runs and the plots."""
    summary = summarize(df, metric)
    dense = dense_baseline(df, metric)
    paired = paired_differences(df, metric, reference, confidence)
    done = _completed(df, metric)
    sweeps = sorted({str(s) for s in df["sweep"].dropna()}) if not df.empty else []
    title = title or (", ".join(sweeps) if sweeps else (status.sweep_dir.name if status is not None else "sweep"))
    status_rows, counts = _status_rows(df, status)
    lower = "lowest" if lower_is_better(metric) else "highest"
    out = [
        f"# Sweep report: {title}",
        "",
        f"Runs: {counts}.",
        "",
        f"Metric `{metric}`: mean ± std over seeds (n = seeds); **bold** = {lower} mean per row; "
        f"dense = the unpruned model of the same runs.",
    ]
    if summary.empty:
        out += ["", "No completed runs yet."]
    for key, grp in summary.groupby(SETTING_COLS + ["noise_level"], dropna=False, sort=True):
        k = dict(zip(SETTING_COLS + ["noise_level"], key))
        runs, dense_k = _select(done, k), _select(dense, k)
        off = off_nominal_cells(runs)
        out += ["", f"## {_setting_title(k)}", "", comparison_table(grp, dense_k, metric, reference, off)]
        short = below_target_note(off)
        if short:
            out += ["", short]
        published = published_table(grp, dense_k, k, metric, runs=runs)
        if published:
            out += ["", published]
        sub = _select(paired, k)
        if not sub.empty:
            out += ["", f"Paired differences vs `{reference}` (same cell and seed: shared calibration "
                        f"data and noise draws); {confidence:.0%} CI over seeds (t), * = excludes 0:",
                    "", paired_table(sub, confidence, off, reference)]
        elif len(set(grp["method_label"])) > 1:
            out += ["", f"(no paired differences: reference method `{reference}` has no runs here)"]
    if status_rows:
        out += ["", "## Failed and missing runs", "",
                markdown_table(["status", "run", "overrides", "error"], status_rows, "llll")]
        if status is not None and status.relaunch:
            out += ["", "Relaunch the sweep (completed cells are skipped, failed ones resumed):", "",
                    f"```bash\n{status.relaunch}\n```"]
    if status is not None and status.grid_error:
        out += ["", f"Missing cells unknown: {status.grid_error}."]
    if plots:
        out += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------- plots

def _slug(parts: Iterable[Any], limit: int = 120) -> str:
    """A file-name-safe suffix; past `limit` characters it ends with a hash of the whole key, so two
    groups that differ only late in a long key (e.g. a `model.prunable` variant) never share a file."""
    text = "_".join(str(p) for p in parts if p not in (None, ""))
    slug = re.sub(r"[^A-Za-z0-9.=,+-]+", "_", text).strip("_")
    if len(slug) <= limit:
        return slug
    return slug[: limit - 11] + "-" + hashlib.sha1(text.encode()).hexdigest()[:10]


def _plot_groups(done: pd.DataFrame) -> list[tuple[str, dict[str, Any], pd.DataFrame]]:
    groups = list(done.groupby(PLOT_GROUP_COLS, dropna=False, sort=True))
    out = []
    for key, grp in groups:
        k = dict(zip(PLOT_GROUP_COLS, key))
        suffix = "" if len(groups) == 1 else "_" + _slug(key)
        out.append((suffix, k, grp))
    return out


# human axis labels of the record's metric names (others: underscores become spaces)
METRIC_LABELS = {
    "final_acc": "test accuracy",
    "pruned_acc": "test accuracy after pruning (before fine-tuning)",
    "finetuned_acc": "test accuracy after fine-tuning",
    "dense_acc": "dense test accuracy",
    "final_loss": "test loss",
    "pruned_loss": "test loss after pruning (before fine-tuning)",
    "finetuned_loss": "test loss after fine-tuning",
    "dense_loss": "dense test loss",
    "sparsity": "sparsity",
    "sparsity_prunable": "achieved sparsity (prunable tensors)",
}
PLOT_DPI = 300   # PNG for drafts and slides; the PDF next to it is vector
SPARSITY_FIGURE_COLS = ["model", "dataset", "schedule", "variant"]  # noise settings become panels


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


def _n_label(ns: Iterable[Any]) -> str:
    """`n=5`, or `n=3-5` when the number of seeds differs between points."""
    vals = sorted({int(n) for n in ns if n == n})
    if not vals:
        return "n=0"
    return f"n={vals[0]}" if len(vals) == 1 else f"n={vals[0]}-{vals[-1]}"


def kept(sparsity: Any) -> Any:
    """The x coordinate of the sparsity plots: the fraction of weights kept, 1 - sparsity."""
    return 1.0 - sparsity


def sparsity_axis(ax: Any, sparsities: Iterable[float]) -> None:
    """Log scale on the kept fraction 1 - s, reversed so sparsity grows to the right, ticks at the
    swept sparsities labelled by sparsity: 0.9, 0.95, 0.98 and 0.99 are evenly spread instead of
    crowded at the right edge of a linear axis, where methods differ most."""
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

    ticks = sorted({round(float(s), 10) for s in sparsities if 0.0 <= float(s) < 1.0})
    if ticks:  # limits first (reversed: the larger kept fraction on the left), then the log scale
        ax.set_xlim(kept(ticks[0]) * 1.25, kept(ticks[-1]) / 1.25)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator([kept(s) for s in ticks]))
    ax.xaxis.set_major_formatter(FixedFormatter([_g(s) for s in ticks]))
    ax.xaxis.set_minor_locator(NullLocator())
    if len(ticks) > 6:
        ax.tick_params(axis="x", labelrotation=45)
    if not ax.xaxis_inverted():
        ax.invert_xaxis()
    ax.set_xlabel("sparsity (log scale of the fraction kept)")


def _band(ax: Any, x: Sequence[float], mean: pd.Series, std: pd.Series, label: str, color: Any) -> None:
    ax.plot(x, mean, marker="o", label=label, color=color)
    s = std.fillna(0.0)
    ax.fill_between(x, mean - s, mean + s, alpha=0.2, color=color)


def _save(fig: Any, out_dir: str | Path, stem: str) -> list[Path]:
    """PNG at PLOT_DPI and a PDF of the same figure; returns [png, pdf]."""
    png, pdf = Path(out_dir) / f"{stem}.png", Path(out_dir) / f"{stem}.pdf"
    fig.savefig(png, dpi=PLOT_DPI)
    fig.savefig(pdf)
    return [png, pdf]


def _figure_groups(frame: pd.DataFrame) -> list[tuple[str, dict[str, Any], pd.DataFrame, list[tuple]]]:
    """One figure per (model, dataset, schedule, variant): its file suffix, key, rows and panels,
    one panel per noise setting (kind, label, level), noise-free first."""
    groups = list(frame.groupby(SPARSITY_FIGURE_COLS, dropna=False, sort=True))
    out = []
    for key, grp in groups:
        suffix = "" if len(groups) == 1 else "_" + _slug(key)
        panels = grp.drop_duplicates(["noise", "noise_label", "noise_level"])
        panels = panels.assign(_clean=panels["noise"] != "none").sort_values(
            ["_clean", "noise", "noise_level", "noise_label"])
        out.append((suffix, dict(zip(SPARSITY_FIGURE_COLS, key)), grp,
                    list(zip(panels["noise"], panels["noise_label"], panels["noise_level"]))))
    return out


def _panel_axes(fig: Any, n: int) -> list[Any]:
    cols = min(n, 3)
    rows = -(-n // cols)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes[:n]


def _panel(grp: pd.DataFrame, panel: tuple) -> pd.DataFrame:
    kind, label, level = panel
    same_level = (grp["noise_level"] == level) | (grp["noise_level"].isna() & pd.isna(level))
    return grp[(grp["noise"] == kind) & (grp["noise_label"] == label) & same_level]


def _suptitle(fig: Any, key: Mapping[str, Any], extra: str = "") -> None:
    import textwrap

    title = f"{key['model']} / {key['dataset']} ({key['schedule']}) {key['variant'] or ''}".strip()
    # wrapped: a long variant (e.g. a checkpoint path) would run off both sides of the figure
    width = max(40, int(fig.get_figwidth() * 12))
    fig.suptitle("\n".join(textwrap.wrap(f"{title}{extra}", width, break_on_hyphens=False)), fontsize=10)


def _panel_figure(panels: Sequence[tuple], sparsities: pd.Series, key: Mapping[str, Any], ylabel: str,
                  draw: Any, extra_title: str = "") -> Any:
    """One Figure with a panel per noise setting: `draw(ax, panel)` plots a panel's lines, then each
    panel gets the sparsity axis, its noise title, a grid and a legend; the left column `ylabel`."""
    from matplotlib.figure import Figure

    cols = min(len(panels), 3)
    fig = Figure(figsize=(4.2 * cols, 3.4 * -(-len(panels) // cols)), layout="constrained")
    for ax, panel in zip(_panel_axes(fig, len(panels)), panels):
        draw(ax, panel)
        sparsity_axis(ax, sparsities)
        ax.set_title(f"noise: {panel[1]}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in fig.axes[::cols]:
        ax.set_ylabel(ylabel)
    _suptitle(fig, key, extra_title)
    return fig


def sparsity_figures(df: pd.DataFrame, metric: str = DEFAULT_METRIC,
                     reference: str = DEFAULT_REFERENCE) -> list[tuple[str, Any]]:
    """(file suffix, matplotlib Figure) per (model, dataset, schedule, variant): metric vs sparsity,
    one line per method with a ±std band over seeds and its number of seeds in the legend, one
    panel per noise setting, the dense baseline dashed; x = `sparsity_axis`."""
    done = _completed(df, metric).dropna(subset=[metric])
    dm = dense_metric(metric)
    out = []
    for suffix, key, grp, panels in _figure_groups(done):
        methods = _method_order(grp["method_label"], reference)

        def draw(ax: Any, panel: tuple, grp: pd.DataFrame = grp, methods: list[str] = methods) -> None:
            sub = _panel(grp, panel)
            for i, m in enumerate(methods):
                agg = sub[sub["method_label"] == m].groupby("sparsity")[metric].agg(["mean", "std", "count"])
                if not agg.empty:
                    _band(ax, kept(agg.index.to_numpy(dtype=float)), agg["mean"], agg["std"],
                          f"{m} ({_n_label(agg['count'])})", f"C{i}")
            if dm and dm in sub.columns and sub[dm].notna().any():
                ax.axhline(float(pd.to_numeric(sub[dm]).mean()), ls="--", color="k", lw=1, label="dense")

        out.append((suffix, _panel_figure(panels, grp["sparsity"], key, metric_label(metric), draw)))
    return out


def plot_acc_vs_sparsity(df: pd.DataFrame, out_dir: str | Path, metric: str = DEFAULT_METRIC,
                         reference: str = DEFAULT_REFERENCE) -> list[Path]:
    """`sparsity_figures` as acc_vs_sparsity[_<model_dataset_schedule>].png (300 dpi) and .pdf."""
    paths = []
    for suffix, fig in sparsity_figures(df, metric, reference):
        paths += _save(fig, out_dir, f"acc_vs_sparsity{suffix}")
    return paths


def paired_figures(df: pd.DataFrame, metric: str = DEFAULT_METRIC, reference: str = DEFAULT_REFERENCE,
                   confidence: float = 0.95) -> list[tuple[str, Any]]:
    """(file suffix, Figure) of the paired differences metric(method) - metric(reference) (same cell
    and seed, `paired_differences`) vs sparsity: mean with its t-interval as error bars (none with
    one seed), a zero line, the same x axis and panels as `sparsity_figures`."""
    paired = paired_differences(df, metric, reference, confidence) if not df.empty else pd.DataFrame()
    if paired.empty:
        return []
    paired = paired.assign(noise_level=pd.to_numeric(paired["noise_level"], errors="coerce"))
    methods = _method_order(list(paired["method_label"]) + [reference], reference)[1:]
    out = []
    for suffix, key, grp, panels in _figure_groups(paired):

        def draw(ax: Any, panel: tuple, grp: pd.DataFrame = grp) -> None:
            sub = _panel(grp, panel)
            ax.axhline(0.0, color="k", lw=1)
            for i, m in enumerate(methods, start=1):  # colours as in sparsity_figures (C0 = reference)
                rows = sub[sub["method_label"] == m].sort_values("sparsity")
                if rows.empty:
                    continue
                x = kept(rows["sparsity"].to_numpy(dtype=float))
                err = [(rows["mean_diff"] - rows["ci_low"]).fillna(0.0),
                       (rows["ci_high"] - rows["mean_diff"]).fillna(0.0)]
                ax.errorbar(x, rows["mean_diff"], yerr=err, marker="o", capsize=3, color=f"C{i}",
                            label=f"{m} ({_n_label(rows['n'])})")

        fig = _panel_figure(panels, grp["sparsity"], key, f"{metric_label(metric)}: method - {reference}", draw,
                            f", paired differences ({confidence:.0%} CI over seeds)")
        out.append((suffix, fig))
    return out


def plot_paired_vs_sparsity(df: pd.DataFrame, out_dir: str | Path, metric: str = DEFAULT_METRIC,
                            reference: str = DEFAULT_REFERENCE) -> list[Path]:
    """`paired_figures` as paired_vs_sparsity[_<suffix>].png (300 dpi) and .pdf."""
    paths = []
    for suffix, fig in paired_figures(df, metric, reference):
        paths += _save(fig, out_dir, f"paired_vs_sparsity{suffix}")
    return paths


def other_noise_params(kind: Any, label: Any) -> str:
    """The parameters of a noise label but its level (the x axis of acc_vs_noise), e.g.
    gradient(fraction=0.25,kappa=1) -> "fraction=0.25"; "" when there are none."""
    from pruning.registry import NOISE

    spec, m = NOISE.get(str(kind)), re.fullmatch(r"[^(]*\((.*)\)", str(label))
    if spec is None or m is None:
        return ""
    params = re.split(r",(?![^\[]*\])", m.group(1))  # not inside a list value, e.g. t_inference=[0,3600]
    return ",".join(p for p in params if "=" in p and p.split("=", 1)[0] != spec.level)


def plot_acc_vs_noise(df: pd.DataFrame, out_dir: str | Path, metric: str = DEFAULT_METRIC,
                      sparsity: float | None = None, reference: str = DEFAULT_REFERENCE) -> list[Path]:
    """metric vs noise level at one sparsity (default: the highest of each group), one line per
    method and setting of the other noise parameters (a kappa x fraction grid: one line per
    fraction; never averaged together), with a ±std band over seeds and its number of seeds in the
    legend; only for groups whose noise level varies. PNG (300 dpi) and PDF."""
    from matplotlib.figure import Figure

    from pruning.registry import NOISE

    done = _completed(df, metric).dropna(subset=[metric])
    paths = []
    dm = dense_metric(metric)
    for suffix, key, grp in _plot_groups(done):
        if grp["noise_level"].nunique() < 2:
            continue
        s = float(grp["sparsity"].max()) if sparsity is None else float(sparsity)
        sub = grp[(grp["sparsity"] - s).abs() < 1e-9]
        if sub.empty:
            continue
        sub = sub.assign(_other=[other_noise_params(k, lb) for k, lb in zip(sub["noise"], sub["noise_label"])])
        others = sorted(set(sub["_other"]))
        fig = Figure(figsize=(5, 3.6), layout="constrained")
        ax = fig.subplots()
        lines = [(m, o) for m in _method_order(sub["method_label"], reference) for o in others]
        for i, (m, o) in enumerate(lines):
            rows = sub[(sub["method_label"] == m) & (sub["_other"] == o)]
            if rows.empty:
                continue
            agg = rows.groupby("noise_level")[metric].agg(["mean", "std", "count"])
            name = f"{m} {o}" if len(others) > 1 else m
            _band(ax, agg.index.to_list(), agg["mean"], agg["std"], f"{name} ({_n_label(agg['count'])})", f"C{i % 10}")
        if dm and dm in sub.columns and sub[dm].notna().any():
            ax.axhline(float(pd.to_numeric(sub[dm]).mean()), ls="--", color="k", lw=1, label="dense")
        spec = NOISE.get(str(key["noise"]))
        level = spec.level if spec is not None else None
        ax.set_xlabel(f"noise level ({key['noise']}{f': {level}' if level else ''})")
        ax.set_ylabel(metric_label(metric))
        ax.set_title(f"{key['model']} / {key['dataset']} at sparsity {_g(s)}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths += _save(fig, out_dir, f"acc_vs_noise{suffix}")
    return paths


# ------------------------------------------------------------------ report

@dataclass
class Report:
    out_dir: Path
    frame: pd.DataFrame
    summary: pd.DataFrame
    paired: pd.DataFrame
    markdown: str
    status: Any | None = None
    files: list[Path] = field(default_factory=list)


def build_report(df: pd.DataFrame, out_dir: str | Path, metric: str = DEFAULT_METRIC,
                 reference: str = DEFAULT_REFERENCE, status: Any | None = None, plots: bool = True,
                 at_sparsity: float | None = None, title: str | None = None,
                 base_dir: str | Path | None = None) -> Report:
    """Write results.csv, summary.csv, paired.csv, table.md, missing.txt and the plots to out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not df.empty:
        _completed(df, metric)  # a clear error for an unknown metric
    files = []
    df.to_csv(out_dir / "results.csv", index=False)
    summary = summarize(df, metric) if not df.empty else pd.DataFrame()
    paired = paired_differences(df, metric, reference) if not df.empty else pd.DataFrame()
    summary.to_csv(out_dir / "summary.csv", index=False)
    paired.to_csv(out_dir / "paired.csv", index=False)
    files += [out_dir / "results.csv", out_dir / "summary.csv", out_dir / "paired.csv"]
    plot_files: list[Path] = []
    if plots and not df.empty and (df["status"] == "completed").any():
        plot_files = plot_acc_vs_sparsity(df, out_dir, metric, reference)
        plot_files += plot_paired_vs_sparsity(df, out_dir, metric, reference)
        plot_files += plot_acc_vs_noise(df, out_dir, metric, at_sparsity, reference)
    files += plot_files
    pngs = [p for p in plot_files if p.suffix == ".png"]  # table.md shows the PNGs; the PDFs sit next to them
    md = render_markdown(df, metric, reference, status, [p.name for p in pngs], title)
    (out_dir / "table.md").write_text(md)
    files.append(out_dir / "table.md")
    if status is not None:
        (out_dir / "missing.txt").write_text(status.missing_text())
        files.append(out_dir / "missing.txt")
    return Report(out_dir, df, summary, paired, md, status, files)


def report_sweep(sweep_dir: str | Path, out_dir: str | Path | None = None, metric: str = DEFAULT_METRIC,
                 reference: str = DEFAULT_REFERENCE, plots: bool = True,
                 at_sparsity: float | None = None) -> Report:
    """Local report of a sweep directory (written to <sweep_dir>/report by default)."""
    from pruning.sweep import sweep_status

    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist "
                                f"(sweeps are written to outputs/sweeps/<sweep_name>)")
    status = sweep_status(sweep_dir)
    df = load_local(sweep_dir)
    return build_report(df, out_dir or sweep_dir / "report", metric, reference, status, plots, at_sparsity)


def _wandb_defaults(sweep_dir: Path | None) -> dict[str, Any]:
    """project/entity from a run's resolved config when it logged to W&B."""
    if sweep_dir is None:
        return {}
    for path in sorted(sweep_dir.glob("**/config.resolved.json"))[:1]:
        cfg = read_json(path) or {}
        logger = cfg.get("logger") or {}
        if logger.get("name") == "wandb":
            return {"project": logger.get("project"), "entity": logger.get("entity")}
    return {}


def wandb_mode(mode: str | None = None) -> str:
    """`--wandb-mode`, else $WANDB_MODE, else offline: the same default as `logger=wandb`."""
    return mode or os.environ.get("WANDB_MODE") or "offline"


def _offline_dir(out_dir: Path, run_id: str) -> Path | None:
    """The newest offline run folder of `run_id` under `<out_dir>/wandb`."""
    found = sorted((Path(out_dir) / "wandb").glob(f"offline-run-*-{run_id}"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def upload_to_wandb(report: Report, group: str, project: str | None = None, entity: str | None = None,
                    mode: str | None = None) -> str:
    """Log the tables and plots to a run with job_type="report" in the sweep's group (one fixed id
    per project and group, so a new report replaces the previous one's tables). Returns the run id."""
    import wandb

    project = project or os.environ.get("WANDB_PROJECT") or "pruning-noise"
    mode = wandb_mode(mode)
    run_id = "report-" + hashlib.sha1(f"{entity}/{project}/{group}".encode()).hexdigest()[:12]

    def table(df: pd.DataFrame) -> Any:
        clean = df.astype(object).where(df.notna(), None)
        return wandb.Table(columns=[str(c) for c in clean.columns], data=clean.values.tolist(),
                           allow_mixed_types=True)

    run = wandb.init(project=project, entity=entity, id=run_id, resume="allow", group=group,
                     job_type="report", name=f"report-{group}", dir=str(report.out_dir), mode=mode,
                     reinit="create_new", config={"sweep": group, "kind": "report"})
    try:
        data: dict[str, Any] = {"runs": table(report.frame), "summary": table(report.summary),
                                "paired": table(report.paired)}
        for png in report.files:
            if png.suffix == ".png":
                data[f"plots/{png.stem}"] = wandb.Image(str(png))
        run.log(data)
        art = wandb.Artifact(re.sub(r"[^A-Za-z0-9._-]", "_", f"report-{group}"), type="report")
        for f in report.files:
            art.add_file(str(f))
        run.log_artifact(art)
    finally:
        run.finish()
    return run_id


# --------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pruning-report",
        description="Aggregate the runs of a sweep into CSV, Markdown comparison tables and plots.",
        epilog="examples:\n  pruning-report outputs/sweeps/study1\n"
               "  pruning-report outputs/sweeps/study1 --metric pruned_acc --reference magnitude\n"
               "  pruning-report --from-wandb me/pruning-noise --group study1 --out report-study1\n"
               "  pruning-report outputs/sweeps/study1 --to-wandb",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", nargs="?", type=Path, help="sweep directory (outputs/sweeps/<sweep_name>)")
    p.add_argument("--metric", default=DEFAULT_METRIC, help="metric of the tables (default: final_acc)")
    p.add_argument("--reference", default=DEFAULT_REFERENCE,
                   help="method label the paired differences are taken against (default: magnitude)")
    p.add_argument("--out", type=Path, help="output directory (default: <sweep_dir>/report)")
    p.add_argument("--at-sparsity", type=float, help="sparsity of the accuracy-vs-noise plot (default: highest)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--from-wandb", metavar="ENTITY/PROJECT", help="read the runs from the W&B API instead")
    p.add_argument("--group", help="W&B group (= sweep name) for --from-wandb / --to-wandb")
    p.add_argument("--to-wandb", action="store_true", help="upload tables and plots to a job_type=report run")
    p.add_argument("--wandb-project", help="project for --to-wandb (default: the runs' logger.project)")
    p.add_argument("--wandb-entity", help="entity for --to-wandb")
    p.add_argument("--wandb-mode", choices=("online", "offline"),
                   help="mode for --to-wandb (default: $WANDB_MODE, else offline, as logger=wandb)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry (`python -m pruning.report`, `pruning-report`). Returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.from_wandb:
            if not args.group:
                raise ValueError("--from-wandb needs --group SWEEP (the sweep name = the W&B group)")
            out = args.out or (args.sweep_dir / "report" if args.sweep_dir else Path(f"report-{args.group}"))
            status = None
            if args.sweep_dir is not None and args.sweep_dir.is_dir():
                from pruning.sweep import sweep_status

                status = sweep_status(args.sweep_dir)
            df = load_wandb(args.from_wandb, args.group)
            report = build_report(df, out, args.metric, args.reference, status, not args.no_plots,
                                  args.at_sparsity, title=args.group)
            group = args.group
        else:
            if args.sweep_dir is None:
                raise ValueError("give a SWEEP_DIR (outputs/sweeps/<sweep_name>) or --from-wandb ENTITY/PROJECT")
            report = report_sweep(args.sweep_dir, args.out, args.metric, args.reference, not args.no_plots,
                                  args.at_sparsity)
            sweeps = sorted({str(s) for s in report.frame["sweep"].dropna()})
            group = args.group or (sweeps[0] if len(sweeps) == 1 else args.sweep_dir.name)
        if report.status is not None:
            print(report.status.summary())
        print(f"report: {report.out_dir / 'table.md'} ({len(report.frame)} runs)")
        if args.to_wandb:
            defaults = {} if args.from_wandb else _wandb_defaults(args.sweep_dir)
            project = args.wandb_project or (args.from_wandb.split("/", 1)[-1] if args.from_wandb
                                             else defaults.get("project"))
            entity = args.wandb_entity or (args.from_wandb.split("/", 1)[0] if args.from_wandb
                                           and "/" in args.from_wandb else defaults.get("entity"))
            mode = wandb_mode(args.wandb_mode)
            run_id = upload_to_wandb(report, group, project, entity, mode)
            where = _offline_dir(report.out_dir, run_id) if mode in ("offline", "dryrun") else None
            if mode in ("online", "run"):
                print(f"uploaded to W&B run {run_id} (group {group}, job_type report)")
            elif where is not None:
                print(f"written offline to {where} (W&B run {run_id}, group {group}, job_type report; "
                      f"nothing uploaded): upload with `wandb sync {where}`")
            else:
                print(f"nothing uploaded to W&B (mode {mode})")
    except (FileNotFoundError, KeyError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["PairedCI", "Report", "build_report", "flatten_record", "load_local", "load_wandb", "main",
           "paired_ci", "paired_differences", "render_markdown", "report_sweep", "rows_from_wandb",
           "summarize", "upload_to_wandb"]
