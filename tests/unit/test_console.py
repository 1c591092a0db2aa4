"""The quiet console (`rsray.console`): rsray's lines on stderr, the libraries' in the log file,
`--verbose` brings them back, and worker output keeps only rsray's own lines on the console."""

from __future__ import annotations

import logging
import sys

import pytest

from rsray import console


@pytest.fixture
def fresh_logging(tmp_path, monkeypatch):
    """setup_logging rewires the root logger and library loggers: put them back afterwards."""
    monkeypatch.setenv("RSRAY_LOG_DIR", str(tmp_path / "logs"))
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    libraries = {
        name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate)
        for name in console.LIBRARY_LOGGERS
    }
    state = dict(console._state)
    yield tmp_path / "logs"
    for handler in root.handlers:
        handler.close()
    root.handlers[:], root.level = saved
    for name, (handlers, propagate) in libraries.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).propagate = propagate
    logging.captureWarnings(False)
    console._state.update(state)


def test_library_lines_go_to_the_log_file_and_rsray_lines_to_both(fresh_logging, capsys):
    library = logging.getLogger("ray.data")
    library.addHandler(logging.StreamHandler(sys.stderr))  # what Ray Data does at import
    library.propagate = False
    path = console.setup_logging(verbose=False, stage="train")
    assert path.parent == fresh_logging and path.name.startswith("train-")
    library.info("Execution plan of Dataset dataset_0")
    logging.getLogger("rsray.train").info("epoch 0 of 0..2: loss 1.0")
    logging.getLogger("mlflow.tracking").error("the store is away")
    logging.getLogger("rsray.prepare").info("reading s3://AKIAKEY:SECRETVALUE@bucket/x")
    err = capsys.readouterr().err
    assert "rsray: epoch 0 of 0..2: loss 1.0" in err and "the store is away" in err
    assert "Execution plan" not in err
    written = path.read_text()
    assert "ray.data: Execution plan of Dataset dataset_0" in written and "epoch 0 of 0..2" in written
    assert "SECRETVALUE" not in written and "SECRETVALUE" not in err


def test_verbose_puts_the_libraries_back_on_the_console(fresh_logging, capsys):
    console.setup_logging(verbose=True, stage="prepare")
    logging.getLogger("ray").info("Started a local Ray instance.")
    assert "Started a local Ray instance." in capsys.readouterr().err


def test_forwarded_worker_output_keeps_only_rsray_lines_on_the_console(fresh_logging, capsys):
    path = console.setup_logging(verbose=False, stage="train")
    console.print_worker_lines(
        {
            "pid": 12,
            "actor_name": "RayTrainWorker",
            "lines": [
                "Setting up process group for: env:// [rank=0, world_size=2]",
                "rsray: epoch 1 of 0..2: loss 0.5",
            ],
        }
    )
    err = capsys.readouterr().err
    assert err == "rsray: epoch 1 of 0..2: loss 0.5\n"
    written = path.read_text()
    assert (
        "(RayTrainWorker pid=12) Setting up process group" in written
        and "(RayTrainWorker pid=12) rsray: epoch 1" in written
    )


def test_inside_a_worker_rsray_lines_carry_the_prefix_the_driver_keeps(monkeypatch, capsys):
    logger = logging.getLogger("rsray")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        console.own_lines_in_workers()
        console.own_lines_in_workers()  # idempotent: one handler
        logging.getLogger("rsray.train").info("epoch 2 of 0..2")
        assert capsys.readouterr().err == "rsray: epoch 2 of 0..2\n"
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


def test_a_credential_in_a_traceback_is_redacted_in_the_log_file(fresh_logging, capsys):
    path = console.setup_logging(verbose=False, stage="evaluate")
    try:
        raise ValueError("cannot reach http://alice:s3cr3t@mlflow:5000/api")
    except ValueError as exc:
        logging.getLogger("traceback").info("the error that ended this command", exc_info=exc)
        logging.getLogger("rsray.eval").error("failed", exc_info=exc)
    written, err = path.read_text(), capsys.readouterr().err
    assert "Traceback" in written and "alice:***@mlflow" in written and "rsray: failed" in err
    assert "s3cr3t" not in written and "s3cr3t" not in err


def test_a_second_ray_session_in_one_process_routes_worker_lines_once(fresh_logging, monkeypatch):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    monkeypatch.setattr(dispatcher, "handlers", [])
    console.setup_logging(verbose=False, stage="train")
    for _ in range(2):  # ray.init adds Ray's printer each time; ray.shutdown removes only Ray's
        dispatcher.add_handler("ray_print_logs", print)
        console.route_library_logs()
    assert [name for name, _ in dispatcher.handlers] == ["rsray_worker_lines"]


def test_the_console_follows_stderr_swapped_and_closed_after_setup(fresh_logging, monkeypatch):
    """A command run in-process under a capture that is closed later (what pytest does between
    tests) must not leave a handler that writes to the closed file."""
    import io

    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    console.setup_logging(verbose=False, stage="prepare")
    logging.getLogger("rsray.prepare").info("read 400 records")
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("rsray.prepare").info("wrote 400 records")
    assert second.getvalue() == "rsray: wrote 400 records\n"


def test_a_library_error_is_one_line_on_the_console_and_whole_in_the_log_file(fresh_logging, capsys):
    """Ray Train's controller logs a worker's failure with its traceback: the console gets its first
    line, the log file all of it; rsray's own errors keep their traceback on neither side cut."""
    path = console.setup_logging(verbose=False, stage="train")
    try:
        raise OSError(28, "No space left on device", "/full/checkpoint_0/state.pt")
    except OSError:
        logging.getLogger("ray.train").error("Worker group failed:\nline two", exc_info=True)
    err = capsys.readouterr().err
    assert err == "rsray: Worker group failed: (details in the log file)\n"
    written = path.read_text()
    assert "line two" in written and "Traceback (most recent call last)" in written and "No space left" in written
