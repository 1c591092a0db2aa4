"""Initial weights named as the ecosystem names them, resolved to a local file or folder.

A config value that names initial weights (`model.backbone_checkpoint`, `model.text_checkpoint`,
`model.clip.checkpoint`, ...) may be:

  /data/w/resnet50.pth      a local file or folder (a relative path that exists counts too)
  minilm                    an alias of weights shipped as a Python package (`rsray.pretrained`)
  hf-hub:ORG/NAME[@REV]     a timm model on the Hugging Face Hub: its weights file, as timm's own
                            hub loader reads it (model.safetensors, else pytorch_model.bin)
  ORG/NAME[@REV]            a transformers model on the Hub: its folder (config, weights, tokenizer)
  torchvision:ENUM.NAME     a torchvision weights enum member (torchvision:ResNet50_Weights.IMAGENET1K_V1):
                            its file in torch's hub cache ($TORCH_HOME), downloaded as torchvision does
                            it (torch.hub, checked against the digest prefix in its file name)
  s3://BUCKET/KEY.pth       a weights file on S3 (or an S3-compatible store: AWS_ENDPOINT_URL_S3),
                            for clusters without internet (`rsray weights fetch ... --to s3://...`)

and any of them may end in `#sha256=<64 hex digits>`: the weights file's digest must match (for a
folder, its model.safetensors or pytorch_model.bin), else the run is refused in one line.

Hub names go through `huggingface_hub` and its cache, as timm and transformers use them, so
HF_HUB_OFFLINE, HF_HOME, HF_HUB_CACHE and HF_TOKEN mean what they mean there. The driver resolves
them before any worker starts (`fetch=True`: downloads what the cache lacks, unless offline);
workers and model builders resolve with `fetch=False` and read the cache the driver filled, so a
run downloads once per machine, never once per worker. Each resolution records what it found
(`Resolved`: the name, the Hub revision it got, the file's sha256), which a run logs as MLflow
params (`weights/<key>`).

An s3:// file is the cluster's own storage, so whoever needs it first on a machine (the driver, or
a worker on another node) copies it into `download_cache()/s3/BUCKET/KEY` under a file lock
(filelock), and every other process on that machine reads that copy: one download per machine,
however many workers it runs. A copy whose size differs from the object's is fetched again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsray.pretrained import PACKAGED, packaged_path

log = logging.getLogger(__name__)

HF_HUB = "hf-hub:"
S3 = "s3://"
TORCHVISION = "torchvision:"
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")  # an s3:// value naming one file
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's and transformers' hub loaders read
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class WeightsError(ValueError):
    """Weights that cannot be resolved or do not match their sha256; the message is one line
    naming the value (`key`: the config key, when `fetch_all` raised it)."""

    key: str = ""


@dataclass(frozen=True)
class Resolved:
    """What a weights value resolved to: `path` (a file or folder) and where it came from."""

    path: Path
    name: str  # the value without its #sha256 part
    source: str  # local | package | timm-hub | transformers-hub | torchvision | s3
    revision: str | None = None  # the Hub commit the cache holds
    sha256: str | None = None  # of the weights file, when checked or asked for

    def record(self) -> str:
        """One line for MLflow params and logs: name, revision, digest."""
        parts = [self.name]
        if self.revision:
            parts.append(f"revision {self.revision}")
        if self.sha256:
            parts.append(f"sha256 {self.sha256}")
        return "; ".join(parts)


def split_digest(value: str) -> tuple[str, str | None]:
    """('name', 'hex') from 'name#sha256=hex'; ('name', None) without a digest."""
    name, sep, digest = str(value).partition("#sha256=")
    if not sep:
        return name, None
    digest = digest.lower()
    if not _SHA256.match(digest):
        raise WeightsError(f"{value}: #sha256= wants 64 hex digits")
    return name, digest


def resolve(value: str | Path, fetch: bool = False, want_file: bool = False) -> Resolved:
    """The local file or folder `value` names (the forms in the module docstring). `fetch`: the
    driver's call, which may download; otherwise only what is on disk or in the Hub cache is used.
    `want_file`: a folder is narrowed to its weights file (a timm backbone loads one file)."""
    name, digest = split_digest(str(value))
    local = Path(name).expanduser()
    if name in PACKAGED:
        found = Resolved(packaged_path(name), name, "package")
    elif local.exists():
        found = Resolved(local, name, "local")
    elif name.startswith(S3):
        found = _from_s3(name)
    elif name.startswith(TORCHVISION):
        found = _from_torchvision(name, fetch)
    elif name.startswith(HF_HUB):
        found = _from_hub(name, name[len(HF_HUB) :], "timm-hub", fetch)
    elif _HUB_ID.match(name.split("@", 1)[0]):
        found = _from_hub(name, name, "transformers-hub", fetch)
    else:
        raise WeightsError(
            f"{name}: no such local file or folder, and not a Hub name (hf-hub:ORG/NAME for timm, "
            f"ORG/NAME for transformers) or a packaged alias ({', '.join(sorted(PACKAGED))})"
        )
    if want_file and found.path.is_dir():
        found = Resolved(weights_file(found.path, name), found.name, found.source, found.revision)
    if digest is not None:
        actual = sha256_of(weights_file(found.path, name) if found.path.is_dir() else found.path)
        if actual != digest:
            raise WeightsError(f"{name}: sha256 {actual}, but the config asks for {digest}")
        found = Resolved(found.path, found.name, found.source, found.revision, actual)
    return found


def weights_file(folder: Path, name: str) -> Path:
    """The weights file of a model folder (safetensors first, as the loaders prefer it)."""
    for candidate in WEIGHT_FILES:
        if (folder / candidate).is_file():
            return folder / candidate
    raise WeightsError(f"{name}: {folder} holds none of {', '.join(WEIGHT_FILES)}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_cache() -> Path:
    """Where downloaded weights land (and resume from): RSRAY_WEIGHTS_CACHE, else ~/.cache/rsray/weights."""
    folder = Path(os.environ.get("RSRAY_WEIGHTS_CACHE") or Path.home() / ".cache" / "rsray" / "weights")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _from_s3(value: str) -> Resolved:
    """An s3:// weights file, copied once per machine into the download cache (module docstring)."""

    from filelock import FileLock

    from rsray import storage

    if not value.endswith(WEIGHT_SUFFIXES):
        raise WeightsError(f"{value}: an s3:// weights value names one file ({', '.join(WEIGHT_SUFFIXES)})")
    loc = storage.resolve(value)
    info = storage.reading(lambda: loc.fs.get_file_info(loc.path), f"read {value}")
    if info.size is None:
        raise WeightsError(f"{value}: no such object")
    local = download_cache() / "s3" / loc.path
    local.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{local}.lock"):
        if not (local.is_file() and local.stat().st_size == info.size):
            log.info("%s: copying %.1f MB to %s", value, info.size / 1e6, local)
            part = local.with_name(local.name + ".part")
            storage.download(loc, part)
            part.replace(local)
    return Resolved(local, value, "s3")


