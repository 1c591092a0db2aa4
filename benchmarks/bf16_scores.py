"""Benchmark: how far bf16 autocast moves the losses' gradients, with and without fp32 scores.

Embeddings of B matched (image, caption) pairs are drawn as noisy copies of shared vectors and
L2-normalised; under autocast they are rounded to bf16, as an encoder's output would be. Each
loss is computed three ways and its gradient on the embeddings compared with the fp32 one:
  bf16 scores   the similarity matrix as autocast computes it (bf16)
  fp32 scores   `full_precision_scores` (what the models use) on the same bf16 embeddings
Prints the loss and the gradient's relative error for each. `--device cuda` checks a GPU's bf16.

    python -m benchmarks.bf16_scores [--batch 256 --dim 512 --noise 2 4 --device cpu]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from rsray.losses import info_nce_loss, triplet_loss
from rsray.models.base import full_precision_scores

LOSSES = {
    "triplet, hardest negative": lambda s, ids: triplet_loss(s, ids, margin=0.2, max_violation=True),
    "triplet, all negatives": lambda s, ids: triplet_loss(s, ids, margin=0.2, max_violation=False),
    "InfoNCE, scale 14.3": lambda s, ids: info_nce_loss(s, 1 / 0.07, ids),
    "InfoNCE, scale 100": lambda s, ids: info_nce_loss(s, 100.0, ids),
}


def pairs(batch: int, dim: int, noise: float, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(batch, dim, generator=g)
    images = F.normalize(shared + noise * torch.randn(batch, dim, generator=g), dim=1)
    captions = F.normalize(shared + noise * torch.randn(batch, dim, generator=g), dim=1)
    return images.to(device), captions.to(device)


def loss_and_gradient(loss_fn, images, captions, mode: str) -> tuple[float, torch.Tensor]:
    """mode: fp32 (no autocast), bf16 (autocast's bf16 scores) or fp32-scores (bf16 embeddings)."""
    images, captions = images.clone().requires_grad_(True), captions.clone().requires_grad_(True)
    ids = torch.arange(images.shape[0], device=images.device)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=mode != "fp32"):
        a, b = (images, captions) if mode == "fp32" else (images.bfloat16(), captions.bfloat16())
        scores = full_precision_scores(a, b) if mode == "fp32-scores" else a @ b.t()
        loss = loss_fn(scores, ids)
    loss.float().backward()
    return loss.item(), torch.cat([images.grad, captions.grad])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="pairs in the batch")
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument(
        "--noise",
        type=float,
        nargs="+",
        default=[2.0, 4.0],
        help="noise around the shared vectors (larger: harder batch, larger loss)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="a batch of 16 of 32-d vectors, one noise (make test)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.dim, args.noise = 16, 32, [2.0]
    print(f"batch {args.batch}, dim {args.dim}, device {args.device}; gradient error = |g - g_fp32| / |g_fp32|")
    print(
        f"{'noise':>5}  {'loss':<26} {'fp32 loss':>10} {'bf16 loss':>10} {'bf16 grad err':>14} {'fp32-scores err':>16}"
    )
    for noise in args.noise:
        images, captions = pairs(args.batch, args.dim, noise, args.device)
        for name, loss_fn in LOSSES.items():
            reference, reference_grad = loss_and_gradient(loss_fn, images, captions, "fp32")
            bf16, bf16_grad = loss_and_gradient(loss_fn, images, captions, "bf16")
            _, kept_grad = loss_and_gradient(loss_fn, images, captions, "fp32-scores")
            norm = reference_grad.norm().clamp_min(1e-12)
            print(
                f"{noise:>5.1f}  {name:<26} {reference:>10.4f} {bf16:>10.4f} "
                f"{float((bf16_grad - reference_grad).norm() / norm):>13.1%} "
                f"{float((kept_grad - reference_grad).norm() / norm):>15.1%}"
            )


if __name__ == "__main__":
    main()
