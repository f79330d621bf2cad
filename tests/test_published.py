"""Published numbers beside ours in the report (issue 13): the lookup, the arithmetic of the
side-by-side table, and that noisy or unmatched settings get no published column."""

from __future__ import annotations

import pytest

from pruning.published import TABLES, find_table
from pruning.report import render_markdown, to_frame


def _row(method: str, sparsity: float, seed: int, acc: float, dense: float = 0.94, noise: str = "none",
         model: str = "mlpnet", variant: str = "") -> dict:
    return {"sweep": "t", "model": model, "dataset": "mnist", "method": method, "method_label": method,
            "schedule": "oneshot", "noise": noise, "noise_level": 0.0 if noise == "none" else 1.0,
            "noise_label": noise if noise == "none" else f"{noise}(1)", "variant": variant,
            "sparsity": sparsity, "seed": seed, "status": "completed", "final_acc": acc, "dense_acc": dense,
            "run": f"{method}-{sparsity}-{seed}", "overrides": ""}


def test_tables_are_complete_and_in_percent():
    for table in TABLES:
        assert table.tag in ("verified", "RECALL")
        assert 0 < table.dense <= 100
        for method, cells in table.acc.items():
            assert cells, method
            assert all(0 <= v <= 100 and 0 <= s < 1 for s, v in cells.items())
    cbs = find_table("mlpnet", "mnist", "oneshot")
    assert cbs is not None and cbs.value("cbs", 0.98) == 55.45 and cbs.value("woodfisher", 0.9) == 91.69
    assert cbs.value("lr", 0.9) is None  # CHITA on MLPNet is not published
    assert find_table("mlpnet", "mnist", "gradual") is None
    assert find_table("mlp", "digits", "oneshot") is None


def test_report_puts_published_beside_ours():
    rows = [_row("magnitude", 0.9, s, a) for s, a in enumerate((0.90, 0.91))]
    rows += [_row("cbs", 0.98, 0, 0.5)]
    md = render_markdown(to_frame(rows))
    assert "Published (verified): CBS" in md
    # magnitude at 0.9: ours mean 90.50 (std 0.71, n=2) vs published 90.30 -> +0.20
    assert "| 0.9 | magnitude | 90.50 ± 0.71 (n=2) | 90.30 | +0.20 |" in md
    assert "| 0.98 | cbs | 50.00 (n=1) | 55.45 | -5.45 |" in md
    assert "| dense | – | 94.00 | 93.97 | +0.03 |" in md


@pytest.mark.parametrize("kw", [{"noise": "gradient"}, {"model": "mlp"}, {"variant": "finetune=bn"},
                                {"variant": "finetune=short model.prunable=x"}])
def test_no_published_column_for_noisy_or_unpublished_settings(kw):
    md = render_markdown(to_frame([_row("magnitude", 0.9, 0, 0.9, **kw)]))
    assert "Published (" not in md


def test_the_records_decide_whether_the_pruned_model_was_repaired():
    """A repair set in a study's base config (no finetune override in the variant) hides the
    published column; finetune.epochs=0 (no finetuned_acc) keeps it; pruned_acc, measured before
    the finetune stage, is comparable either way."""
    base = [{**_row("magnitude", 0.9, 0, 0.95), "pruned_acc": 0.9, "finetuned_acc": 0.95}]
    assert "Published (" not in render_markdown(to_frame(base))
    md = render_markdown(to_frame(base), metric="pruned_acc")
    assert "| 0.9 | magnitude | 90.00 (n=1) | 90.30 | -0.30 |" in md
    off = [{**_row("magnitude", 0.9, 0, 0.9, variant="finetune.epochs=0"), "finetuned_acc": None}]
    assert "Published (verified)" in render_markdown(to_frame(off))
    # one setting repaired, the other not: each decides on its own runs
    both = [{**_row("magnitude", 0.9, 0, 0.9, variant="finetune=none"), "finetuned_acc": None},
            {**_row("magnitude", 0.9, 0, 0.95, variant="finetune=bn"), "finetuned_acc": 0.95}]
    md = render_markdown(to_frame(both))
    assert md.count("Published (verified)") == 1 and "| 0.9 | magnitude | 90.00 (n=1) | 90.30 |" in md


def test_gain_over_magnitude_beside_the_published_gain():
    """ours - magnitude (same runs) beside published cbs - published magnitude: 55.45 - 32.25."""
    rows = [_row("magnitude", 0.98, s, 0.30) for s in range(2)]
    rows += [_row("cbs", 0.98, s, a) for s, a in enumerate((0.50, 0.52))]
    md = render_markdown(to_frame(rows))
    assert "| 0.98 | cbs | 51.00 ± 1.41 (n=2) | 55.45 | -4.45 | +21.00 / +23.20 |" in md
    assert "| 0.98 | magnitude | 30.00 ± 0.00 (n=2) | 32.25 | -2.25 | – |" in md


def test_a_variant_without_repair_keeps_the_published_column():
    for variant in ("finetune=none", "model.prunable=x finetune=none"):
        md = render_markdown(to_frame([_row("magnitude", 0.9, 0, 0.9, variant=variant)]))
        assert "Published (verified)" in md, variant


def test_a_setting_that_changes_the_study_carries_a_caveat():
    md = render_markdown(to_frame([_row("magnitude", 0.9, 0, 0.9, variant="calibration.num_samples=1000")]))
    assert "Caveat: these runs change the study's settings (`calibration.num_samples=1000`)" in md
    assert "Caveat" not in render_markdown(to_frame([_row("magnitude", 0.9, 0, 0.9)]))
