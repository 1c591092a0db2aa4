"""Dataset statistics: what `rsray data inspect` prints before anyone spends time on training."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from rsray.data.formats import SPLITS, Record
from rsray.data.text import build_vocabulary, words


def dataset_statistics(
    records: Sequence[Record], vocab_splits: Sequence[str] = ("train",), vocab_min_count: int = 5
) -> dict[str, Any]:
    """Counts per split, images per scene, caption lengths in words and the word-vocabulary size."""
    present = {r.split for r in records}
    order = [s for s in SPLITS if s in present] + sorted(present - set(SPLITS))
    splits = {s: {"images": 0, "captions": 0} for s in order}
    for r in records:
        splits[r.split]["images"] += 1
        splits[r.split]["captions"] += len(r.captions)
    scenes = Counter(r.scene for r in records if r.scene is not None)
    lengths = np.array([len(words(c)) for r in records for c in r.captions], dtype=np.int64)
    if lengths.size:
        caption_length = {
            "min": int(lengths.min()),
            "max": int(lengths.max()),
            "mean": round(float(lengths.mean()), 2),
            "median": float(np.median(lengths)),
            "p95": float(np.percentile(lengths, 95)),
        }
    else:
        caption_length = {"min": 0, "max": 0, "mean": 0.0, "median": 0.0, "p95": 0.0}
    vocab = build_vocabulary(records, splits=vocab_splits, min_count=vocab_min_count)
    return {
        "splits": splits,
        "scenes": dict(sorted(scenes.items())),
        "images_without_scene": sum(r.scene is None for r in records),
        "caption_length": caption_length,
        "vocab_size": len(vocab),
        "vocab_splits": list(vocab_splits),
        "vocab_min_count": vocab_min_count,
    }


def format_statistics(stats: dict[str, Any]) -> str:
    """The statistics as a small text report for a terminal. Sections whose keys are missing are
    left out, so the smaller dict read back from a prepared manifest prints too."""
    lines = []
    if stats.get("dataset"):
        lines.append(f"dataset: {stats['dataset']}  ({stats.get('source', '')})")
    if stats.get("validation"):
        lines.append(f"validation: {stats['validation']}")
    lines += ["" if lines else None, f"{'split':<8}{'images':>10}{'captions':>10}"]
    lines = [line for line in lines if line is not None]
    total_images = total_captions = 0
    for split, n in stats.get("splits", {}).items():
        lines.append(f"{split:<8}{n['images']:>10,}{n['captions']:>10,}")
        total_images += n["images"]
        total_captions += n["captions"]
    lines.append(f"{'total':<8}{total_images:>10,}{total_captions:>10,}")
    if stats.get("rejected") is not None:
        lines.append(f"rejected images: {stats['rejected']:,}")

    scenes = stats.get("scenes") or {}
    without = stats.get("images_without_scene")
    lines += ["", f"scenes: {len(scenes)}" + (f" ({without:,} images without a scene)" if without is not None else "")]
    if scenes:
        width = max(len(str(s)) for s in scenes)
        lines += [f"  {name!s:<{width}}  {count:>6,}" for name, count in scenes.items()]

    cl = stats.get("caption_length")
    if cl:
        lines += [
            "",
            f"caption length (words): min {cl['min']}  median {cl['median']:g}  mean {cl['mean']:.2f}  "
            f"p95 {cl['p95']:g}  max {cl['max']}",
        ]
    if stats.get("vocab_size") is not None:
        recipe = ""
        if "vocab_splits" in stats:
            recipe = f" (splits {'+'.join(stats['vocab_splits'])}, min count {stats.get('vocab_min_count', '?')})"
        lines.append(f"word vocabulary: {stats['vocab_size']:,} entries incl. <pad> and <unk>{recipe}")
    return "\n".join(lines)
