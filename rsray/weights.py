"""Initial weights named as the ecosystem names them, resolved to a local file or folder.

A config value that names initial weights (`model.backbone_checkpoint`, `model.text_checkpoint`,
`model.clip.checkpoint`, ...) may be:

  /data/w/resnet50.pth      a local file or folder (a relative path that exists counts too)
  minilm                    an alias of weights shipped as a Python package (`rsray.pretrained`)
  hf-hub:ORG/NAME[@REV]     a timm model on the Hugging Face Hub: its weights file, as timm's own
                            hub loader reads it (model.safetensors, else pytorch_model.bin)
  ORG/NAME[@REV]            a transformers model on the Hub: its folder (config, weights, tokenizer)

and any of them may end in `#sha256=<64 hex digits>`: the weights file's digest must match (for a
folder, its model.safetensors or pytorch_model.bin), else the run is refused in one line.

Hub names go through `huggingface_hub` and its cache, as timm and transformers use them, so
HF_HUB_OFFLINE, HF_HOME, HF_HUB_CACHE and HF_TOKEN mean what they mean there. The driver resolves
them before any worker starts (`fetch=True`: downloads what the cache lacks, unless offline);
workers and model builders resolve with `fetch=False` and read the cache the driver filled, so a
run downloads once per machine, never once per worker. Each resolution records what it found
(`Resolved`: the name, the Hub revision it got, the file's sha256), which a run logs as MLflow
params (`weights/<key>`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsray.pretrained import PACKAGED, packaged_path

HF_HUB = "hf-hub:"
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
    source: str  # local | package | timm-hub | transformers-hub
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
    Resolved}. `train` (an earlier stage rsray trains first) and URIs are left to their own code."""
    found: dict[str, Resolved] = {}
    for key, value in section.items():
        where = f"{prefix}.{key}"
        if isinstance(value, Mapping):
            found.update(fetch_all(value, where))
        elif key.endswith("checkpoint") and isinstance(value, str) and value and value != "train":
            if "://" not in value:
                try:
                    found[where] = resolve(value, fetch=True, want_file=key == "backbone_checkpoint")
                except WeightsError as exc:
                    exc.key = where
                    raise
    return found
