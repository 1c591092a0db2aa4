"""The sweep's figure: the metric against each swept value, one panel per key."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rsray.sweep.spec import Param

if TYPE_CHECKING:
    from rsray.sweep.summary import TrialSummary


def metric_vs_params(
    trials: Sequence[TrialSummary], params: Sequence[Param], metric: str, best: TrialSummary | None = None
):
    """One panel per swept key: each trial's best metric against its value (log axis for
    loguniform keys, categories for non-numeric ones); early-stopped trials hollow, the best
    trial starred."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * max(1, len(params)), 3.6), layout="constrained")
    axes = fig.subplots(1, max(1, len(params)), squeeze=False)[0]
    for ax, param in zip(axes, params, strict=False):  # one empty axis when nothing was swept
        values = [t.params.get(param.key) for t in trials]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values if v is not None)
        if numeric:
            position = {v: v for v in values}
        else:
            labels = list(dict.fromkeys(str(v) for v in values))
            position = {v: labels.index(str(v)) for v in values}
            ax.set_xticks(range(len(labels)), labels)
        for status, face, label in (
            ("finished", "C0", "finished"),
            ("early_stopped", "none", "stopped early (ASHA)"),
            ("error", "none", "failed"),
        ):
            points = [
                (position[t.params.get(param.key)], t.best)
                for t in trials
                if t.status == status and math.isfinite(t.best) and t.params.get(param.key) is not None
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.scatter(
                    xs,
                    ys,
                    marker="o",
                    s=40,
                    facecolors=face,
                    edgecolors="C0" if status != "error" else "C1",
                    label=label,
                )
        if best is not None and best.params.get(param.key) is not None:
            ax.scatter(
                [position[best.params[param.key]]], [best.best], marker="*", s=220, color="C3", zorder=3, label="best"
            )
        if param.kind == "loguniform" or (numeric and param.kind in ("grid", "choice") and _spans_decades(values)):
            ax.set_xscale("log")
        ax.set(xlabel=param.key, ylabel=f"best {metric}", title=param.key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def _spans_decades(values: Sequence[Any]) -> bool:
    positive = [v for v in values if isinstance(v, (int, float)) and v > 0]
    return len(positive) == len(values) and len(positive) > 1 and max(positive) / min(positive) >= 100
