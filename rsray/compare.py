"""The paper-style comparison table, from what MLflow recorded: one row per model (or per any tag's
value), the test split's i2t/t2i R@1/5/10, mR and mR with SMR, as mean ± standard deviation where
a group holds repeated runs (seeds, folds). A row never averages runs trained on different data:
when the runs' datasets differ (the digest of their prepared shards), each row is per model and
dataset, named `<model> on <dataset>` from the manifest's name (with the digest where two datasets
share a name).

The numbers are the runs' own `test/*` and `test_smr/mR` metrics (logged when training ends, or by
`rsray evaluate`): the table is never recomputed, so it says exactly what the runs table says.
Where a paper published numbers for a row's model on its dataset (`rsray.published`), those rows
follow it, named by their source, and each row of runs gets a `Δ mR` column: its mean test mR
minus the first published row's. Formats: Markdown (for a README or an issue), CSV (for a
spreadsheet) and LaTeX (booktabs, for the paper). `figures` draws mR per group with error bars and
the R@K curves.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rsray.published import published_rows

# (metric in the run, column heading)
COLUMNS = (
    ("test/i2t_R1", "i2t R@1"),
    ("test/i2t_R5", "i2t R@5"),
    ("test/i2t_R10", "i2t R@10"),
    ("test/t2i_R1", "t2i R@1"),
    ("test/t2i_R5", "t2i R@5"),
    ("test/t2i_R10", "t2i R@10"),
    ("test/mR", "mR"),
    ("test_smr/mR", "mR+SMR"),
)
FORMATS = ("md", "csv", "latex")
TAG_DIGEST = "dataset_digest"  # the prepared data's digest (rsray.data.verify.data_digest), set by training
# A model with a second retrieval stage (CMPAGL's ITM) gets a row per stage after its own:
# (row suffix, prefix of the stage's numbers, the stage's mR+SMR metric or None)
STAGE_ROWS = ((" +ITM", "test_itm/", "test_itm_smr/mR"), (" +ITM+SMR", "test_itm_smr/", None))


class NothingToCompare(ValueError):
    """No finished run with test numbers matched (one line, names the experiment or run)."""


@dataclass
class Group:
    """The runs of one row and their values per metric (a missing metric is left out)."""

    name: str
    run_ids: list[str] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    source: str = ""  # a published row (no runs): where its numbers come from
    reference: Group | None = None  # the published row this row's difference in mR is taken against

    def delta_mr(self) -> float:
        """Mean test mR minus the published row's (nan without one)."""
        return self.mean("test/mR") - self.reference.mean("test/mR") if self.reference else math.nan

    def runs_cell(self) -> str:
        return "paper" if self.source else str(len(self.run_ids))

    def mean(self, key: str) -> float:
        return statistics.fmean(self.values[key]) if self.values.get(key) else math.nan

    def std(self, key: str) -> float:
        """Sample standard deviation (n - 1); 0 for a single run."""
        values = self.values.get(key, [])
        return statistics.stdev(values) if len(values) > 1 else 0.0

    def cell(self, key: str, digits: int = 2, plus_minus: str = " ± ") -> str:
        if not self.values.get(key):
            return "-"
        text = f"{self.mean(key):.{digits}f}"
        return text + f"{plus_minus}{self.std(key):.{digits}f}" if len(self.values[key]) > 1 else text


