"""The papers' published test numbers, as `rsray compare` shows them beside a user's runs.

Each row is what a paper reports for one model on one dataset (the test split, i2t/t2i R@1/5/10
and mR, in %), keyed by rsray's model name and the prepared data's name (`data.name`, which the
run records from its manifest). The numbers are copied from the project's model notes
(spec/models.md), which cite the papers; a row the paper reports only in part (mR alone) holds
only that. Models with no published row here: DOVE and CMPAGL (the specs record none of their
RSICD/RSITMD numbers), VSE++ (no remote-sensing paper row), the scene prior (not a retrieval model).
"""

from __future__ import annotations

from dataclasses import dataclass

RECALLS = ("i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10")


@dataclass(frozen=True)
class PublishedRow:
    """One paper's numbers for one (model, dataset): `metrics` by rsray's metric names (test/...)."""

    model: str  # rsray's model name (the run's `model` tag)
    dataset: str  # the prepared data's name (the run's `dataset` tag), lower case
    source: str  # where the numbers come from (the row's name in the table)
    metrics: dict[str, float]


def _row(model: str, dataset: str, source: str, recalls: tuple[float, ...], mr: float) -> PublishedRow:
    metrics = {f"test/{name}": value for name, value in zip(RECALLS, recalls, strict=True)}
    return PublishedRow(model, dataset, source, {**metrics, "test/mR": mr})


SWAN = "SWAN, ICMR 2023"
PIR = "PIR, ACM MM 2023 (hard belief)"  # PriorCLIP's closed-domain form, as released
PUBLISHED: tuple[PublishedRow, ...] = (
    _row("swan", "rsicd", SWAN, (7.41, 20.13, 30.86, 5.56, 22.26, 37.41), 20.61),
    _row("swan", "rsitmd", SWAN, (13.35, 32.15, 46.90, 11.24, 40.40, 60.60), 34.11),
    _row("priorclip", "rsicd", PIR, (9.88, 27.26, 39.16, 6.97, 24.56, 38.92), 24.46),
    _row("priorclip", "rsitmd", PIR, (18.14, 41.15, 52.88, 12.17, 41.68, 63.41), 38.24),
    # mR only: the CLIP fine-tunes this baseline stands for (spec/models.md, "CLIP fine-tune")
    PublishedRow("clip", "rsitmd", "RemoteCLIP ViT-B/32", {"test/mR": 49.38}),
    PublishedRow("clip", "rsitmd", "GeoRSCLIP", {"test/mR": 51.81}),
)


def published_rows(model: str, dataset: str) -> list[PublishedRow]:
    """The published rows for `model` on `dataset` (matched case-insensitively), in table order;
    the first is the one a run's difference in mR is taken against."""
    return [row for row in PUBLISHED if row.model == model and row.dataset == dataset.strip().lower()]
