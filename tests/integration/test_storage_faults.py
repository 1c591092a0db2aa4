"""rsray's S3 layer against moto's server behind a proxy that fails every third request the way S3
and networks do (503 SlowDown, a connection dropped before the answer): every write, listing and
read still succeeds with the bytes the server holds, because the AWS SDK inside pyarrow retries
them (`storage.s3_attempts()`); with a single attempt the same faults fail, so the setting is
what carries them."""

from __future__ import annotations

import os
import time

import pytest

from rsray import storage
from tests.faulty_proxy import FaultyProxy

pytestmark = pytest.mark.integration


def _write_list_read(root: storage.Location, files: dict[str, bytes]) -> dict[str, bytes]:
    for name, data in files.items():
        storage.write_bytes(root.join(name), data)
    listed = storage.list_files(root)
    return {path.rsplit("/", 1)[1]: storage.read_bytes(storage.Location(root.fs, path, path)) for path in listed}


def test_s3_writes_listings_and_reads_are_retried_through_faults(s3_endpoint, s3_bucket, monkeypatch):
    import boto3

    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    files = {f"part-{i}.bin": os.urandom(3000 * (i + 1)) for i in range(3)}
    started = time.perf_counter()
    with FaultyProxy(s3_endpoint, every=3, fault="mixed") as proxy:
        read = _write_list_read(storage.resolve(f"s3://{s3_bucket}/faults/retried", proxy.url), files)
    print(f"{proxy.requests} requests, {proxy.faults} failed by the proxy, {time.perf_counter() - started:.1f} s")
    assert proxy.faults >= 4
    assert read == files
    client = boto3.client("s3", endpoint_url=s3_endpoint)  # what the server itself holds
    for name, data in files.items():
        assert client.get_object(Bucket=s3_bucket, Key=f"faults/retried/{name}")["Body"].read() == data

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with FaultyProxy(s3_endpoint, every=2, fault="drop") as proxy, pytest.raises(OSError, match="AWS Error"):
        _write_list_read(storage.resolve(f"s3://{s3_bucket}/faults/once", proxy.url), files)