def collect(
    client: Any, experiment: str, run_ids: Sequence[str] = (), group_by: str = "model", published: bool = True
) -> list[Group]:
    """Finished runs of `experiment` (or exactly `run_ids`) that carry `test/mR`, grouped by their
    `group_by` tag (the run name when a run lacks it), groups in the order their first run started.
    A study's parent run (`rsray study`) is left out: its members are in the group as repeats.
    A run with a second retrieval stage adds rows `<name> +ITM` and `<name> +ITM+SMR` (`STAGE_ROWS`).
    With `published` and rows by model, the papers' rows for a row's model and dataset follow it."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise NothingToCompare(f"MLflow has no experiment {experiment!r} (tracking.experiment)")
    runs = client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'")
    if run_ids:
        by_id = {run.info.run_id: run for run in runs}
        missing = [run_id for run_id in run_ids if run_id not in by_id]
        if missing:
            raise NothingToCompare(f"run {missing[0]} is not a finished run of experiment {experiment!r}")
        runs = [by_id[run_id] for run_id in run_ids]
    runs = sorted(
        (run for run in runs if "test/mR" in run.data.metrics and run.data.tags.get("rsray.kind") != "study"),
        key=lambda run: run.info.start_time,
    )  # a study's parent holds its members' means: the members are the repeats
    if not runs:
        raise NothingToCompare(f"no finished run of experiment {experiment!r} has test numbers (test/mR)")
    datasets = {run.info.run_id: run_dataset(run) for run in runs}
    several = len({digest for _, digest in datasets.values()}) > 1
    groups: dict[str, Group] = {}
    compared: dict[str, tuple[str, str]] = {}  # row name -> (model, dataset name): its published rows
    for run in runs:
        name = run.data.tags.get(group_by) or run.info.run_name or run.info.run_id
        if several:  # a row never averages runs on different data: each dataset gets its own rows
            name = f"{name} on {dataset_label(datasets[run.info.run_id], datasets.values())}"
        if group_by == "model" and run.data.tags.get("model"):
            compared[name] = (run.data.tags["model"], datasets[run.info.run_id][0])
        metrics = run.data.metrics
        _add(groups, name, run.info.run_id, {key: metrics.get(key) for key, _ in COLUMNS})
        for suffix, prefix, smr_key in STAGE_ROWS:
            if f"{prefix}mR" in metrics:
                stage = {key: metrics.get(key.replace("test/", prefix, 1)) for key, _ in COLUMNS[:-1]}
                stage[COLUMNS[-1][0]] = metrics.get(smr_key) if smr_key else None
                _add(groups, name + suffix, run.info.run_id, stage)
    return with_published_rows(list(groups.values()), compared) if published else list(groups.values())


def with_published_rows(groups: list[Group], compared: dict[str, tuple[str, str]]) -> list[Group]:
    """`groups` with the published rows (`rsray.published`) for each compared row's (model,
    dataset name) after it and its stage rows; the compared row's `reference` is the first."""
    by_name = {group.name: group for group in groups}

    def owner(name: str) -> str | None:  # the compared row that `name` is, or is a stage row of
        stages = {name.removesuffix(suffix) for suffix, _, _ in STAGE_ROWS if name.endswith(suffix)}
        return next((n for n in (name, *stages) if n in compared), None)

    out: list[Group] = []
    for index, group in enumerate(groups):
        out.append(group)
        mine = owner(group.name)
        following = groups[index + 1].name if index + 1 < len(groups) else None
        if mine is None or (following is not None and following != mine and owner(following) == mine):
            continue  # the published rows go after the compared row's last stage row
        published = [
            Group(
                f"{row.source} (published) on {row.dataset}", [], {k: [v] for k, v in row.metrics.items()}, row.source
            )
            for row in published_rows(*compared[mine])
        ]
        by_name[mine].reference = published[0] if published else None
        out += published
    return out


def run_dataset(run: Any) -> tuple[str, str]:
    """(name, digest) of the data a run trained on: its `dataset` and `dataset_digest` tags, or its
    MLflow dataset input (runs from before the digest tag); ("?", "") when it recorded neither."""
    tags = run.data.tags
    if tags.get(TAG_DIGEST):
        return tags.get("dataset") or "?", tags[TAG_DIGEST]
    inputs = getattr(getattr(run, "inputs", None), "dataset_inputs", None) or []
    for item in inputs:
        return item.dataset.name or tags.get("dataset") or "?", item.dataset.digest or ""
    return tags.get("dataset") or "?", ""


def dataset_label(dataset: tuple[str, str], every: Any) -> str:
    """The dataset's name, with its digest's first 8 characters where two datasets share the name."""
    name, digest = dataset
    shared = len({d for n, d in set(every) if n == name}) > 1
    return f"{name} ({digest[:8] or 'no digest'})" if shared else name


