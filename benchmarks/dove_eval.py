"""Benchmark: DOVE's pairwise score over an RSICD-sized test set, through the evaluation's own path.

DOVE's caption embedding depends on the image (IGA), so the test matrix of 1,093 images x 5,465
captions cannot be one matrix product: every pair runs the text head. Holding every pair's
512-d caption embedding at once would take n_img x n_txt x 512 x 4 bytes = 12.2 GB; the
evaluation instead calls `score_matrix` (blocks of images x captions) and DOVE's `score` works
in chunks of `score_chunk_pairs` pairs.

What runs: the paper config (`conf/model/dove.yaml`: 512-d, mlp heads 512 -> 1024 -> 512) in eval
mode, on random features shaped as its encoders produce them (the encoders are not the point):
image features in batches of 64, caption features in batches of 256 each padded to its longest
caption and joined with `concat_rows`, exactly as evaluation joins them. Caption lengths are the
real RSICD test captions' word counts (content words, as the vocabulary counts them) when
`../shared/datasets/rsicd_captions/test_caps.txt` exists, else drawn from 4..9. Then
`score_matrix` + `retrieval_metrics` (what `rsray evaluate` does), and with --stream
`streaming_topk` + `metrics_from_topk` as well. Features are random and so are the heads, so the
metrics are at chance level: they show the path runs end to end, not how DOVE ranks.

Prints wall time and peak memory (process peak RSS; tracemalloc for Python-level allocations).

    python -m benchmarks.dove_eval [--heads mlp,mlp] [--chunk-pairs 16384] [--block 1024] [--stream] [--smoke]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.eval_throughput import measured, peak_rss_mb
from rsray.config import load_config
from rsray.data.loader import MAX_TOKENS
from rsray.data.text import content_words
from rsray.eval.metrics import caption_to_image, retrieval_metrics
from rsray.eval.scoring import concat_rows, metrics_from_topk, score_matrix, streaming_topk
from rsray.models import build_model
from rsray.models.dove import DoveImageFeatures, DoveTextFeatures

SHARED = Path(os.environ.get("RSRAY_SHARED_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
N_IMAGES, CAPTIONS_PER_IMAGE = 1093, 5


def caption_lengths(n: int, seed: int) -> tuple[torch.Tensor, str]:
    """Word counts of the real RSICD test captions, or a stand-in when the file is absent."""
    path = SHARED / "rsicd_captions" / "test_caps.txt"
    if path.is_file():
        counts = [min(max(len(content_words(line)), 1), MAX_TOKENS) for line in path.read_text().splitlines()]
        if len(counts) >= n:
            return torch.tensor(counts[:n]), f"real RSICD test captions ({path})"
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 10, (n,), generator=g), "drawn 4..9 (no RSICD caption file found)"


def random_features(model, n_images: int, lengths: torch.Tensor, seed: int, device: torch.device):
    """Image and caption features as DOVE's encoders return them, in evaluation-sized batches: random
    word features, and from them the model's own IGA keys and first text-head Linear (`encode_texts`)."""
    g = torch.Generator().manual_seed(seed)
    dim = model.config.embed_dim
    images = []
    for start in range(0, n_images, 64):
        n = min(64, n_images - start)
        images.append(
            DoveImageFeatures(F.normalize(torch.randn(n, dim, generator=g), dim=-1), torch.randn(n, dim, generator=g))
        )
    texts = []
    with torch.no_grad():
        for start in range(0, len(lengths), 256):
            part = lengths[start : start + 256]
            valid = torch.arange(int(part.max()))[None, :] < part[:, None]
            words = torch.randn(len(part), valid.shape[1], dim, generator=g) * valid.unsqueeze(-1)
            sentence = F.normalize(torch.randn(len(part), dim, generator=g), dim=-1)
            texts.append(DoveTextFeatures(valid, sentence, model.iga_key(words), model.text_head.first(words)))
    image_features, text_features = concat_rows(images), concat_rows(texts)
    return (
        DoveImageFeatures(*(t.to(device) for t in image_features)),
        DoveTextFeatures(*(t.to(device) for t in text_features)),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--heads", default="mlp,mlp", help="roam_heads: visual,text (linear|mlp each)")
    parser.add_argument("--chunk-pairs", type=int, default=None, help="score_chunk_pairs (default: the config's)")
    parser.add_argument("--block", type=int, default=1024, help="score_matrix block (images and captions)")
    parser.add_argument("--stream", action="store_true", help="also streaming_topk (k=10) + metrics_from_topk")
    parser.add_argument("--images", type=int, default=N_IMAGES, help="test images, 5 captions each (RSICD: 1,093)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="dove-tiny on 24 images, streaming too (make test)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.stream, args.block = 24, True, 32
    device = torch.device(args.device)
    overrides = [f"model.roam_heads=[{args.heads}]", "model.allow_random_frozen_backbone=true"]  # timing only
    if args.chunk_pairs is not None:
        overrides.append(f"model.score_chunk_pairs={args.chunk_pairs}")
    torch.manual_seed(args.seed)
    preset = "model/dove-tiny" if args.smoke else "model/dove"
    model = build_model(load_config(preset, overrides), vocab_size=1250).to(device).eval()
    cfg = model.config
    d, hidden = cfg.embed_dim, cfg.head_hidden if "mlp" in cfg.roam_heads[1] else cfg.embed_dim
    print(
        f"DOVE pairwise evaluation benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores, device {device}; roam_heads {cfg.roam_heads}, head_hidden {cfg.head_hidden}, "
        f"score_chunk_pairs {cfg.score_chunk_pairs}, block {args.block}"
    )

    n_images = args.images
    n_captions = n_images * CAPTIONS_PER_IMAGE
    lengths, source = caption_lengths(n_captions, args.seed)
    images, texts = random_features(model, n_images, lengths, args.seed, device)
    caption_image = caption_to_image(n_images, CAPTIONS_PER_IMAGE, device)
    feature_mb = sum(t.numel() * t.element_size() for t in (*images, *texts)) / 2**20
    print(
        f"  {n_images:,} images x {n_captions:,} captions; caption lengths {source}: mean "
        f"{lengths.float().mean():.2f}, max {int(lengths.max())} (words padded to {texts.valid.shape[1]})"
    )
    print(
        f"  features {feature_mb:,.0f} MiB; the full [n_img, n_txt, {d}] caption-embedding tensor would be "
        f"{n_images * n_captions * d * 4 / 2**30:,.1f} GiB; one chunk's head activations are about "
        f"{cfg.score_chunk_pairs * (2 * hidden + 2 * d) * 4 / 2**20:,.0f} MiB"
    )
    print(f"  peak RSS before scoring: {peak_rss_mb():,.0f} MiB")

    with torch.no_grad():
        with measured("score_matrix + retrieval_metrics", device):
            scores = score_matrix(model, images, texts, block=args.block)
            metrics = retrieval_metrics(scores.float(), caption_image)
        print("    " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
        pairs = n_images * n_captions
        if args.stream:
            with measured("streaming_topk (k=10) + metrics_from_topk", device):
                _, i2t_idx, _, t2i_idx = streaming_topk(model, images, texts, k=10, block=args.block)
                streamed = metrics_from_topk(i2t_idx, t2i_idx, caption_image)
            print("    " + "  ".join(f"{k} {v:.2f}" for k, v in streamed.items()))
            same = all(abs(streamed[k] - metrics[k]) < 1e-9 for k in streamed)
            print(f"    streamed R@K {'equal' if same else 'DIFFER FROM'} the full matrix's")
    print(f"  {pairs:,} pairs scored")


if __name__ == "__main__":
    main()
