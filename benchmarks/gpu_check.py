"""The GPU check: one command that shows the GPU path works, check by check, in minutes.

Plain PyTorch (no Ray), so it runs on a GPU machine that has only torch, timm and transformers,
with rsray on PYTHONPATH. Every check prints OK or FAIL with its seconds and a detail, and a
failing check never stops the rest; the exit code is 1 when any failed.

    python -m benchmarks.gpu_check                      # on the GPU: every check, paper-size throughput
    python -m benchmarks.gpu_check --device cpu --smoke  # the same logic at test size (make test)

Checks: versions, bf16 support and TF32 flags; the BiGRU's dtype under autocast; the RNG state of
several GPUs restored on one; each model's training step in fp32/bf16/fp16 on real decoded batches
(finite loss, peak memory); validation on the device against CPU (mR difference); decode processes
forked after CUDA started; batches pinned before their copy to the GPU; a checkpoint device -> CPU
-> device; a one-rank process group (NCCL on a GPU, gloo on CPU: float64 all_reduce,
all_gather_object, the gather with gradients, SyncBatchNorm with bf16 input on a GPU); then (not
with --smoke) pairs/s per model at paper size with synthetic
batches, the data path's ceiling aside.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rsray.config import load_config
from rsray.data.loader import make_train_loader
from rsray.data.prepare import prepare_in_process
from rsray.data.synthetic import generate_sample
from rsray.eval.split import evaluate
from rsray.models import build_model, model_config
from rsray.optim import make_optimizer
from rsray.train.loop import train_epoch
from rsray.train.precision import choose_precision

TINY = ["vsepp", "swan", "dove", "clip", "scene_prior", "priorclip", "priorclip_open", "cmpagl"]
PAPER = {  # conf/model names; frozen backbones start random here (no weights on the machine)
    "vsepp": [],
    "swan": ["model.allow_random_frozen_backbone=true"],
    "dove": ["model.allow_random_frozen_backbone=true"],
    "cmpagl": [],
    "priorclip": ["model.instruction_checkpoint=null"],  # a random instruction CNN: no stage trained here
}


@dataclass
class Context:
    device: torch.device
    smoke: bool
    workdir: str
    _data: tuple | None = field(default=None, repr=False)

    def data(self):
        """(split tables, vocabulary) of the embedded sample, prepared in this process once."""
        if self._data is None:
            root = os.path.join(self.workdir, "sample")
            generate_sample(root, n_images=60 if self.smoke else 200, image_size=64, seed=0, progress=False)
            self._data = prepare_in_process(load_config("presets/cpu-tiny", [f"data.root={root}"]))
        return self._data


CHECKS: list[tuple[str, Callable[[Context], str]]] = []


def check(name: str):
    def register(fn):
        CHECKS.append((name, fn))
        return fn

    return register


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@check("versions, bf16 and TF32")
def versions(ctx: Context) -> str:
    import timm
    import transformers

    parts = [f"torch {torch.__version__}", f"timm {timm.__version__}", f"transformers {transformers.__version__}"]
    if ctx.device.type == "cuda":
        parts += [
            torch.cuda.get_device_name(ctx.device),
            f"CUDA {torch.version.cuda}",
            f"native bf16 {torch.cuda.is_bf16_supported(including_emulation=False)}",
            f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN {torch.backends.cudnn.allow_tf32}",
        ]
    return "; ".join(parts) + f"; train.amp=auto -> {choose_precision('auto', ctx.device).name}"


@check("BiGRU dtype under bf16 autocast")
def gru_dtype(ctx: Context) -> str:
    from rsray.models.encoders import BiGRU

    torch.manual_seed(0)
    gru = BiGRU(32, 32).to(ctx.device)
    x, lengths = torch.randn(8, 12, 32, device=ctx.device), torch.randint(1, 13, (8,))
    reference = gru(x, lengths)
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
        lowered = gru(x, lengths)
    error = float((lowered - reference).abs().max())
    assert lowered.dtype == torch.float32 and error < 1e-5, f"{lowered.dtype}, max error {error:.2e}"
    return f"fp32 output, max error {error:.1e}"


@check("RNG state of several GPUs restored on this one")
def rng_resume(ctx: Context) -> str:
    from rsray.train.rng import rng_state, set_rng_state

    state = rng_state(ctx.device)
    if ctx.device.type == "cuda":
        state["cuda"] = [state["cuda"]] * 4  # as a 4-GPU worker of an older checkpoint saved it
    draws = torch.rand(4, device=ctx.device)
    set_rng_state(state, ctx.device)
    again = torch.rand(4, device=ctx.device)
    assert torch.equal(draws, again), "the restored generator drew other numbers"
    return "restored; the same draws" + ("" if ctx.device.type == "cuda" else " (CPU generator only)")


def _train_steps(ctx: Context, name: str, amp: str, steps: int) -> str:
    tables, vocab = ctx.data()
    torch.manual_seed(0)
    cfg = load_config(f"model/{name}-tiny")
    model = build_model(cfg, vocab_size=len(vocab)).to(ctx.device)
    model_cfg = model_config(cfg)
    optimizer, _ = make_optimizer(model, model_cfg, total_steps=100)
    loader = make_train_loader(tables["train"], model_cfg.augment, batch_size=8, seed=0)
    batches = [batch for _, batch in zip(range(steps), loader, strict=False)]
    precision = choose_precision(amp, ctx.device)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    stats = train_epoch(
        model,
        batches,
        optimizer,
        device=ctx.device,
        amp_dtype=precision.dtype,
        scaler=precision.grad_scaler(ctx.device),
    )
    loss = stats.losses["total"]
    assert math.isfinite(loss), f"loss {loss}"
    peak = peak_memory_mb(ctx.device)
    return f"{precision.name}: loss {loss:.3f}, {stats.pairs_per_second:.0f} pairs/s, peak {peak:.0f} MiB"


def _register_training_checks(smoke: bool) -> None:
    for name in TINY:
        for amp in ("off", "bf16", "fp16") if (name == "vsepp" or not smoke) else ("auto",):
            CHECKS.append(
                (f"train {name}-tiny, amp {amp}", lambda ctx, n=name, a=amp: _train_steps(ctx, n, a, 2 if smoke else 4))
            )


@check("validation on the device against CPU")
def validation(ctx: Context) -> str:
    tables, vocab = ctx.data()
    torch.manual_seed(0)
    cfg = load_config("model/vsepp-tiny")
    model = build_model(cfg, vocab_size=len(vocab))
    on_cpu = evaluate(model, tables["test"], model_config(cfg).augment)
    on_device = evaluate(model.to(ctx.device), tables["test"], model_config(cfg).augment, device=ctx.device)
    difference = abs(on_cpu["mR"] - on_device["mR"])
    assert difference < 1.0, f"mR {on_device['mR']:.2f} on {ctx.device}, {on_cpu['mR']:.2f} on CPU"
    return f"mR {on_device['mR']:.2f} on {ctx.device}, {on_cpu['mR']:.2f} on CPU"


@check("decode processes forked after CUDA started")
def decode_after_cuda(ctx: Context) -> str:
    import numpy as np

    from rsray.data.decode import BatchDecoder
    from rsray.data.pairs import explode_pairs

    tables, _ = ctx.data()
    if ctx.device.type == "cuda":
        torch.zeros(1, device=ctx.device)  # CUDA is initialised in this process before the fork
    augment = model_config(load_config("model/vsepp-tiny")).augment
    pairs = explode_pairs(tables["train"])
    chunks = [pairs.slice(start, 8) for start in range(0, 32, 8)]
    with BatchDecoder(augment, 0) as inline, BatchDecoder(augment, 2) as forked:
        expected = list(inline.batches(chunks, np.random.default_rng(0)))
        got = list(forked.batches(chunks, np.random.default_rng(0)))
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(expected, got, strict=True)), "batches differ"
    return f"{len(got)} batches from 2 forked processes equal in-process decoding"


@check("batches copied to the GPU from pinned memory")
def pinned_copies(ctx: Context) -> str:
    from rsray.models.base import to_device

    if ctx.device.type != "cuda":
        return "nothing to check on CPU (no copy)"
    pinned = []
    original = torch.Tensor.pin_memory

    def recording(tensor, *args, **kwargs):
        out = original(tensor, *args, **kwargs)
        pinned.append(out.is_pinned())
        return out

    torch.Tensor.pin_memory = recording
    try:
        moved = to_device({"images": torch.randn(8, 3, 64, 64), "lengths": torch.ones(8)}, ctx.device)
        torch.cuda.synchronize(ctx.device)
    finally:
        torch.Tensor.pin_memory = original
    assert pinned == [True, True] and moved["images"].is_cuda, f"pinned {pinned}"
    return "every tensor pinned, then copied with non_blocking"


@check("checkpoint device -> CPU -> device")
def checkpoint_round_trip(ctx: Context) -> str:
    torch.manual_seed(0)
    cfg = load_config("model/vsepp-tiny")
    model = build_model(cfg, vocab_size=50).to(ctx.device).eval()
    path = os.path.join(ctx.workdir, "state.pt")
    torch.save(model.state_dict(), path)
    on_cpu = build_model(cfg, vocab_size=50).eval()
    on_cpu.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    back = build_model(cfg, vocab_size=50).to(ctx.device).eval()
    back.load_state_dict(on_cpu.state_dict())
    images = torch.randn(2, 3, 64, 64, device=ctx.device)
    with torch.no_grad():
        same = torch.equal(model.encode_images({"images": images}), back.encode_images({"images": images}))
    assert same, "the reloaded model embeds differently"
    return "identical embeddings after the round trip"


@check("one-rank process group")
def process_group(ctx: Context) -> str:
    import torch.distributed as dist

    from rsray.distributed import gather_with_grad

    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        value = torch.tensor([1.0 + 2**-40], dtype=torch.float64, device=ctx.device)
        dist.all_reduce(value)
        assert float(value) == 1.0 + 2**-40, "float64 all_reduce lost precision"
        objects = [None]
        dist.all_gather_object(objects, {"rank": 0})
        rows = torch.randn(4, 8, device=ctx.device, requires_grad=True)
        gather_with_grad(rows).sum().backward()
        assert torch.equal(rows.grad, torch.ones_like(rows)), "the gather's gradient"
        detail = f"{backend}: float64 all_reduce, all_gather_object, gather with gradients"
        if ctx.device.type == "cuda":
            norm = torch.nn.SyncBatchNorm(8).to(ctx.device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = norm(torch.randn(4, 8, 3, 3, device=ctx.device, dtype=torch.bfloat16))
            assert torch.isfinite(out).all(), "SyncBatchNorm with bf16 input"
            detail += ", SyncBatchNorm with bf16 input"
        return detail
    finally:
        dist.destroy_process_group()


def _paper_throughput(ctx: Context, name: str) -> str:
    overrides = PAPER[name]
    cfg = load_config(f"model/{name}", overrides)
    model_cfg = model_config(cfg)
    model = build_model(cfg, vocab_size=10_000).to(ctx.device)
    optimizer, _ = make_optimizer(model, model_cfg, total_steps=100)
    size, batch = model_cfg.augment.crop, 32
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 20, (batch,), generator=g)
    tokens = torch.randint(2, 10_000, (batch, 20), generator=g) * (torch.arange(20)[None] < lengths[:, None])
    synthetic = {
        "images": torch.randn(batch, 3, size, size, generator=g),
        "tokens": tokens,
        "lengths": lengths,
        "input_ids": tokens.clamp(max=30_000),
        "attention_mask": (tokens > 0).long(),
        "image_ids": torch.arange(batch),
        "scene_ids": torch.randint(0, 10, (batch,), generator=g),
    }
    precision = choose_precision("auto", ctx.device)
    steps = [synthetic] * 6
    train_epoch(model, steps[:1], optimizer, device=ctx.device, amp_dtype=precision.dtype)  # warm-up
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
        torch.cuda.reset_peak_memory_stats(ctx.device)
    stats = train_epoch(model, steps, optimizer, device=ctx.device, amp_dtype=precision.dtype)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    peak = peak_memory_mb(ctx.device)
    return f"{precision.name}: {stats.pairs_per_second:.0f} pairs/s at batch {batch}, peak {peak:.0f} MiB"


def run(ctx: Context, checks) -> int:
    failed = 0
    for name, fn in checks:
        started = time.perf_counter()
        try:
            detail, status = fn(ctx), "OK  "
        except Exception as exc:  # a failing check never stops the rest
            detail, status = f"{type(exc).__name__}: {exc}", "FAIL"
            failed += 1
            traceback.print_exc(file=sys.stderr)
        print(f"{status} {name:<45} {time.perf_counter() - started:7.1f} s  {detail}", flush=True)
    print(f"{len(checks) - failed} of {len(checks)} checks OK")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, no paper-size throughput (make test)")
    args = parser.parse_args(argv)
    base = list(CHECKS)
    _register_training_checks(args.smoke)
    checks, CHECKS[:] = list(CHECKS), base
    if not args.smoke:
        checks += [(f"throughput {n} (paper size)", lambda ctx, n=n: _paper_throughput(ctx, n)) for n in PAPER]
    with tempfile.TemporaryDirectory(prefix="rsray-gpu-check-") as workdir:
        return run(Context(torch.device(args.device), args.smoke, workdir), checks)


if __name__ == "__main__":
    sys.exit(main())
