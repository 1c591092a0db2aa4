"""A prepare output's ownership: which files under `prepare.output` rsray wrote, and replacing only those.

A folder is rsray's when it holds an rsray manifest (`producer: rsray prepare`; manifests from
before that field are recognised by their schema) or the marker an unfinished prepare leaves
(`prepare-in-progress.json`, written before the first shard and removed after the manifest; the
lock of the prepare writing there, `prepare-lock.json`, is never counted). Any
other folder with files in it is refused with one line: a file that happens to be called
`manifest.json` proves nothing. In an rsray folder only rsray's files are replaced: the shards the
manifest lists and any other file named as rsray names shards (`part-NNNNN-K.parquet`) in a split
folder, the manifest, the list of rejected records, the marker and the staging folders (`_staging/`,
`_candidates/`). A user's notes or other files next to them are left alone.

Shards are written into `_staging/` first (Ray Data's overwrite mode empties the folder it
writes to, so it may only ever write into a folder that is wholly rsray's) and moved into
`<split>/` once all are written; the manifest is written last, so a manifest means complete.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from dataclasses import dataclass, field

from rsray import storage
from rsray.data.manifest import (
    IN_PROGRESS_FILE,
    MANIFEST_FILE,
    PRODUCER,
    REJECTED_FILE,
    SPLITS,
    Manifest,
    build_manifest,
    is_rsray_manifest,
    write_manifest,
    write_rejections,
)
from rsray.data.shards import describe_split

log = logging.getLogger("rsray.prepare")

STAGING = "_staging"
CANDIDATES = "_candidates"  # a streamed corpus's first pass (rsray.data.corpus): checked, resized samples
LOCK_FILE = "prepare-lock.json"  # held by the prepare writing here (rsray.locks); never an output file
SHARD_NAME = re.compile(r"^part-\d{5}(-\d+)?\.parquet$")


class NotAnRsrayOutput(ValueError):
    """`prepare.output` holds files rsray did not write; the message is one line naming one of them."""


@dataclass
class OutputState:
    """What an earlier prepare left at the output."""

    previous: dict | None = None  # its manifest, when it finished
    interrupted: bool = False  # it started (marker present) and never wrote its manifest
    ours: list[str] = field(default_factory=list)  # filesystem paths of the files it wrote
    foreign: list[str] = field(default_factory=list)  # files next to them that are not rsray's


def inspect_output(out: storage.Location) -> OutputState:
    """The state of `out`; raises NotAnRsrayOutput when it holds files and is not rsray's."""
    files = [path for path in storage.list_files(out) if path != out.join(LOCK_FILE).path]
    if not files:
        return OutputState()
    manifest = _read_json(out.join(MANIFEST_FILE)) if out.join(MANIFEST_FILE).path in files else None
    marker = _read_json(out.join(IN_PROGRESS_FILE)) if out.join(IN_PROGRESS_FILE).path in files else None
    marker_is_ours = isinstance(marker, dict) and marker.get("producer") == PRODUCER
    if not is_rsray_manifest(manifest) and not marker_is_ours:
        if out.join(MANIFEST_FILE).path in files:
            problem = f"{out.join(MANIFEST_FILE).uri} is not a manifest rsray wrote"
        else:
            problem = f"{out.uri} holds files rsray did not write (e.g. {_relative(out, files[0])})"
        raise NotAnRsrayOutput(
            f"{problem}: refusing to write shards there; choose an empty or new folder for prepare.output"
        )
    previous = manifest if is_rsray_manifest(manifest) and not marker_is_ours else None
    listed = {out.join(*f["path"].split("/")).path for f in _listed_files(previous)}
    ours = [path for path in files if path in listed or _is_ours(out, path)]
    foreign = [path for path in files if path not in set(ours)]
    return OutputState(previous=previous, interrupted=marker_is_ours, ours=ours, foreign=foreign)


def begin(out: storage.Location, state: OutputState) -> storage.Location:
    """Mark `out` as being written, remove the earlier prepare's files (only those), and return the
    empty staging folder for the new shards."""
    storage.write_bytes(
        out.join(IN_PROGRESS_FILE),
        json.dumps({"producer": PRODUCER, "started": time.time(), "host": socket.gethostname()}).encode(),
    )
    if state.interrupted:
        log.info("%s: an earlier prepare did not finish; its files are replaced", out.uri)
    for path in sorted(state.ours, key=lambda p: p.endswith(MANIFEST_FILE), reverse=True):  # manifest first
        if path != out.join(IN_PROGRESS_FILE).path:
            out.fs.delete_file(path)
    if state.foreign:
        log.info(
            "%s: %d file(s) rsray did not write are left as they are (e.g. %s)",
            out.uri,
            len(state.foreign),
            _relative(out, state.foreign[0]),
        )
    storage.remove_tree(out.join(STAGING))
    storage.remove_tree(out.join(CANDIDATES))
    return out.join(STAGING)


def publish(out: storage.Location) -> dict[str, list[str]]:
    """Move the staged shards into `<split>/`; returns each split's shard paths (only these count)."""
    staging = out.join(STAGING)
    published: dict[str, list[str]] = {split: [] for split in SPLITS}
    for split in SPLITS:
        for path in storage.list_files(staging.join(split), ".parquet"):
            target = out.join(split, path.rsplit("/", 1)[1]).path
            out.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            out.fs.move(path, target)
            published[split].append(target)
    storage.remove_tree(staging)
    storage.remove_tree(out.join(CANDIDATES))
    return published


def finish(out: storage.Location, manifest: dict) -> None:
    """Write the manifest (last: it means complete), then drop the in-progress marker."""
    write_manifest(out, manifest)
    out.fs.delete_file(out.join(IN_PROGRESS_FILE).path)


def complete(
    out: storage.Location, cfg, read: int, scenes: dict, rejected: list[dict], vocab, fingerprint: str
) -> Manifest:
    """The end of every prepare, once its shards are staged: publish them, record each split's
    files as read back, write the refused records (REJECTED_FILE), then the manifest, last."""
    shards = publish(out)
    split_info = {split: describe_split(out, split, shards[split]) for split in SPLITS}
    rejected_file = write_rejections(out, rejected)
    manifest = build_manifest(cfg, read, scenes, rejected, rejected_file, split_info, vocab, fingerprint)
    finish(out, manifest)
    return manifest


def _is_ours(out: storage.Location, path: str) -> bool:
    relative = _relative(out, path)
    if relative in (MANIFEST_FILE, IN_PROGRESS_FILE, REJECTED_FILE) or relative.startswith(
        (f"{STAGING}/", f"{CANDIDATES}/")
    ):
        return True
    folder, _, name = relative.rpartition("/")
    return folder in SPLITS and bool(SHARD_NAME.match(name))


def _listed_files(manifest: dict | None) -> list[dict]:
    if not manifest:
        return []
    return [f for info in manifest.get("splits", {}).values() for f in info.get("files", [])]


def _relative(out: storage.Location, path: str) -> str:
    return path[len(out.path.rstrip("/")) + 1 :]


def _read_json(loc: storage.Location) -> object:
    try:
        return json.loads(storage.read_bytes(loc))
    except (ValueError, OSError):
        return None
