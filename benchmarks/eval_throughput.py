"""Benchmark: the evaluator on an RSICD-sized test set and on a gallery too large for its full matrix.

1. RSICD test size, 1,093 images x 5,465 captions: `retrieval_metrics` on the full matrix (R@K,
   ranks, SR@K with 30 random scenes, 8% of images without one), then SMR + the same again.
2. Large: 20,000 images x 100,000 captions from random 512-d L2-normalised embeddings (captions
   are noisy copies of their image's embedding, so the recalls are not all zero), scored with
   `streaming_topk` (k=10) and `metrics_from_topk`: the 8 GB float32 matrix is never held.

Prints wall time and peak memory: tracemalloc (Python-level allocations only: torch's tensor
memory is not traced), the process's peak RSS (ru_maxrss, a high-water mark over the whole run,
so the large part's figure includes everything before it) and, on a GPU,
torch.cuda.max_memory_allocated per part. The large part prints a projection after its first
strip of images, so a slow machine can be stopped early and shrunk with --large-images /
--large-captions. Usage:

    python -m benchmarks.eval_throughput [--device cuda] [--large-images 20000 --large-captions 100000]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from rsray.eval.metrics import caption_to_image, retrieval_metrics
from rsray.eval.rerank import smr_rerank
from rsray.eval.scoring import metrics_from_topk, num_rows, score_block, streaming_topk, take_rows


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@contextmanager
def measured(label: str, device: torch.device) -> Iterator[None]:
    """Print wall time and peak memory of the block."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tracemalloc.start()
    started = time.perf_counter()
    yield
    sync(device)
    seconds = time.perf_counter() - started
    _, python_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    gpu = f", GPU peak {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB" if device.type == "cuda" else ""
    print(
        f"  {label:<44} {seconds:8.2f} s   tracemalloc peak {python_peak / 2**20:6.1f} MiB, "
        f"process peak RSS {peak_rss_mb():,.0f} MiB{gpu}"
    )


def embeddings(
    n_images: int, captions_per_image: int, dim: int, device: torch.device, seed: int, noise: float = 9.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image embeddings and captions = their image's embedding plus noise (of norm
    about `noise`: a caption's cosine with its image is then about 1 / sqrt(1 + noise**2))."""
    g = torch.Generator(device=device).manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=g, device=device), dim=1)
    texts = torch.empty(n_images * captions_per_image, dim, device=device)
    step = 8192
    for start in range(0, len(texts), step):  # in chunks: no second full-size temporary
        rows = torch.arange(start, min(start + step, len(texts)), device=device)
        noisy = (
            images[rows // captions_per_image]
            + noise * torch.randn(len(rows), dim, generator=g, device=device) / dim**0.5
        )
        texts[start : start + len(rows)] = torch.nn.functional.normalize(noisy, dim=1)
    return images, texts


def rsicd_part(device: torch.device, repeats: int, seed: int) -> None:
    n_images, cpi = 1093, 5
    images, texts = embeddings(n_images, cpi, 512, device, seed)
    S = images @ texts.t()
    ci = caption_to_image(n_images, cpi, device)
    g = torch.Generator().manual_seed(seed)
    names = [f"scene{i}" for i in range(30)]
    scenes = [
        None if torch.rand((), generator=g) < 0.08 else names[int(torch.randint(30, (), generator=g))]
        for _ in range(n_images)
    ]
    print(f"\nRSICD-sized: {n_images} x {n_images * cpi} matrix on {device}, {repeats} timed runs after a warm-up")
    retrieval_metrics(S, ci, scenes)  # warm-up (first calls of each kernel)
    for label, fn in (
        ("full metrics + SR@K", lambda: retrieval_metrics(S, ci, scenes)),
        ("SMR (K=30) + full metrics + SR@K", lambda: retrieval_metrics(smr_rerank(S), ci, scenes)),
        ("SMR alone", lambda: smr_rerank(S)),
    ):
        times = []
        for _ in range(repeats):
            sync(device)
            started = time.perf_counter()
            out = fn()
            sync(device)
            times.append(time.perf_counter() - started)
        print(f"  {label:<44} median {statistics.median(times):.3f} s  (min {min(times):.3f}, max {max(times):.3f})")
        if isinstance(out, dict):
            print("    " + "  ".join(f"{k} {v:.2f}" for k, v in out.items() if "R" in k))
    with measured("peak memory of SMR + full metrics + SR@K", device):
        retrieval_metrics(smr_rerank(S), ci, scenes)


def large_part(device: torch.device, n_images: int, n_captions: int, dim: int, k: int, block: int, seed: int) -> None:
    if n_captions % n_images:
        raise SystemExit(f"--large-captions ({n_captions}) must be a multiple of --large-images ({n_images})")
    cpi = n_captions // n_images
    images, texts = embeddings(n_images, cpi, dim, device, seed + 1)
    ci = caption_to_image(n_images, cpi, device)
    full_gb = n_images * n_captions * 4 / 1e9
    print(
        f"\nlarge: {n_images:,} images x {n_captions:,} captions, {dim}-d, k={k}, blocks of {block}, on {device} "
        f"(the full float32 matrix would be {full_gb:,.1f} GB)"
    )
    print(
        f"  peak RSS before this part: {peak_rss_mb():,.0f} MiB "
        f"(embeddings {(images.numel() + texts.numel()) * 4 / 2**20:,.0f} MiB)"
    )

    # projection: time the first strip of `block` images against every caption, the way streaming_topk works
    sync(device)
    started = time.perf_counter()
    strip = take_rows(images, 0, block)
    for t0 in range(0, n_captions, block):
        scores = score_block(None, strip, take_rows(texts, t0, t0 + block))
        scores.topk(min(k, scores.shape[1]), dim=1)
        scores.t().topk(min(k, scores.shape[0]), dim=1)
    sync(device)
    strip_s, strips = time.perf_counter() - started, -(-num_rows(images) // block)
    print(
        f"  first strip of {block} images (matrix products + plain topk only): {strip_s:.2f} s -> "
        f"projected at least {strips * strip_s:.0f} s for {strips} strips"
    )

    with measured("streaming_topk + metrics_from_topk", device):
        _, i2t_idx, _, t2i_idx = streaming_topk(None, images, texts, k=k, block=block)
        metrics = metrics_from_topk(i2t_idx, t2i_idx, ci, ks=(1, 5, 10) if k >= 10 else (1, k))
    print("    " + "  ".join(f"{key} {value:.2f}" for key, value in metrics.items()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--large-images", type=int, default=20_000)
    parser.add_argument("--large-captions", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--block", type=int, default=4096, help="streaming block (images and captions)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the RSICD-sized part")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="one RSICD-sized run, a small 'large' part (make test)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats, args.large_images, args.large_captions, args.dim, args.block = 1, 300, 1500, 32, 256
    device = torch.device(args.device)
    print(
        f"eval benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f"; process peak RSS after imports {peak_rss_mb():,.0f} MiB"
    )
    with torch.no_grad():
        rsicd_part(device, args.repeats, args.seed)
        if not args.skip_large:
            large_part(device, args.large_images, args.large_captions, args.dim, args.k, args.block, args.seed)


if __name__ == "__main__":
    main()
