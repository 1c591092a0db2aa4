"""A prepared output checked against its manifest before anything trains or is scored on it.

Every file of every split is checked for presence and size (one metadata request per file, cheap
even on S3); the splits named in `checksum_splits` are read whole and their sha256 compared too.
Training checks the validation and test splits' checksums by default (`train.verify_checksums`):
they are what reported numbers rest on and are small; `rsray data verify TARGET` checks them all.
A mismatch is one line naming the file and what differs, before any worker starts.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow.fs as pafs

from rsray import storage
from rsray.data.manifest import MANIFEST_FILE, SPLITS, Manifest, read_manifest


class ShardMismatch(OSError):
    """A shard file differs from what the manifest recorded (missing, size, checksum or rows)."""


@dataclass
class Verified:
    files: int
    bytes: int
    checksummed: int  # files whose sha256 was compared


def verify_prepared(
    uri: str, s3_endpoint: str | None = None, checksum_splits: tuple[str, ...] = (), manifest: Manifest | None = None
) -> Verified:
    """Check every listed file of `uri`'s manifest (`manifest`, when the caller has read it); raise
    ShardMismatch naming the first bad one."""
    manifest = manifest if manifest is not None else read_manifest(uri, s3_endpoint)
    root = storage.resolve(uri, s3_endpoint)
    listed = [(split, f) for split in SPLITS for f in manifest.get("splits", {}).get(split, {}).get("files", [])]
    if "rejections" in manifest:  # schema 2: the rejected records' file, checksummed with the train split
        listed.append(("train", manifest["rejections"]["file"]))
    locations = [root.join(*f["path"].split("/")) for _, f in listed]
    infos = root.fs.get_file_info([loc.path for loc in locations]) if locations else []
    for (_, entry), loc, info in zip(listed, locations, infos, strict=True):
        if info.type == pafs.FileType.NotFound:
            raise ShardMismatch(f"{loc.uri}: listed in {root.join(MANIFEST_FILE).uri} but missing (run prepare again)")
        if info.size != entry["bytes"]:
            raise ShardMismatch(
                f"{loc.uri}: {info.size} bytes, the manifest says {entry['bytes']} "
                "(truncated or changed after prepare; run prepare again)"
            )
    to_hash = [(entry, loc) for (split, entry), loc in zip(listed, locations, strict=True) if split in checksum_splits]
    with ThreadPoolExecutor(max_workers=8) as pool:  # hashing releases the GIL; S3 reads overlap
        digests = list(pool.map(lambda item: storage.sha256_of(item[1].fs, item[1].path), to_hash))
    for (entry, loc), digest in zip(to_hash, digests, strict=True):
        if digest != entry["sha256"]:
            raise ShardMismatch(
                f"{loc.uri}: sha256 {digest[:12]}... differs from the manifest's {entry['sha256'][:12]}... "
                "(changed after prepare; run prepare again)"
            )
    return Verified(files=len(listed), bytes=sum(f["bytes"] for _, f in listed), checksummed=len(to_hash))


def data_digest(manifest: dict) -> str:
    """What exactly a run trained and was scored on, in 16 hex digits: the sha256 over every shard's
    split, path and sha256 (as the manifest lists them) and the word vocabulary with its rule. Any
    re-prepare that changes a shard changes it; the same files prepared again do not."""
    import hashlib
    import json

    files = sorted(
        (split, f["path"], f["sha256"]) for split in SPLITS for f in manifest["splits"].get(split, {}).get("files", [])
    )
    vocab = manifest.get("vocab", {})
    payload = [files, vocab.get("words", []), vocab.get("stopwords", "drop")]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def dataset_profile(manifest: dict) -> dict:
    """Per-split images and captions, and the vocabulary size: what MLflow shows next to the digest."""
    splits = {
        s: {k: manifest["splits"][s][k] for k in ("images", "captions")} for s in SPLITS if s in manifest["splits"]
    }
    return {"splits": splits, "vocabulary": len(manifest.get("vocab", {}).get("words", []))}
