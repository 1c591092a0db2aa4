"""Benchmark: the Ray Data prepare stage against a plain single-process loop doing the same work.

Both read the same annotation records and run the same per-batch function (read file, decode,
validate, resize, re-encode, tokenize) and write Parquet; the plain loop does it in one process.
Ray start-up is excluded (a cluster is started once per job, not per stage); the stage's own
actor start-up, scheduling and shard listing are included. Prints images/s for
both and the ratio. Usage:

    python -m benchmarks.prepare_throughput --images 5000 --size 256 [--out-size 224]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def plain_loop(cfg, out_dir: Path) -> int:
    """The same per-batch work as the Ray stage, in one process, one batch after another."""
    from rsray.data.formats import read_records
    from rsray.data.prepare import ImageBatchProcessor, _record_row
    from rsray.data.text import build_vocabulary

    records = read_records(cfg.data)
    vocab = build_vocabulary(records, splits=tuple(cfg.data.vocab_splits), min_count=cfg.data.vocab_min_count)
    process = ImageBatchProcessor(cfg.prepare.image_size, cfg.prepare.image_encoding, cfg.prepare.jpeg_quality,
                                  vocab.to_dict(), None, None)
    rows = pa.Table.from_pylist([_record_row(r) for r in records])
    tables = [process(rows.slice(start, 32)) for start in range(0, rows.num_rows, 32)]
    table = pa.concat_tables(tables)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        part = table.filter(pa.compute.equal(table["split"], split))
        pq.write_table(part, out_dir / f"{split}.parquet")
    return table.num_rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="generated images (default 5000)")
    parser.add_argument("--size", type=int, default=256, help="generated image size in px (default 256)")
    parser.add_argument("--out-size", type=int, default=224, help="prepared image size in px (default 224)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "rsray-bench"))
    args = parser.parse_args(argv)

    from rsray.cli import setup_logging
    from rsray.config import load_config
    from rsray.data.prepare import prepare
    from rsray.data.synthetic import generate_sample
    from rsray.runtime import ensure_ray

    setup_logging()
    work = Path(args.workdir)
    root = work / f"sample-{args.images}-{args.size}"
    generate_sample(root, n_images=args.images, image_size=args.size, seed=0)
    cfg = load_config("presets/sample", [f"data.root={root}", f"prepare.image_size={args.out_size}",
                                         f"prepare.output={work / 'ray-out'}"])

    started = time.perf_counter()
    n_plain = plain_loop(cfg, work / "plain-out")
    plain_s = time.perf_counter() - started

    ensure_ray()
    started = time.perf_counter()
    result = prepare(cfg, force=True)
    ray_s = time.perf_counter() - started
    n_ray = result.manifest["counts"]["written"]

    plain_rate, ray_rate = n_plain / plain_s, n_ray / ray_s
    print(f"\nprepare benchmark: {args.images} images {args.size}px -> {args.out_size}px {cfg.prepare.image_encoding}, "
          f"{os.cpu_count()} cores")
    print(f"  plain single-process loop : {plain_rate:8.1f} images/s  ({plain_s:.1f}s)")
    print(f"  Ray Data prepare stage    : {ray_rate:8.1f} images/s  ({ray_s:.1f}s)")
    print(f"  ratio (Ray / plain)       : {ray_rate / plain_rate:8.2f}x")


if __name__ == "__main__":
    main()
