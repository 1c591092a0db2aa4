"""CMPAGL's momentum encoder and feature queue (ALBEF's ITC machinery; the paper names a "momentum
encoder" and nothing more, cmpagl.md §2).

- `MomentumCopy`: no-grad copies of some modules, always in eval mode, moved towards the online
  weights after each step: m <- momentum * m + (1 - momentum) * online (`torch._foreach_lerp_`).
  Its parameters never reach the optimizer (no gradient) and are identical on every worker, since
  the online weights are (DDP) and the update is deterministic.
- `FeatureQueue`: a ring of the last Q momentum image and text embeddings with their image ids.
  Each step's momentum features are gathered from all workers (rank order) before they enter, so
  the queue is the same on every worker without sending it anywhere; its buffers (and the pointer)
  are in the state dict, so a resumed run continues with its queue.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from rsray.distributed import gather_no_grad


class MomentumCopy(nn.Module):
    """EMA copies of named modules (`copies[name]`), updated by `update(online)`."""

    def __init__(self, modules: dict[str, nn.Module], momentum: float):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.copies = nn.ModuleDict({name: copy.deepcopy(module) for name, module in modules.items()})
        self.copies.requires_grad_(False)
        self.copies.eval()

    def train(self, mode: bool = True) -> MomentumCopy:
        return super().train(False)  # dropout off in the teacher, whatever the model's mode

    @torch.no_grad()
    def update(self, online: dict[str, nn.Module]) -> None:
        """m <- momentum * m + (1 - momentum) * online, for every parameter of every copy."""
        own = [p for name in self.copies for p in self.copies[name].parameters()]
        theirs = [p.detach() for name in self.copies for p in online[name].parameters()]
        if len(own) != len(theirs):
            raise ValueError(f"momentum copy has {len(own)} parameters, the online modules {len(theirs)}")
        torch._foreach_lerp_(own, theirs, 1.0 - self.momentum)

    def forward(self, name: str, *args, **kwargs):
        return self.copies[name](*args, **kwargs)


class FeatureQueue(nn.Module):
    """The last `size` momentum embeddings (image and text) and image ids, as a ring buffer."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.size = size
        self.register_buffer("image", torch.zeros(size, dim))
        self.register_buffer("text", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))  # entries ever written, capped at size

    @torch.no_grad()
    def enqueue(self, image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor) -> None:
        """Write every worker's rows (gathered in rank order) at the pointer, wrapping around."""
        image, text, ids = gather_no_grad(image.detach()), gather_no_grad(text.detach()), gather_no_grad(ids)
        n = ids.shape[0]
        if n > self.size:
            raise ValueError(f"queue of {self.size} cannot take {n} rows in one step (queue_size >= workers x batch)")
        slots = (self.ptr + torch.arange(n, device=ids.device)) % self.size
        self.image[slots] = image.to(self.image.dtype)
        self.text[slots] = text.to(self.text.dtype)
        self.ids[slots] = ids
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))

    def contents(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image [F, D], text [F, D], ids [F]) of the filled slots, cloned: a later in-place enqueue
        must not touch tensors the current loss saved for backward."""
        n = int(self.filled)
        return self.image[:n].clone(), self.text[:n].clone(), self.ids[:n].clone()
