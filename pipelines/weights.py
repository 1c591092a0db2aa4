"""`rsray weights list | fetch | verify`: the initial weights each model and paper starts from, and
getting them to a cluster that cannot download (rsray.weights_catalog, rsray.weights_fetch)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from rsray.cli import command_parser, run_cli, setup_logging


def list_weights(as_json: bool) -> int:
    from rsray.weights_catalog import CATALOG

    if as_json:
        print(json.dumps([asdict(entry) for entry in CATALOG], indent=1))
        return 0
    for entry in CATALOG:
        print(f"{entry.name}: {entry.what}")
        print(f"  used by:  {entry.used_by}")
        print(f"  hub name: {entry.hub or '-'}")
        print(
            f"  download: {entry.url or '-'}" + (f" (sha256 {entry.sha256_prefix}...)" if entry.sha256_prefix else "")
        )
        if entry.convert:
            print(f"  convert:  --convert {entry.convert}")
        print(f"  facts:    {entry.facts}")
    return 0


def verify(value: str) -> int:
    """What `value` resolves to on this machine (no download) and its sha256, against the
    catalog's digest where it knows one; a `#sha256=` in `value` is checked by resolve itself."""
    from rsray.weights import WeightsError, resolve, sha256_of, weights_file
    from rsray.weights_catalog import known

    found = resolve(value)
    file = weights_file(found.path, found.name) if found.path.is_dir() else found.path
    digest = found.sha256 or sha256_of(file)
    entry = known(found.name)
    if entry is not None and not digest.startswith(entry.sha256_prefix):
        raise WeightsError(f"{value}: sha256 {digest}, but {entry.name}'s starts {entry.sha256_prefix}")
    print(f"{found.name}: {file} ({found.source}{', revision ' + found.revision if found.revision else ''})")
    print(f"sha256 {digest}: pin it with {found.name}#sha256={digest}")
    return 0


def fetch(source: str, to: str, sha256: str | None, convert: str | None) -> int:
    from rsray.weights_fetch import fetch as fetch_weights

    done = fetch_weights(source, to, sha256, convert)
    pin = f"#sha256={done.sha256}" if done.sha256 else ""
    print(f"{done.source} -> {done.path} ({done.bytes / 1e6:.1f} MB; record {done.path}.json)")
    print(f"name it in a config as {done.path}{pin}")
    return 0


def main(argv=None) -> int:
    parser = command_parser(
        "rsray weights",
        "The initial weights each model, paper and release starts from. `list` shows them "
        "with their Hub names, downloads and the facts behind them; `fetch SOURCE --to DIR|s3://...` "
        "downloads one (a catalog name, an http(s) URL or a Hub name) with resume, checks its sha256, "
        "converts it if asked and writes it with a .json record where a cluster reads it; `verify "
        "VALUE` resolves a config value on this machine without downloading and prints its sha256.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="what each model and paper starts from")
    listing.add_argument("--json", action="store_true", help="one JSON list instead of text")
    fetching = commands.add_parser("fetch", help="download, check and place one set of weights")
    fetching.add_argument("source", help="a catalog name (rsray weights list), an http(s) URL or a Hub name")
    fetching.add_argument("--to", required=True, metavar="DIR|s3://BUCKET/PREFIX", help="where to put it")
    fetching.add_argument("--sha256", metavar="HEX", help="the digest the file must have")
    fetching.add_argument("--convert", choices=["timm-swin"], help="rewrite Microsoft's Swin layout as timm's")
    verifying = commands.add_parser("verify", help="resolve a config value here and print its sha256")
    verifying.add_argument("value", help="a path, hf-hub:ORG/NAME, ORG/NAME or a packaged alias, maybe #sha256=...")
    ns = parser.parse_args(argv)
    setup_logging(ns.verbose, "weights")
    if ns.command == "list":
        return run_cli(lambda: list_weights(ns.json))
    if ns.command == "verify":
        return run_cli(lambda: verify(ns.value))
    return run_cli(lambda: fetch(ns.source, ns.to, ns.sha256, ns.convert))


if __name__ == "__main__":
    sys.exit(main())
