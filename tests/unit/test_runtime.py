"""rsray.runtime's log quieting for Ray's worker processes, without starting Ray."""

from __future__ import annotations

import logging

import pytest

from rsray.runtime import local_worker_setup, quiet_ray_progress_logs

CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


@pytest.fixture
def loggers_at_info():
    """Ray's loggers as a worker whose logging is configured at INFO; restored afterwards."""
    from ray.train.v2._internal.execution import context

    names = [context.__file__, "ray.data._internal.execution.streaming_executor", CLEANER]
    before = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.INFO)
    yield [logging.getLogger(name) for name in names]
    for name, level in before.items():
        logging.getLogger(name).setLevel(level)


def test_train_workers_keep_rays_per_report_and_per_epoch_plan_lines_to_warnings(loggers_at_info):
    report, data_plan, cleaner = loggers_at_info
    quiet_ray_progress_logs()
    for logger in (report, data_plan):
        assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING)
    assert cleaner.isEnabledFor(logging.WARNING)  # only the local Ray's hook silences the cleaner


def test_the_local_ray_hook_also_silences_the_cleaner_that_needs_the_dashboard(loggers_at_info):
    report, data_plan, cleaner = loggers_at_info
    local_worker_setup()
    assert not report.isEnabledFor(logging.INFO)
    assert not cleaner.isEnabledFor(logging.WARNING) and cleaner.isEnabledFor(logging.ERROR)
