"""Local side of the storage layer (the S3 side runs against moto's server in integration tests)."""

import hashlib

import pyarrow.fs as pafs

from rsray import storage


def test_local_paths_resolve_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = storage.resolve("out/x")
    assert isinstance(loc.fs, pafs.LocalFileSystem)
    assert loc.path == str(tmp_path / "out" / "x")


def test_write_read_list_remove(tmp_path):
    root = storage.resolve(tmp_path / "root")
    storage.write_bytes(root.join("a", "one.parquet"), b"1")
    storage.write_bytes(root.join("two.txt"), b"22")
    assert storage.read_bytes(root.join("a", "one.parquet")) == b"1"
    assert [p.rsplit("/", 1)[1] for p in storage.list_files(root)] == ["one.parquet", "two.txt"]
    assert len(storage.list_files(root, ".parquet")) == 1
    assert storage.sha256_of(root.fs, root.join("two.txt").path) == hashlib.sha256(b"22").hexdigest()
    storage.remove_tree(root)
    assert not storage.exists(root) and storage.list_files(root) == []
    storage.remove_tree(root)  # removing twice is fine


def test_s3_uri_uses_endpoint_from_config_or_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    loc = storage.resolve("s3://bucket/prefix/")
    assert isinstance(loc.fs, pafs.S3FileSystem)
    assert (loc.path, loc.uri) == ("bucket/prefix", "s3://bucket/prefix")
    assert loc.join("m.json").uri == "s3://bucket/prefix/m.json"
    assert storage.s3_endpoint("http://other:1") == "http://other:1"
    assert storage.s3_endpoint() == "http://127.0.0.1:9"


def test_s3_requests_are_signed_for_the_buckets_region(monkeypatch):
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    asked = []

    def bucket_region(bucket):  # what AWS answers for a bucket in Frankfurt (no network here)
        asked.append(bucket)
        return "eu-central-1"

    monkeypatch.setattr(pafs, "resolve_s3_region", bucket_region)
    storage._bucket_region.cache_clear()
    assert storage.resolve("s3://frankfurt-bucket/prepared").fs.region == "eu-central-1"
    storage.resolve("s3://frankfurt-bucket/runs")
    assert asked == ["frankfurt-bucket"]  # asked once per bucket
    assert storage.s3_region("any", endpoint="http://127.0.0.1:9") == "us-east-1"  # MinIO, moto: not asked
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    assert storage.resolve("s3://frankfurt-bucket/x").fs.region == "ap-south-1"  # a setting wins
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    assert storage.s3_region("frankfurt-bucket") == "us-west-2"
    storage._bucket_region.cache_clear()


def test_an_unreachable_s3_endpoint_is_one_line_naming_the_uri_and_the_endpoint(monkeypatch, capsys):
    """A real request to a closed port on 127.0.0.1, through the command a user runs first."""
    from pipelines.cli import main
    from tests.conftest import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    assert main(["data", "inspect", "s3://some-bucket/prepared"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(
        f"rsray: error: s3://some-bucket/prepared/manifest.json: cannot reach the S3 endpoint {endpoint} "
        "(from AWS_ENDPOINT_URL_S3): "
    )


def test_s3_attempts_follow_the_aws_sdks_variable(monkeypatch):
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    assert storage.s3_attempts() == storage.DEFAULT_S3_ATTEMPTS
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")
    assert storage.s3_attempts() == 4
    for bad in ("0", "many", "-2"):
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", bad)
        assert storage.s3_attempts() == storage.DEFAULT_S3_ATTEMPTS
    assert storage.explain_unreachable(OSError("Access Denied")) is None  # other errors pass as they are


def test_s3_reads_ask_for_whole_files_or_8_mib_chunks_not_256_kib(s3_endpoint, s3_bucket):
    """pyarrow's S3 input stream fetches 256 KiB per request whatever it is asked: a 251 MiB SWAN
    checkpoint took 200 s to read from moto that way. Counted through a proxy that passes every
    request: a whole-file read is the size lookup and one GET, a hash one GET per 8 MiB."""
    import os

    import boto3

    from tests.faulty_proxy import FaultyProxy

    data = os.urandom(20 << 20)
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(Bucket=s3_bucket, Key="reads/state.pt", Body=data)
    with FaultyProxy(s3_endpoint, limit=0) as proxy:
        loc = storage.resolve(f"s3://{s3_bucket}/reads/state.pt", proxy.url)
        assert storage.read_bytes(loc) == data
        whole = proxy.requests
        assert storage.sha256_of(loc.fs, loc.path) == hashlib.sha256(data).hexdigest()
        hashed = proxy.requests - whole
    assert whole <= 2, whole  # was 81
    assert hashed <= 1 + 3, hashed  # the size and three 8 MiB GETs (was 81)
