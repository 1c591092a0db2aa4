"""One trial of a sweep as its summary table shows it: what the report builds and the figures draw."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class TrialSummary:
    """One row of the sweep's summary table."""

    trial_id: str
    params: dict[str, Any]
    status: str  # finished | early_stopped | error
    epochs_done: int
    best: float  # the sweep metric at the trial's best epoch (nan if it never reported)
    best_epoch: int
    last: float
    error: str = ""
    run_id: str = ""

    @property
    def early_stopped(self) -> bool:
        return self.status == "early_stopped"
