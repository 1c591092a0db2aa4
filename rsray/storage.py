"""One way to address files: a local path or an `s3://bucket/key` URI, as a pyarrow filesystem.

Ray Data, Parquet and our manifests all speak pyarrow filesystems, so a stage written against
`resolve()` runs unchanged on a laptop folder, AWS S3, or any S3 endpoint (MinIO, moto) named
by `AWS_ENDPOINT_URL_S3` or the config's `s3_endpoint`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs


@dataclass(frozen=True)
class Location:
    """A filesystem plus a path inside it (no scheme)."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> Location:
        path = "/".join([self.path.rstrip("/"), *parts])
        uri = "/".join([self.uri.rstrip("/"), *parts])
        return Location(self.fs, path, uri)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def s3_endpoint(explicit: str | None = None) -> str | None:
    """The S3 endpoint to use: config value first, then the AWS SDKs' environment variables."""
    return explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_region(bucket: str, endpoint: str | None = None) -> str:
    """The region to sign S3 requests for: AWS_REGION / AWS_DEFAULT_REGION when set; us-east-1 for an
    S3-compatible endpoint (MinIO, moto: they ignore it); otherwise the bucket's own region, asked
    of AWS once per bucket, so a bucket outside us-east-1 works without any setting."""
    configured = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if configured:
        return configured
    if endpoint:
        return "us-east-1"
    return _bucket_region(bucket)


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str:
    try:
        return pafs.resolve_s3_region(bucket)
    except OSError:  # no network or no such bucket: the request that follows reports the real problem
        return "us-east-1"


DEFAULT_S3_ATTEMPTS = 3  # the AWS SDKs' default


def s3_attempts() -> int:
    """Tries per S3 request: the AWS SDKs' own AWS_MAX_ATTEMPTS when set, else their default 3.
    Each retry waits longer (exponential backoff): measured against an endpoint that is not there,
    the error comes after 1.2 s with 3 tries, 6 s with 5 and 92 s with 10, so a higher default
    would make a wrong endpoint wait minutes; raise it for a bucket that throttles hard."""
    value = os.environ.get("AWS_MAX_ATTEMPTS", "")
    return int(value) if value.isdigit() and int(value) > 0 else DEFAULT_S3_ATTEMPTS


def resolve(uri: str | Path, endpoint: str | None = None) -> Location:
    """Turn a local path or s3:// URI into a Location usable from the driver and Ray workers.

    S3 requests are retried by the AWS SDK inside pyarrow (its standard retry strategy: throttling,
    5xx and connection errors, exponential backoff with jitter) up to `s3_attempts()` times. pyarrow
    23 does not pickle the strategy, so a filesystem sent to a Ray task or worker retries with
    pyarrow's default there (the same strategy, 3 attempts) whatever AWS_MAX_ATTEMPTS says; Ray
    Data also retries a whole file write on those errors (`DataContext.write_file_retry_on_errors`)."""
    uri = str(uri)
    if is_s3(uri):
        endpoint = s3_endpoint(endpoint)
        kwargs = {
            "region": s3_region(uri[len("s3://") :].split("/", 1)[0], endpoint),
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=s3_attempts()),
        }
        if endpoint:
            kwargs["endpoint_override"] = endpoint
            if endpoint.startswith("http://"):
                kwargs["scheme"] = "http"
        return Location(pafs.S3FileSystem(**kwargs), uri[len("s3://") :].rstrip("/"), uri.rstrip("/"))
    path = str(Path(uri).expanduser().resolve())
    return Location(pafs.LocalFileSystem(), path, path)


def read_bytes(loc: Location) -> bytes:
    with loc.fs.open_input_stream(loc.path) as stream:
        return stream.read()


def write_bytes(loc: Location, data: bytes) -> None:
    parent = loc.path.rsplit("/", 1)[0]
    if parent:
        loc.fs.create_dir(parent, recursive=True)
    with loc.fs.open_output_stream(loc.path) as stream:
        stream.write(data)


def exists(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def remove_tree(loc: Location) -> None:
    """Delete a folder (or S3 prefix) if it exists; used to replace a previous output cleanly."""
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.Directory:
        loc.fs.delete_dir(loc.path)
    elif info.type == pafs.FileType.File:
        loc.fs.delete_file(loc.path)


def list_files(loc: Location, suffix: str = "") -> list[str]:
    """Paths (inside the filesystem) of the files under `loc`, sorted, optionally by suffix."""
    if not exists(loc):
        return []
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


def sha256_of(fs: pafs.FileSystem, path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_PYARROW_S3_ERROR = re.compile(r"key '(?P<key>[^']*)' in bucket '(?P<bucket>[^']*)'")
_UNREACHABLE = ("NETWORK_CONNECTION", "Could not connect", "Couldn't connect", "Could not resolve host")


def explain_unreachable(exc: BaseException) -> str | None:
    """One line for an S3 endpoint that cannot be reached, naming the object's URI and the endpoint
    (and which setting named it); None for any other error. pyarrow's own message names the bucket
    and key apart and says only "curlCode: 7"."""
    text = " ".join(str(exc).split())
    if not any(marker in text for marker in _UNREACHABLE):
        return None
    found = _PYARROW_S3_ERROR.search(text)
    where = f"s3://{found['bucket']}/{found['key']}" if found else "S3"
    env = next((name for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL") if os.environ.get(name)), None)
    endpoint = f"{os.environ[env]} (from {env})" if env else "named by prepare.s3_endpoint, or AWS's own"
    details = text.split("Details: ", 1)[1] if "Details: " in text else text
    return f"{where}: cannot reach the S3 endpoint {endpoint}: {details}"
