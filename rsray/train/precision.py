"""Which autocast dtype a training run uses (`train.amp`) and whether it needs loss scaling.

bf16 needs no loss scaling, but only GPUs with bf16 units run it fast (Ampere and later); V100
and T4, common in academic clusters, emulate it, slower than fp32. `auto` therefore picks bf16
where the GPU has it natively, fp16 with a `torch.amp.GradScaler` on an older GPU, and no autocast
on CPU. Plain PyTorch: the worker and the GPU check use it alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AMP_SETTINGS = ("auto", "bf16", "fp16", "off")


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype | None  # the autocast dtype; None: no autocast (fp32)
    loss_scaling: bool  # fp16: gradients go through a GradScaler (unscaled before clipping)
    reason: str  # one line for the run's log: what was chosen and why

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(device.type) if self.loss_scaling else None


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware (not emulated)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def choose_precision(amp: str, device: torch.device) -> Precision:
    """The precision of `train.amp` on `device` (see the module docstring)."""
    if amp not in AMP_SETTINGS:
        raise ValueError(f"train.amp must be one of {', '.join(AMP_SETTINGS)}, got {amp!r}")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return Precision(None, False, f"fp32 on {gpu} (train.amp={amp})")
    if amp == "fp16":
        return Precision(torch.float16, True, f"fp16 autocast with loss scaling on {gpu}")
    if amp == "bf16":
        emulated = device.type == "cuda" and not native_bf16(device)
        note = ": emulated on this GPU, slower than fp32; train.amp=fp16 is faster" if emulated else ""
        return Precision(torch.bfloat16, False, f"bf16 autocast on {gpu}{note}")
    if native_bf16(device):
        return Precision(torch.bfloat16, False, f"bf16 autocast on {gpu} (native bf16; train.amp=auto)")
    return Precision(torch.float16, True, f"fp16 autocast with loss scaling on {gpu} (no native bf16; train.amp=auto)")
