"""One way to address files: a local path or an `s3://bucket/key` URI, as a pyarrow filesystem.

Ray Data, Parquet and our manifests all speak pyarrow filesystems, so a stage written against
`resolve()` runs unchanged on a laptop folder, AWS S3, or any S3 endpoint (MinIO, moto) named
by `AWS_ENDPOINT_URL_S3` or the config's `s3_endpoint`.
"""

from __future__ import annotations

import copyreg
import functools
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pyarrow.fs as pafs

T = TypeVar("T")


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
    """Tries per S3 request: the AWS SDKs' own AWS_MAX_ATTEMPTS when set, else their default 3."""
    value = os.environ.get("AWS_MAX_ATTEMPTS", "")
    return int(value) if value.isdigit() and int(value) > 0 else DEFAULT_S3_ATTEMPTS


def s3_retry_strategy() -> pafs.S3RetryStrategy:
    """The AWS SDK's retry of throttling (503 SlowDown), 5xx answers and dropped connections, with
    exponential backoff, `s3_attempts()` tries per request.

    Not pyarrow's default `AwsStandardS3RetryStrategy`: measured here (pyarrow 23), its retry quota
    is spent and never refilled, so one filesystem object retries 100 times in its whole life and
    then fails the next throttled request at once (a prepare through a proxy failing every third
    request died on its 101st). The SDK's classic strategy has no quota; its `max_attempts` counts
    retries, hence the -1."""
    return pafs.AwsDefaultS3RetryStrategy(max_attempts=s3_attempts() - 1)


def _rebuild_s3(kwargs: dict) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(**kwargs, retry_strategy=s3_retry_strategy())


def _reduce_s3(fs: pafs.S3FileSystem):
    """pyarrow pickles an S3 filesystem without its retry strategy, so a copy sent to a Ray task or
    Train worker would get the leaking default; this rebuilds it with ours there (and with that
    process's AWS_MAX_ATTEMPTS). cloudpickle, and so Ray, consults `copyreg` first."""
    _, (kwargs,) = fs.__reduce__()
    return _rebuild_s3, (kwargs,)


copyreg.pickle(pafs.S3FileSystem, _reduce_s3)

# The SDK cannot retry a read whose error answer does not fit the caller's buffer: pyarrow hands
# each ranged GET a buffer the size of the range, a 503 SlowDown's XML body (about 120 bytes)
# overflows a small one (a Parquet footer's 8), and the SDK reports INTERNAL_FAILURE, which it
# counts as final. Measured here through the fault proxy; Apache Doris met it on real S3.
_BUFFER_OVERFLOWED_BY_AN_ERROR = ("Failed to flush response stream",)


def reading(fn: Callable[[], T], what: str) -> T:
    """`fn()` (one whole read: open, read, close), again after the error above, with Ray Data's
    backoff (`call_with_retry`: 1 s, 2 s, ...), `s3_attempts()` tries in all; other errors raise.
    Ray Data is imported only when a read has failed that way."""
    try:
        return fn()
    except OSError as exc:
        if not any(sign in str(exc) for sign in _BUFFER_OVERFLOWED_BY_AN_ERROR) or s3_attempts() < 2:
            raise
    from ray.data._internal.util import call_with_retry

    return call_with_retry(fn, what, match=_BUFFER_OVERFLOWED_BY_AN_ERROR, max_attempts=s3_attempts() - 1)


def resolve(uri: str | Path, endpoint: str | None = None) -> Location:
    """Turn a local path or s3:// URI into a Location usable from the driver and Ray workers.

    S3 requests are retried by the AWS SDK inside pyarrow (`s3_retry_strategy`), also in the Ray
    tasks and workers a filesystem is sent to; Ray Data also retries a whole file write on those
    errors (`DataContext.write_file_retry_on_errors`)."""
    uri = str(uri)
    if is_s3(uri):
        endpoint = s3_endpoint(endpoint)
        kwargs = {
            "region": s3_region(uri[len("s3://") :].split("/", 1)[0], endpoint),
            "retry_strategy": s3_retry_strategy(),
        }
        if endpoint:
            kwargs["endpoint_override"] = endpoint
            if endpoint.startswith("http://"):
                kwargs["scheme"] = "http"
        return Location(pafs.S3FileSystem(**kwargs), uri[len("s3://") :].rstrip("/"), uri.rstrip("/"))
    path = str(Path(uri).expanduser().resolve())
    return Location(pafs.LocalFileSystem(), path, path)


# One GET per read on S3: pyarrow's input *stream* fetches 256 KiB per request whatever is asked of
# it (a 40 MiB read: 161 requests, 6.4 s against moto; as a file: 2 requests, 0.18 s), so whole
# files are read as random-access files, and long ones in chunks of this many bytes.
READ_CHUNK = 8 << 20


def read_bytes(loc: Location) -> bytes:
    """The whole file, in one request on S3 (plus the size lookup)."""

    def read() -> bytes:
        with loc.fs.open_input_file(loc.path) as file:
            return file.read()

    return reading(read, f"read {loc.uri}")


def read_chunks(fs: pafs.FileSystem, path: str, chunk: int = READ_CHUNK) -> Iterator[bytes]:
    """The file in pieces of `chunk` bytes, each one request on S3: for files too large to hold."""
    with fs.open_input_file(path) as file:
        while block := file.read(chunk):
            yield block


