"""Repeated runs with spread, the way papers report them: one config trained over several seeds
and/or validation folds, each member a child run of one MLflow parent run that holds the mean and
standard deviation of every test number.

Members are the product of folds and seeds (folds outer). With `study.folds: k`, member fold i is
prepared with `data.validation.mode=folds`, `folds=k`, `fold=i` into its own output
(`<prepare.output>-fold<i>of<k>`; the prepare stage skips an output that is already current), so
each fold validates on a different fifth of train and tests on the same test split. Without folds,
every member trains on `train.data` as it is.

The parent logs `test/<metric>` (the mean over members), `test_std/<metric>` (sample standard
deviation, n - 1) and the same for `test_smr/`, so the runs table shows the study like a single
run, with its spread beside it; `rsray compare` counts the members as repeats and skips the
parent. A study run again finds its parent and members by their tags: finished members are
reused, an interrupted one resumes from its checkpoints (`train.run_name` is the member's).
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rsray.compare import Group

log = logging.getLogger("rsray.study")

STUDY_TAG, MEMBER_TAG, KIND_TAG = "rsray.study", "rsray.study_member", "rsray.kind"
PREFIXES = ("test/", "test_smr/")
REPORTED = (  # (metric, label) in the printed report
    ("i2t_R1", "i2t R@1"),
    ("i2t_R5", "i2t R@5"),
    ("i2t_R10", "i2t R@10"),
    ("t2i_R1", "t2i R@1"),
    ("t2i_R5", "t2i R@5"),
    ("t2i_R10", "t2i R@10"),
    ("mR", "mR"),
)


@dataclass
class Member:
    """One training of the study: its seed, its fold (None: the data's own validation), its config."""

    seed: int
    fold: int | None
    cfg: Any

    @property
    def key(self) -> str:
        return f"seed{self.seed}" if self.fold is None else f"fold{self.fold}-seed{self.seed}"


@dataclass
class StudyReport:
    name: str
    members: list[Member]
    metrics: dict[str, list[float]] = field(default_factory=dict)  # "test/mR" -> one value per member
    parent_run_id: str | None = None
    link: str = ""
    reused: list[str] = field(default_factory=list)  # member keys found finished in MLflow

    def group(self) -> Group:
        return Group(self.name, [], self.metrics)

    def spread(self) -> str:
        """What was repeated: e.g. 3 folds, 2 seeds, or 3 folds x 2 seeds."""
        folds = {m.fold for m in self.members if m.fold is not None}
        seeds = {m.seed for m in self.members}
        parts = ([_count(len(folds), "fold")] if folds else []) + (
            [_count(len(seeds), "seed")] if len(seeds) > 1 or not folds else []
        )
        return " x ".join(parts)

    def lines(self) -> list[str]:
        """`mR 34.10 ± 0.60 (3 folds)` and the other test numbers, without and with SMR."""
        group, spread = self.group(), self.spread()
        out = [f"{label} {group.cell('test/' + key)} ({spread})" for key, label in REPORTED]
        out.append(f"mR with SMR {group.cell('test_smr/mR')} ({spread})")
        return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def study_name(cfg: Any) -> str:
    return cfg.study.name or cfg.train.run_name or f"{cfg.model.get('name', 'model')}-{cfg.data.name}-study"


def members(cfg: Any) -> list[Member]:
    """The study's trainings, folds outer, seeds inner, each with its own config and run name."""
    name = study_name(cfg)
    folds: list[int | None] = list(range(cfg.study.folds)) if cfg.study.folds else [None]
    out = []
    for fold, seed in itertools.product(folds, cfg.study.seeds):
        member = copy.deepcopy(cfg)
        member.train.seed = int(seed)
        if fold is not None:
            member.data.validation.mode = "folds"
            member.data.validation.folds = cfg.study.folds
            member.data.validation.fold = fold
            member.prepare.output = f"{cfg.prepare.output.rstrip('/')}-fold{fold}of{cfg.study.folds}"
            member.train.data = member.prepare.output
        out.append(Member(int(seed), fold, member))
        member.train.run_name = f"{name}-{out[-1].key}"
    return out


def aggregate(children: list[dict[str, float]]) -> dict[str, list[float]]:
    """{metric: [value per member]} for the test numbers every member has."""
    keys = [k for k in children[0] if k.startswith(PREFIXES)] if children else []
    return {k: [float(c[k]) for c in children] for k in keys if all(k in c for c in children)}


def parent_metrics(values: dict[str, list[float]]) -> dict[str, float]:
    """test/x -> mean, test_std/x -> sample std (n - 1; 0 for one member); test_smr/ likewise."""
    group = Group("study", [], values)
    out: dict[str, float] = {}
    for key in values:
        prefix, name = key.split("/", 1)
        out[key] = group.mean(key)
        out[f"{prefix}_std/{name}"] = group.std(key)
    return out


def run_study(
    cfg: Any,
    train_fn: Callable[..., Any] | None = None,
    prepare_fn: Callable[[Any], Any] | None = None,
) -> StudyReport:
    """Train every member as a child run of the study's parent run and log the spread there."""
    from rsray.data.prepare import prepare
    from rsray.tracking import Tracker, find_runs, metric_name
    from rsray.train.run import train

    train_fn, prepare_fn = train_fn or train, prepare_fn or prepare
    if not cfg.tracking.enabled:
        raise cfg.error("tracking.enabled", "rsray study records its members and their spread in MLflow: set it true")
    name = study_name(cfg)
    report = StudyReport(name, members(cfg))
    parent = Tracker.start_or_resume(
        cfg.tracking,
        name,
        key_tags={STUDY_TAG: name, KIND_TAG: "study"},
        params={
            **cfg.to_dict(),
            "study": {"seeds": list(cfg.study.seeds), "folds": cfg.study.folds, "members": len(report.members)},
        },
        tags={"model": cfg.model.get("name", ""), "dataset": cfg.data.name},
    )
    report.parent_run_id, report.link = parent.run_id, parent.ui_link()
    with parent:
        children: list[dict[str, float]] = []
        for number, member in enumerate(report.members, 1):
            key_tags = {STUDY_TAG: name, MEMBER_TAG: member.key}
            done = [
                run
                for run in find_runs(cfg.tracking, key_tags)
                if run.info.status == "FINISHED" and "test/mR" in run.data.metrics
            ]
            if done:
                log.info(
                    "study %s: member %d/%d (%s) finished before, reused", name, number, len(report.members), member.key
                )
                report.reused.append(member.key)
                children.append(dict(done[0].data.metrics))
                continue
            log.info("study %s: member %d/%d (%s)", name, number, len(report.members), member.key)
            if member.fold is not None:
                prepare_fn(member.cfg)
            child = Tracker.start_or_resume(
                member.cfg.tracking,
                member.cfg.train.run_name,
                key_tags=key_tags,
                params=member.cfg.to_dict(),
                tags={"model": member.cfg.model.get("name", ""), "dataset": member.cfg.data.name},
                parent_run_id=parent.run_id,
            )
            result = train_fn(member.cfg, tracker=child)
            test = getattr(result, "test_report", None)
            if not test:
                raise RuntimeError(f"study {name}: member {member.key} has no test numbers (see the warnings above)")
            children.append(
                {
                    metric_name(f"{prefix}{k}"): v  # as MLflow names them, so reused members read alike
                    for prefix, part in zip(PREFIXES, ("metrics", "smr_metrics"), strict=True)
                    for k, v in test[part].items()
                }
            )
        report.metrics = aggregate(children)
        parent.log_metrics(parent_metrics(report.metrics), step=0)
        parent.set_tags({"rsray.study_spread": report.spread()})
        parent.log_dict(
            {"members": [m.key for m in report.members], "values": report.metrics, "spread": report.spread()},
            "study/members.json",
        )
        parent.log_text("\n".join(report.lines()) + "\n", "study/report.txt")
    return report