def _add(groups: dict[str, Group], name: str, run_id: str, values: dict[str, float | None]) -> None:
    """One run's numbers (by column key; None = not measured) into the row `name`."""
    group = groups.setdefault(name, Group(name))
    group.run_ids.append(run_id)
    for key, value in values.items():
        if value is not None:
            group.values.setdefault(key, []).append(float(value))


def table(groups: Sequence[Group], fmt: str = "md") -> str:
    """The table in `fmt` (md | csv | latex). CSV has mean and std columns (and the run count);
    the others write `mean ± std` where a group has several runs. With published rows among the
    groups, a last column holds each row's difference in mean mR from its published row (CSV: and
    the published rows' source)."""
    headings = [heading for _, heading in COLUMNS]
    with_delta = any(g.source or g.reference for g in groups)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        extra = ["delta mR", "published in"] if with_delta else []
        writer.writerow(["group", "runs", *(h for heading in headings for h in (heading, f"{heading} std")), *extra])
        for g in groups:
            numbers = [f"{x:.4f}" for key, _ in COLUMNS for x in (g.mean(key), g.std(key))]
            extra = [f"{g.delta_mr():.4f}", g.source] if with_delta else []
            writer.writerow([g.name, len(g.run_ids), *numbers, *extra])
        return out.getvalue()
    if fmt == "md":
        delta = ["Δ mR"] if with_delta else []
        lines = [
            "| model | runs | " + " | ".join(headings + delta) + " |",
            "|---|---:|" + "---:|" * len(headings + delta),
        ]
        for g in groups:
            cells = [g.cell(key) for key, _ in COLUMNS] + ([_signed(g.delta_mr())] if with_delta else [])
            lines.append(f"| {g.name} | {g.runs_cell()} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"
    if fmt == "latex":
        escape = str.maketrans({"_": r"\_", "&": r"\&", "%": r"\%", "#": r"\#"})
        delta = [r"$\Delta$ mR"] if with_delta else []
        spec = "l" + "r" * (len(headings + delta) + 1)
        lines = [
            rf"\begin{{tabular}}{{{spec}}}",
            r"\toprule",
            "Model & Runs & " + " & ".join(headings + delta) + r" \\",
            r"\midrule",
        ]
        for g in groups:
            cells = [g.cell(key, plus_minus=r" $\pm$ ") for key, _ in COLUMNS]
            cells += [_signed(g.delta_mr())] if with_delta else []
            lines.append(f"{g.name.translate(escape)} & {g.runs_cell()} & " + " & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"
    raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def _signed(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:+.2f}"


def figures(groups: Sequence[Group]) -> dict[str, Any]:
    """compare_mR.png (mR and mR+SMR per group, error bars = std) and compare_recall.png (R@1/5/10
    per group, image->text and text->image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [g.name for g in groups]
    x = np.arange(len(groups))
    bars, ax = plt.subplots(figsize=(max(4, 1.2 * len(groups) + 2), 3.5))
    for offset, (key, label) in ((-0.2, ("test/mR", "mR")), (0.2, ("test_smr/mR", "mR+SMR"))):
        ax.bar(
            x + offset, [g.mean(key) for g in groups], 0.4, yerr=[g.std(key) for g in groups], label=label, capsize=3
        )
    ax.set_xticks(x, names)
    ax.set_ylabel("test mR (%)")
    ax.legend()
    bars.tight_layout()
    curves, axes = plt.subplots(1, 2, figsize=(8, 3.5), sharey=True)
    for ax, direction in zip(axes, ("i2t", "t2i"), strict=True):
        for g in groups:
            keys = [f"test/{direction}_R{k}" for k in (1, 5, 10)]
            ax.errorbar([1, 5, 10], [g.mean(k) for k in keys], yerr=[g.std(k) for k in keys], marker="o", label=g.name)
        ax.set_title("image -> text" if direction == "i2t" else "text -> image")
        ax.set_xlabel("K")
        ax.set_xticks([1, 5, 10])
    axes[0].set_ylabel("R@K (%)")
    axes[1].legend(fontsize="small")
    curves.tight_layout()
    return {"compare_mR.png": bars, "compare_recall.png": curves}
