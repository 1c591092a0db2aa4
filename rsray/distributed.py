"""Cross-worker gathering for contrastive losses (open_clip style).

With DDP on N workers each worker holds a local batch of B pairs. A contrastive loss computed on
the local B x B matrix sees B - 1 negatives per query; gathering every worker's embeddings first
gives each query N*B - 1 negatives, which is what makes large-batch contrastive training work.
`gather_with_grad` concatenates the embeddings of all workers in rank order and keeps the
autograd graph: the backward pass sends each worker the gradient that every worker's loss puts
on its rows (the backward of torch's functional all_gather is a summing reduce-scatter), and DDP
then averages as usual.

Used by the InfoNCE models (PriorCLIP, CLIP). Triplet models (VSE++, SWAN, DOVE) stay per-worker:
their hardest-negative mining is defined on the local batch in the papers.

Outside a process group (one process, tests, evaluation) every function returns its input.
"""

from __future__ import annotations

import torch


def world_size() -> int:
    """Workers in the default process group; 1 when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """[B, ...] on every worker -> [world * B, ...] in rank order, differentiable w.r.t. the local rows.

    Every worker must pass the same shape (Ray Train's shards are read with drop_last=True)."""
    if world_size() == 1:
        return tensor
    import torch.distributed as dist
    from torch.distributed import _functional_collectives as functional  # torch's successor to dist.nn's

    return functional.wait_tensor(functional.all_gather_single(tensor.contiguous(), 0, dist.group.WORLD))


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """As `gather_with_grad` for labels and ids (no gradient): [B, ...] -> [world * B, ...]."""
    if world_size() == 1:
        return tensor
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)
