"""`rsray data inspect TARGET [--json]`: dataset statistics to check against the papers, no images needed.
`rsray data verify PREPARED`: every shard of a prepared output against its manifest (sizes, sha256).

TARGET is a dataset config (YAML or a conf/ name), an annotation folder (format detected), or a
prepared output with manifest.json (local or s3://). Overrides such as
`data.vocab_splits=[train,test]` apply as in every stage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rsray.cli import run_cli, setup_logging, stage_parser
from rsray.config import CONF_DIR, load_config


def inspect_target(target: str, overrides: list[str]) -> dict:
    from rsray.data.detect import detect_data_config
    from rsray.data.formats import read_records
    from rsray.data.stats import dataset_statistics

    if target.startswith("s3://") or (Path(target) / "manifest.json").is_file():
        cfg = load_config(None, overrides)
        return manifest_statistics(target, cfg.prepare.s3_endpoint)
    if (
        not Path(target).exists()
        and not Path(target).with_suffix(".yaml").exists()
        and not (CONF_DIR / target).with_suffix(".yaml").exists()
    ):
        raise FileNotFoundError(f"{target}: no such dataset folder, prepared output or config")
    if Path(target).is_dir():
        found = detect_data_config(target)
        detected = [
            f"data.{key}={getattr(found, key)}" for key in ("root", "format", "annotations", "eval_annotations")
        ]
        detected.append(f"data.name={Path(target).resolve().name}")
        if not any(o.startswith("data.validation") for o in overrides) and _has_val_split(detected):
            detected.append("data.validation.mode=fixed")  # show the files' own split as given
        cfg = load_config(None, [*detected, *overrides])
    else:
        cfg = load_config(target, overrides)
    records = read_records(cfg.data, cfg.prepare.s3_endpoint)
    stats = dataset_statistics(
        records, vocab_splits=tuple(cfg.data.vocab_splits), vocab_min_count=cfg.data.vocab_min_count
    )
    v = cfg.data.validation
    validation = "fixed (from the annotations)" if v.mode == "fixed" else f"fold {v.fold} of {v.folds}, seed {v.seed}"
    return {"dataset": cfg.data.name, "source": str(target), "validation": validation, **stats}


def _has_val_split(detected: list[str]) -> bool:
    """Whether the detected annotations carry a validation split of their own."""
    from rsray.data.formats import read_records

    cfg = load_config(None, [*detected, "data.validation.mode=fixed"])
    try:
        read_records(cfg.data, cfg.prepare.s3_endpoint)
    except ValueError:  # fixed mode without a val split
        return False
    return True


def manifest_statistics(uri: str, s3_endpoint: str | None) -> dict:
    """The same keys as for annotations, read from a prepared output's manifest."""
    from rsray.data.manifest import read_manifest

    m = read_manifest(uri, s3_endpoint)
    return {
        "dataset": m["dataset"],
        "source": uri,
        "splits": {k: {"images": v["images"], "captions": v["captions"]} for k, v in m["splits"].items()},
        "scenes": m["scenes"],
        "vocab_size": len(m["vocab"]["words"]) if "words" in m["vocab"] else None,
        "counts": m["counts"],
        "rejected": m["counts"]["rejected"],
        "image_size": m["image_size"],
    }


def verify(target: str, overrides: list[str]) -> int:
    from rsray.data.manifest import SPLITS
    from rsray.data.verify import verify_prepared

    cfg = load_config(None, overrides)
    checked = verify_prepared(target, cfg.prepare.s3_endpoint, checksum_splits=SPLITS)
    print(f"{target}: {checked.files} shard files, {checked.bytes / 1e6:.1f} MB, sizes and sha256 as in the manifest")
    return 0


def main(argv=None) -> int:
    parser = stage_parser(
        "rsray data",
        "Dataset tools. `rsray data inspect TARGET [--json] [key=value ...]` "
        "prints records and captions per split, scenes and their counts, caption "
        "lengths and the vocabulary size under the reference recipe. "
        "`rsray data verify PREPARED [prepare.s3_endpoint=...]` checks that every shard file the "
        "manifest lists is there with its size and sha256 (exit 3 naming the first that is not).",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ns = parser.parse_intermixed_args(argv)
    setup_logging(ns.verbose, "data")
    if not ns.args or ns.args[0] not in ("inspect", "verify") or len(ns.args) < 2:
        parser.error("usage: rsray data inspect TARGET [--json] [key=value ...] | rsray data verify PREPARED")
    target, overrides = ns.args[1], ns.args[2:]
    if ns.args[0] == "verify":
        return run_cli(lambda: verify(target, overrides))

    def show() -> int:
        from rsray.data.stats import format_statistics

        stats = inspect_target(target, overrides)
        print(json.dumps(stats, indent=1) if ns.json else format_statistics(stats))
        return 0

    return run_cli(show)


if __name__ == "__main__":
    sys.exit(main())