def download(loc: Location, local: Path) -> None:
    """Copy the file to the local path `local`, 8 MiB per request, never whole in memory."""
    with open(local, "wb") as out:
        for block in read_chunks(loc.fs, loc.path):
            out.write(block)


def write_bytes(loc: Location, data: bytes) -> None:
    """Write the whole file; a reader sees the old bytes or the new, never a part (an S3 PUT is
    atomic; locally a staged file renamed over the old one)."""
    parent = loc.path.rsplit("/", 1)[0]
    if parent:
        loc.fs.create_dir(parent, recursive=True)
    if isinstance(loc.fs, pafs.LocalFileSystem):
        _write_whole(loc.path, data)
        return
    with loc.fs.open_output_stream(loc.path) as stream:
        stream.write(data)


def _write_whole(path: str, data: bytes) -> None:
    """A local file written beside its place and renamed over it; a failed write (a full disk)
    leaves neither a part nor the staged file."""
    staged = f"{path}.{os.getpid()}.tmp"
    try:
        Path(staged).write_bytes(data)
        os.replace(staged, path)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise


def create_new(loc: Location, data: bytes) -> bool:
    """Write `data` to `loc` only if nothing is there, as one atomic step (a lock's creation):
    `O_CREAT | O_EXCL` on a local disk, a conditional PUT (`If-None-Match: *`, boto3; pyarrow's S3
    filesystem cannot send it) on S3. True when this call created it, False when it existed."""
    if isinstance(loc.fs, pafs.S3FileSystem):
        return _s3_create_new(loc, data)
    parent = loc.path.rsplit("/", 1)[0]
    if parent:
        loc.fs.create_dir(parent, recursive=True)
    try:
        descriptor = os.open(loc.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    return True


def _s3_client(loc: Location):
    """A boto3 client for `loc`'s endpoint, region and keys (pyarrow's S3 filesystem cannot send
    conditional headers)."""
    import boto3
    from botocore.config import Config as BotoConfig

    _, (settings,) = loc.fs.__reduce__()  # the filesystem's own endpoint and region
    endpoint = settings.get("endpoint_override")
    if endpoint and "://" not in endpoint:
        endpoint = f"{settings.get('scheme') or 'https'}://{endpoint}"
    return boto3.client(
        "s3",
        endpoint_url=endpoint or None,
        region_name=settings.get("region") or None,
        aws_access_key_id=settings.get("access_key") or None,  # None: boto3's own chain (the environment)
        aws_secret_access_key=settings.get("secret_key") or None,
        aws_session_token=settings.get("session_token") or None,
        config=BotoConfig(retries={"max_attempts": s3_attempts(), "mode": "standard"}),
    )


def _s3_conditional_put(loc: Location, data: bytes, **condition: str) -> bool:
    """PUT with one condition (IfNoneMatch or IfMatch); False when S3 refused it on the condition."""
    from botocore.exceptions import ClientError

    bucket, key = loc.path.split("/", 1)
    try:
        _s3_client(loc).put_object(Bucket=bucket, Key=key, Body=data, **condition)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False  # the condition failed, or another writer's conditional PUT is in flight
        raise OSError(f"{loc.uri}: {exc}") from None
    return True


def _s3_create_new(loc: Location, data: bytes) -> bool:
    return _s3_conditional_put(loc, data, IfNoneMatch="*")


@dataclass(frozen=True)
class Seen:
    """A file's bytes as one read saw them, and what `replace_if_unchanged` compares: the S3 ETag
    of that very read, or (locally) the bytes themselves."""

    data: bytes
    etag: str | None = None


def read_seen(loc: Location) -> Seen | None:
    """The file's bytes with their version (S3's ETag from the same GET); None when it is absent."""
    if isinstance(loc.fs, pafs.S3FileSystem):
        from botocore.exceptions import ClientError

        bucket, key = loc.path.split("/", 1)
        try:
            response = _s3_client(loc).get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise OSError(f"{loc.uri}: {exc}") from None
        return Seen(response["Body"].read(), response["ETag"])
    try:
        return Seen(Path(loc.path).read_bytes())
    except FileNotFoundError:
        return None


def replace_if_unchanged(loc: Location, seen: Seen, data: bytes) -> bool:
    """Replace the file with `data` only if it still is what `seen` read, as one atomic step (a
    stale lock's takeover: of two commands taking it over together exactly one wins). On S3 a PUT
    with `If-Match: <seen's ETag>`; locally, under an exclusive `flock` on the parent folder (held
    by takeovers only, released by the kernel if the process dies), a compare and an atomic
    rename. True when this call replaced it."""
    if isinstance(loc.fs, pafs.S3FileSystem):
        return _s3_conditional_put(loc, data, IfMatch=seen.etag or "")
    import fcntl

    folder = os.open(os.path.dirname(loc.path) or ".", os.O_RDONLY)
    try:
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
        except OSError:  # a filesystem without flock (some NFS mounts): compare and rename unguarded
            pass
        try:
            if Path(loc.path).read_bytes() != seen.data:
                return False
        except FileNotFoundError:
            return False  # released meanwhile: the caller's next create decides
        _write_whole(loc.path, data)
        return True
    finally:
        os.close(folder)  # releases the flock


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


def sha256_of(fs: pafs.FileSystem, path: str, chunk: int = READ_CHUNK) -> str:
    def hash_it() -> str:
        digest = hashlib.sha256()
        for block in read_chunks(fs, path, chunk):
            digest.update(block)
        return digest.hexdigest()

    return reading(hash_it, f"hash {path}")


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
