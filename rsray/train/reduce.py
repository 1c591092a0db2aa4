"""Per-epoch numbers agreed across the DDP workers: mean losses, summed pairs, the slowest worker's
seconds, and how many Ray nodes the group spans. Each is one collective on the worker's device; in
one process (or a group of one) the values come back as they are."""

from __future__ import annotations

import torch


def _group_size() -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def mean_across_workers(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value averaged over the workers (every worker gets the same dict)."""
    import torch.distributed as dist

    if _group_size() == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist(), strict=True))


def reduce_across_workers(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """Each value summed (op "sum") or maximised (op "max") over the workers."""
    import torch.distributed as dist

    if _group_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor.tolist()


def nodes_of_workers(world_size: int) -> int:
    """How many Ray nodes the worker group runs on, from each worker's own node id (gathered)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world_size < 2 or not torch.distributed.is_initialized():
        return 1
    nodes: list[str | None] = [None] * world_size
    torch.distributed.all_gather_object(nodes, node)
    return len(set(nodes))
