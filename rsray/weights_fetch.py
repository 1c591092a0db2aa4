"""`rsray weights fetch`: download initial weights once, check them, and put them where a cluster
without internet reads them (a folder or s3://).

A source is a catalog name (`rsray.weights_catalog`), an http(s) URL or a Hub name. A URL is
downloaded with requests (urllib3's Retry for refused or failed requests) into `<file>.part` next
to the target, resumed with an HTTP Range request when a `.part` is there, and renamed only once
its sha256 matches what was asked (`--sha256`, or the catalog's digest prefix). A Hub name goes
through `rsray.weights.resolve(fetch=True)`, i.e. huggingface_hub's own cache and resume.
`--convert timm-swin` rewrites Microsoft's Swin release layout into timm's with timm's own
`checkpoint_filter_fn`. Every fetch writes `<file>.json` beside it: source, sha256, bytes,
conversion, time: what a run's `#sha256=` pins and an auditor reads.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from rsray import storage
from rsray.redact import redact
from rsray.weights import WeightsError, download_cache, resolve, sha256_of
from rsray.weights_catalog import known

log = logging.getLogger(__name__)

CONVERSIONS = ("timm-swin",)
CHUNK = 1 << 16  # what a cut connection can lose at most (iter_content drops a partial chunk)


@dataclass(frozen=True)
class Fetched:
    """What `fetch` wrote (`path`: local file or s3:// URI) and the facts in its .json."""

    path: str
    source: str
    sha256: str
    bytes: int
    converted: str | None
    fetched_at: str


def fetch(source: str, to: str, sha256: str | None = None, convert: str | None = None) -> Fetched:
    """Fetch `source` into the folder or s3:// prefix `to` (see the module docstring)."""
    entry = known(source)
    if convert is not None and convert not in CONVERSIONS:
        raise WeightsError(f"--convert: must be one of {', '.join(CONVERSIONS)}, got {convert!r}")
    if entry is not None and not (entry.url or entry.hub):
        raise WeightsError(f"{source}: no public download is known ({entry.facts})")
    url = entry.url if entry is not None else source
    prefix = entry.sha256_prefix if entry is not None and sha256 is None else ""
    with tempfile.TemporaryDirectory(prefix="rsray-weights-") as scratch:
        if url and url.startswith(("http://", "https://")):
            name = Path(urlparse(url).path).name or "weights"
            local = download(url, download_cache() / name, sha256, prefix)
        else:
            url = entry.hub if entry is not None else source  # a Hub name: its cache does the download
            local = resolve(url + (f"#sha256={sha256}" if sha256 else ""), fetch=True).path
        if convert:
            local = _convert(local, convert, Path(scratch))
        files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
        record = Fetched(
            "",
            redact(url),  # a presigned URL's signature or a ?token= never reaches the record or the console
            sha256_of(local) if local.is_file() else "",
            sum(f.stat().st_size for f in files),
            convert,
            datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        )
        return _place(local, to, record)


def download(url: str, target: Path, sha256: str | None = None, sha256_prefix: str = "") -> Path:
    """`url` into `target`, resuming `target.part` with a Range request, checked against `sha256`
    (or its first digits) before it gets its name. A wrong digest removes the .part."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    if target.exists() and (sha256 or sha256_prefix) and _matches(sha256_of(target), sha256, sha256_prefix):
        log.info("%s: already in %s with its sha256", redact(url), target)
        return target
    shown = redact(url)
    part = target.with_name(target.name + ".part")
    session = requests.Session()
    retry = Retry(total=5, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504), allowed_methods=["GET"])
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    for _attempt in range(5):  # a connection cut mid-body resumes from what arrived
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with session.get(url, headers=headers, stream=True, timeout=60) as response:
                if response.status_code == 416:  # the .part already holds the whole file
                    break
                response.raise_for_status()
                resumed = response.status_code == 206
                if have and not resumed:
                    log.info("%s: the server ignored the range request; downloading again", shown)
                total = int(response.headers.get("Content-Length", 0)) + (have if resumed else 0)
                bar = tqdm(  # on a terminal; in a log, nothing (the start and the end are logged)
                    total=total or None,
                    initial=have if resumed else 0,
                    unit="B",
                    unit_scale=True,
                    desc=target.name,
                    file=sys.stderr,
                    disable=not sys.stderr.isatty(),
                )
                log.info("%s: downloading %s", shown, f"{total / 1e6:.1f} MB" if total else "(size not given)")
                with bar, open(part, "ab" if resumed else "wb") as out:
                    for block in response.iter_content(CHUNK):
                        out.write(block)
                        bar.update(len(block))
            if not total or part.stat().st_size >= total:
                break
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            log.info("%s: connection lost after %d bytes (%s); resuming", shown, _size(part), exc)
        except requests.HTTPError as exc:
            raise WeightsError(redact(f"{shown}: {exc}")) from None
    else:
        raise WeightsError(f"{shown}: the download did not complete after 5 attempts ({_size(part)} bytes)")
    actual = sha256_of(part)
    if not _matches(actual, sha256, sha256_prefix):
        part.unlink()
        wanted = sha256 or f"{sha256_prefix}..."
        raise WeightsError(f"{shown}: sha256 {actual}, but {wanted} was asked for; the download is removed")
    part.replace(target)
    return target


def _matches(actual: str, sha256: str | None, prefix: str) -> bool:
    return (not sha256 or actual == sha256.lower()) and actual.startswith(prefix.lower())


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _convert(path: Path, conversion: str, scratch: Path) -> Path:
    """Microsoft's Swin release layout ({'model': ...}, downsampling at the end of a stage, `head.`)
    rewritten as timm's, by timm's own filter, into `<name>-timm.pth`."""
    import timm
    import torch
    from timm.models.swin_transformer import checkpoint_filter_fn

    state = torch.load(path, map_location="cpu", weights_only=True)
    inner = state.get("model", state)
    depth_keys = [k for k in inner if k.startswith("layers.") and ".blocks." in k]
    stages = 1 + max(int(k.split(".")[1]) for k in depth_keys)
    dim = inner["patch_embed.proj.weight"].shape[0]
    heads = inner["layers.0.blocks.0.attn.relative_position_bias_table"].shape[1]
    depths = tuple(
        1 + max(int(k.split(".")[3]) for k in depth_keys if k.startswith(f"layers.{i}.")) for i in range(stages)
    )
    head = inner.get("head.weight")
    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        embed_dim=dim,
        depths=depths,
        num_heads=tuple(heads * 2**i for i in range(stages)),
        num_classes=head.shape[0] if head is not None else 0,
    )
    converted = checkpoint_filter_fn(state, model)
    model.load_state_dict(converted)  # strict: every tensor has its place in timm's model
    out = scratch / f"{path.stem}-timm.pth"
    torch.save(converted, out)
    return out


def _place(local: Path, to: str, record: Fetched) -> Fetched:
    """Copy (or upload) `local` (a file, or a Hub folder as a folder of its name) and a .json
    record of it into `to`."""
    target = f"{to.rstrip('/')}/{local.name if local.is_file() else _folder_name(record.source)}"
    files = (
        {target: local}
        if local.is_file()
        else {f"{target}/{f.relative_to(local).as_posix()}": f for f in sorted(local.rglob("*")) if f.is_file()}
    )
    for uri, file in files.items():
        loc = storage.resolve(uri)
        if not storage.is_s3(uri):
            Path(loc.path).parent.mkdir(parents=True, exist_ok=True)
        with loc.fs.open_output_stream(loc.path) as out, open(file, "rb") as handle:
            shutil.copyfileobj(handle, out, CHUNK)
    placed = Fetched(target, record.source, record.sha256, record.bytes, record.converted, record.fetched_at)
    storage.write_bytes(storage.resolve(target + ".json"), json.dumps(asdict(placed), indent=2).encode())
    return placed


def _folder_name(source: str) -> str:
    """openai/clip-vit-base-patch32@main -> clip-vit-base-patch32."""
    return source.split("@", 1)[0].rstrip("/").rsplit("/", 1)[-1]
