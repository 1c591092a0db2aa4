"""Seeding and the RNG states a checkpoint carries, so a resumed run draws what an uninterrupted one
would have. States are plain tensors, ints and lists: what `torch.load(..., weights_only=True)` loads."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(*parts: int) -> None:
    """Seed Python's, NumPy's and torch's generators from `parts` (e.g. seed, rank, epoch) mixed by
    NumPy's SeedSequence, so nearby parts give unrelated streams."""
    seed = int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's RNG states: torch CPU, NumPy, Python, and on a CUDA `device` that device's
    own generator only. A Ray Train worker sees every GPU of its node; saving all of them
    (`get_rng_state_all`) made a checkpoint that a worker seeing fewer GPUs could not load."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what `rng_state` saved, the CUDA state into `device` (the resuming worker's own,
    whatever its index or how many GPUs it sees). Checkpoints written before this held a list,
    one state per GPU the saving worker saw: the entry at this device's index, else the first."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    saved = state.get("cuda")
    if saved is None or device is None or device.type != "cuda":
        return
    if isinstance(saved, (list, tuple)):
        saved = saved[device.index] if device.index is not None and device.index < len(saved) else saved[0]
    torch.cuda.set_rng_state(saved, device)
