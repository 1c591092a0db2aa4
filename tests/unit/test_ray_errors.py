"""Errors carried to the driver, unwrapped, and write errors that name no file given the folder being
written. (Real Ray tasks, a Ray Data job and a Train worker raising them, and a real full tmpfs:
tests/integration/test_failures.py.)"""

from __future__ import annotations

import errno

import pytest

from rsray.ray_errors import errors_name, underlying_error
from rsray.train.errors import TrainingFailed


class UserCodeException(Exception):
    """Named as Ray Data's: it reaches the driver without its __cause__, the cause's last line in its message."""


def test_a_wrapped_os_error_is_found_by_its_cause_or_its_message():
    full = OSError(errno.ENOSPC, "No space left on device", "/out/part-0.parquet")
    wrapped = TrainingFailed("training run x failed")
    wrapped.__cause__ = full
    assert underlying_error(wrapped) is full
    carried = UserCodeException("Traceback ...\nOSError: [Errno 28] No space left on device: '/out/part-1.parquet'")
    found = underlying_error(carried)
    assert isinstance(found, OSError) and (found.errno, found.filename) == (28, "/out/part-1.parquet")
    plain = ValueError("not a wrapper")
    assert underlying_error(plain) is plain


def test_a_write_error_that_names_no_file_names_the_folder_being_written():
    pyarrows = OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    with pytest.raises(OSError, match="No space left") as raised, errors_name("s3://bucket/out/_staging"):
        raise TrainingFailed("training run x failed") from pyarrows
    assert (raised.value.errno, raised.value.strerror, raised.value.filename) == (
        28,
        "No space left on device",
        "s3://bucket/out/_staging",
    )
    # Ray Data's retry wrapper leaves a sentence where the file name goes: not a path
    retried = OSError(errno.ENOSPC, "Error writing bytes", "Failed to apply UDF transform after 1/1 attempts.")
    with pytest.raises(OSError, match="No space left") as raised, errors_name("/out"):
        raise retried
    assert raised.value.filename == "/out"


def test_an_error_that_names_its_file_or_is_not_storage_passes_unchanged():
    named = OSError(errno.EACCES, "Permission denied", "/out/part-0.parquet")
    with pytest.raises(OSError, match="Permission denied") as raised, errors_name("/out"):
        raise named
    assert raised.value is named
    with pytest.raises(ValueError, match="a bad value"), errors_name("/out"):
        raise ValueError("a bad value")
