"""The comparison table's formats and its mean ± std, on groups written here."""

from __future__ import annotations

import csv
import io

import pytest

from rsray.compare import COLUMNS, Group, figures, table


def group(name: str, *mrs: float) -> Group:
    """A group whose every column holds `mrs` plus the column's index (so columns differ)."""
    values = {key: [mr + i for mr in mrs] for i, (key, _) in enumerate(COLUMNS)}
    return Group(name, [f"{name}-{i}" for i in range(len(mrs))], values)


GROUPS = [group("swan", 30.0), group("prior_clip", 40.0, 42.0, 44.0)]


def test_markdown_shows_mean_and_sample_std_where_there_are_repeats():
    lines = table(GROUPS, "md").splitlines()
    assert lines[0] == "| model | runs | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | mR | mR+SMR |"
    assert lines[2] == "| swan | 1 | 30.00 | 31.00 | 32.00 | 33.00 | 34.00 | 35.00 | 36.00 | 37.00 |"
    # 40, 42, 44: mean 42, sample std 2
    assert lines[3].startswith("| prior_clip | 3 | 42.00 ± 2.00 | 43.00 ± 2.00 |")
    assert lines[3].endswith("| 49.00 ± 2.00 |")


def test_csv_has_a_mean_and_a_std_column_per_number():
    rows = list(csv.reader(io.StringIO(table(GROUPS, "csv"))))
    assert rows[0][:5] == ["group", "runs", "i2t R@1", "i2t R@1 std", "i2t R@5"]
    assert rows[2][:4] == ["prior_clip", "3", "42.0000", "2.0000"]
    assert rows[1][-2:] == ["37.0000", "0.0000"] and len(rows[1]) == 2 + 2 * len(COLUMNS)


def test_latex_is_a_booktabs_tabular_with_escaped_names():
    tex = table(GROUPS, "latex")
    assert tex.startswith("\\begin{tabular}{lrrrrrrrrr}\n\\toprule\nModel & Runs & i2t R@1")
    assert "prior\\_clip & 3 & 42.00 $\\pm$ 2.00 & " in tex and tex.rstrip().endswith("\\end{tabular}")
    with pytest.raises(ValueError, match="--format must be one of md, csv, latex"):
        table(GROUPS, "html")


def test_a_missing_number_is_a_dash_and_figures_are_drawn():
    partial = Group("vsepp", ["r"], {"test/mR": [25.0]})
    assert table([partial], "md").splitlines()[2] == "| vsepp | 1 | - | - | - | - | - | - | 25.00 | - |"
    drawn = figures(GROUPS)
    assert set(drawn) == {"compare_mR.png", "compare_recall.png"}
    bars = drawn["compare_mR.png"].axes[0]
    heights = sorted(round(patch.get_height(), 6) for patch in bars.patches)
    assert heights == [36.0, 37.0, 48.0, 49.0]  # mR and mR+SMR of each group