def _from_torchvision(value: str, fetch: bool) -> Resolved:
    """A torchvision weights enum member's file, where torch.hub keeps it (a timm ResNet has
    torchvision's parameter names, so its file loads as a timm backbone's)."""
    from urllib.parse import urlparse

    import torch.hub
    from torchvision.models import get_weight

    try:
        weights = get_weight(value[len(TORCHVISION) :])
    except (ValueError, KeyError) as exc:
        raise WeightsError(
            f"{value}: not a torchvision weights name, e.g. torchvision:ResNet50_Weights.IMAGENET1K_V1 ({exc})"
        ) from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if not path.is_file():
        if not fetch:
            raise WeightsError(f"{value}: not in torch's hub cache ({path.parent}) and not fetched on this machine")
        path.parent.mkdir(parents=True, exist_ok=True)
        found = torch.hub.HASH_REGEX.search(path.name)
        log.info("%s: downloading %s", value, weights.url)
        try:
            torch.hub.download_url_to_file(weights.url, str(path), hash_prefix=found.group(1) if found else None)
        except (OSError, RuntimeError) as exc:  # unreachable, or the digest prefix did not match
            raise WeightsError(f"{value}: {weights.url}: {str(exc).splitlines()[0]}") from None
    return Resolved(path, value, "torchvision")


def _from_hub(value: str, repo: str, source: str, fetch: bool) -> Resolved:
    """A Hub repo through huggingface_hub's cache: timm's weights file, or a transformers folder.
    Without `fetch`, or with HF_HUB_OFFLINE set, nothing is downloaded."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = repo.partition("@")
    patterns = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"] if source == "transformers-hub" else None
    patterns = patterns or ["*.json", *WEIGHT_FILES]
    try:
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision or None,
                allow_patterns=patterns,
                local_files_only=not fetch or constants.HF_HUB_OFFLINE,
            )
        )
    except LocalEntryNotFoundError:  # also an incomplete snapshot
        where = "offline (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else "not fetched on this machine"
        raise WeightsError(
            f"{value}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {where}; "
            "fetch it where the Hub is reachable, or point HF_HOME at a cache that holds it"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise WeightsError(f"{value}: the Hub refused or could not be reached: {str(exc).splitlines()[0]}") from None
    path = weights_file(folder, value) if source == "timm-hub" else folder
    return Resolved(path, value, source, revision=folder.name)


def fetch_all(section: Mapping[str, Any], prefix: str = "model") -> dict[str, Resolved]:
    """The driver's call before any worker starts: every initial-weights value of a model config
    section (keys ending in `checkpoint`, nested sections too) resolved with `fetch=True`, so Hub
    names are in this machine's cache and digests are checked once. {'model.text_checkpoint':
    Resolved}. `train` (an earlier stage rsray trains first) and URIs other than an s3:// weights
    file (an s3:// checkpoint folder of an earlier stage) are left to their own code."""
    found: dict[str, Resolved] = {}
    for key, value in section.items():
        where = f"{prefix}.{key}"
        if isinstance(value, Mapping):
            found.update(fetch_all(value, where))
        elif key.endswith("checkpoint") and isinstance(value, str) and value and value != "train":
            if "://" not in value or (value.startswith(S3) and split_digest(value)[0].endswith(WEIGHT_SUFFIXES)):
                try:
                    found[where] = resolve(value, fetch=True, want_file=key == "backbone_checkpoint")
                except WeightsError as exc:
                    exc.key = where
                    raise
    return found
