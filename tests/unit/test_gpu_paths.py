"""What only a GPU would show, shown on CPU by simulating the condition (issue 25): the CUDA RNG of a
resumed worker that sees another number of GPUs, recurrent layers and similarity logits under a
low-precision autocast, timm's fused BatchNorm+activation under SyncBatchNorm, and which autocast
dtype a GPU gets."""

from __future__ import annotations

import pytest
import torch

from rsray.train.rng import rng_state, set_rng_state
from tests.conftest import run_forked


class FakeGPUs:
    """torch.cuda's RNG functions for a machine with `count` visible GPUs, as torch behaves: an
    index past the last GPU raises IndexError. Each GPU's state is a distinct byte tensor."""

    def __init__(self, count: int):
        self.count = count
        self.states = {i: torch.full((16,), 10 + i, dtype=torch.uint8) for i in range(count)}

    def _index(self, device) -> int:
        device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        index = 0 if device.index is None else device.index
        if index >= self.count:
            raise IndexError(f"device {index} of {self.count}")
        return index

    def get_rng_state(self, device="cuda"):
        return self.states[self._index(device)].clone()

    def set_rng_state(self, state, device="cuda"):
        self.states[self._index(device)] = state.clone()

    def install(self, monkeypatch):
        import torch.cuda.random as cuda_random

        for module in (torch.cuda, cuda_random):  # set_rng_state_all looks the names up in torch.cuda.random
            monkeypatch.setattr(module, "get_rng_state", self.get_rng_state)
            monkeypatch.setattr(module, "set_rng_state", self.set_rng_state)
            monkeypatch.setattr(module, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        return self


def test_a_worker_saves_only_its_own_gpus_rng_state(monkeypatch):
    gpus = FakeGPUs(4).install(monkeypatch)
    state = rng_state(torch.device("cuda", 2))
    assert torch.equal(state["cuda"], gpus.states[2])  # one tensor: its own device's, not one per GPU seen
    assert "cuda" not in rng_state(torch.device("cpu"))  # a CPU worker on a GPU node saves none


def test_a_checkpoint_from_a_four_gpu_worker_resumes_on_a_one_gpu_worker(monkeypatch, tmp_path):
    """An elastic shrink or KubeRay's 1-GPU pods: written on cuda:2 of 4, resumed on cuda:0 of 1."""
    FakeGPUs(4).install(monkeypatch)
    torch.save(rng_state(torch.device("cuda", 2)), tmp_path / "rng.pt")
    monkeypatch.undo()
    resuming = FakeGPUs(1).install(monkeypatch)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), torch.device("cuda", 0))
    assert torch.equal(resuming.states[0], torch.full((16,), 12, dtype=torch.uint8))  # cuda:2's draws go on


@pytest.mark.parametrize("index, expected", [(0, 10), (1, 11), (3, 10)])
def test_an_older_checkpoint_with_every_gpus_state_loads_on_any_worker(monkeypatch, index, expected):
    """Checkpoints written before held get_rng_state_all's list (one state per visible GPU): the
    entry at the worker's own index, or the first when the saving worker saw fewer GPUs."""
    older = {**rng_state(), "cuda": [torch.full((16,), 10 + i, dtype=torch.uint8) for i in range(2)]}
    gpus = FakeGPUs(4).install(monkeypatch)
    set_rng_state(older, torch.device("cuda", index))
    assert torch.equal(gpus.states[index], torch.full((16,), expected, dtype=torch.uint8))
    assert all(
        torch.equal(gpus.states[i], torch.full((16,), 10 + i, dtype=torch.uint8)) for i in range(4) if i != index
    )


def test_the_bigru_runs_in_fp32_under_a_low_precision_autocast():
    """Under CUDA autocast cuDNN's GRU would run in fp16; here the input arrives in bf16, as from a
    layer that autocast lowered, and the GRU must still compute in fp32 and match an fp32 run."""
    from rsray.models.encoders import BiGRU

    torch.manual_seed(0)
    gru = BiGRU(8, 6, merge="separate")
    x, lengths = torch.randn(3, 5, 8), torch.tensor([5, 2, 4])
    reference = gru(x, lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lowered = gru(x.bfloat16(), lengths)
    for ours, fp32 in zip(lowered, reference, strict=True):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, fp32, atol=2e-2, rtol=0)  # only the input's rounding to bf16
    exact = gru(x.bfloat16().float(), lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(torch.equal(a, b) for a, b in zip(gru(x.bfloat16(), lengths), exact, strict=True))


def test_sync_batchnorm_keeps_timms_fused_activation_and_frozen_parts():
    """A backbone with BatchNormAct2d (timm's EfficientNet): converted, it computes what it did
    (one process, eval mode, where SyncBatchNorm needs no process group), its fused activations
    survive, and a frozen part stays frozen and in eval mode through `train()`."""
    from timm.layers import BatchNormAct2d, SyncBatchNormAct
    from torch import nn

    from rsray.models.encoders import FrozenParts, TimmBackbone
    from rsray.train.worker import with_sync_batchnorm

    class TwoBackbones(FrozenParts, nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen = TimmBackbone("test_efficientnet", freeze=True)
            self.trained = TimmBackbone("test_efficientnet")
            self.freeze_part("frozen")

        def forward(self, x):
            return self.frozen(x)[-1], self.trained(x)[-1]

    torch.manual_seed(0)
    model = TwoBackbones()
    fused = sum(isinstance(m, BatchNormAct2d) for m in model.modules())
    assert fused > 0
    x = torch.randn(2, 3, 64, 64)
    before = [y.detach() for y in model.eval()(x)]
    converted = with_sync_batchnorm(model)
    assert sum(isinstance(m, SyncBatchNormAct) for m in converted.modules()) == fused
    assert not any(type(m) is nn.SyncBatchNorm for m in converted.modules())
    for ours, theirs in zip(converted.eval()(x), before, strict=True):
        torch.testing.assert_close(ours, theirs)
    converted.train()
    assert not converted.frozen.training and converted.trained.training
    assert not any(p.requires_grad for p in converted.frozen.parameters())
    assert all(p.requires_grad for p in converted.trained.parameters())


def _unit_rows(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=-1)


def test_cmpagls_queue_itc_is_fp32_under_bf16_autocast():
    """Logits / 0.07 against a queue: bf16's rounding of the similarities (about 4e-3) becomes
    about 0.06 in the logits. Under autocast the loss must equal the fp32 loss."""
    from rsray.losses import queue_itc_loss

    image, text, momentum_image, momentum_text = (_unit_rows(8, seed=s) for s in range(4))
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])
    queue = (_unit_rows(32, seed=5), _unit_rows(32, seed=6), torch.arange(32) % 7)
    args = (image, text, momentum_image, momentum_text, ids, queue, 0.07, 0.4)
    reference = queue_itc_loss(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lowered = queue_itc_loss(*args)
    assert lowered.dtype == torch.float32
    torch.testing.assert_close(lowered, reference, rtol=1e-6, atol=1e-6)


def test_the_affiliation_loss_is_fp32_under_bf16_autocast():
    from rsray.losses import affiliation_loss

    image, text = _unit_rows(12, seed=1), _unit_rows(12, seed=2)
    scenes = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, -1, 4, 4, 5])
    for centres in ("class", "sample"):
        reference = affiliation_loss(image, text, scenes, torch.tensor(100.0), centres=centres)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lowered = affiliation_loss(image, text, scenes, torch.tensor(100.0), centres=centres)
        torch.testing.assert_close(lowered, reference, rtol=1e-6, atol=1e-6)


def test_the_scene_priors_logits_are_fp32_under_bf16_autocast():
    from rsray.config import load_config
    from rsray.models import build_model

    torch.manual_seed(0)
    model = build_model(load_config("model/scene_prior-tiny"), vocab_size=50)
    embeddings = _unit_rows(6, d=model.config.embed_dim)
    reference = model.scene_logits(embeddings)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lowered = model.scene_logits(embeddings)
    assert lowered.dtype == torch.float32
    torch.testing.assert_close(lowered, reference, rtol=1e-6, atol=1e-6)


def test_doves_regions_pool_from_their_own_image_past_256_rows_under_bf16():
    """torchvision writes a box list's image index in the boxes' dtype: in bf16, row 257 and on
    would pool from a neighbouring image. 300 flat maps carry their own row number, as
    (row // 16, row % 16): both exact in bf16, so every pooled region must read its own row."""
    from rsray.models.dove import RoIEncoder

    encoder = RoIEncoder(in_channels=2, dim=4, levels=(1, 2), output_size=1)
    encoder.project = torch.nn.Identity()  # the pooled values themselves
    rows = torch.arange(300, dtype=torch.float32)
    code = torch.stack([rows // 16, rows % 16], dim=1)  # [300, 2]
    maps = code[:, :, None, None].expand(300, 2, 4, 4).contiguous()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = encoder(maps.bfloat16())
    assert pooled.dtype == torch.float32
    assert torch.equal(pooled, code[:, None, :].expand(300, 5, 2))


@pytest.mark.parametrize(
    "amp, gpu, native, expected",
    [
        ("auto", "NVIDIA H100 80GB HBM3", True, ("bf16", False)),
        ("auto", "Tesla V100-SXM2-32GB", False, ("fp16", True)),  # emulated bf16 is slower than fp32
        ("auto", None, False, ("fp32", False)),  # CPU
        ("bf16", "Tesla T4", False, ("bf16", False)),  # asked for: kept, and the reason says emulated
        ("fp16", "NVIDIA A100-SXM4-40GB", True, ("fp16", True)),
        ("off", "NVIDIA H100 80GB HBM3", True, ("fp32", False)),
    ],
)
def test_amp_auto_picks_bf16_only_where_the_gpu_has_it(monkeypatch, amp, gpu, native, expected):
    from rsray.train.precision import choose_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    precision = choose_precision(amp, torch.device("cuda", 0) if gpu else torch.device("cpu"))
    assert (precision.name, precision.loss_scaling) == expected
    assert ("emulated" in precision.reason) == (amp == "bf16" and not native)
    assert (gpu or "cpu") in precision.reason


def _one_step(model, batch, scaler, dtype, clip):
    from rsray.train.loop import train_epoch

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    train_epoch(model, [batch], optimizer, grad_clip=clip, amp_dtype=dtype, scaler=scaler)
    return [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]


def test_fp16_loss_scaling_clips_the_unscaled_gradient():
    """One SGD step under fp16 autocast with a GradScaler (scale 256) moves the weights as the
    fp32 step does, clipping included: clipping the still-scaled gradients would shrink the step
    by the scale; skipping the unscale would blow it up by it."""
    from tests.unit.test_models import build_tiny, random_batch

    batch = random_batch(batch=8)
    steps = {}
    for name, dtype, scaler in (
        ("fp32", None, None),
        ("fp16", torch.float16, torch.amp.GradScaler("cpu", init_scale=256.0)),
    ):
        steps[name] = _one_step(build_tiny("vsepp", seed=3), batch, scaler, dtype, clip=0.5)
    norm = lambda deltas: float(torch.cat([d.flatten() for d in deltas]).norm())  # noqa: E731
    assert norm(steps["fp32"]) == pytest.approx(0.5, rel=1e-3)  # lr 1: the step is the clipped gradient
    assert norm(steps["fp16"]) == pytest.approx(0.5, rel=2e-2)
    cosine = torch.nn.functional.cosine_similarity(
        torch.cat([d.flatten() for d in steps["fp16"]]), torch.cat([d.flatten() for d in steps["fp32"]]), dim=0
    )
    assert float(cosine) > 0.98


def _parameters_without_gradient(model, batch) -> list[str]:
    model.train()
    model.zero_grad(set_to_none=True)
    model.loss(batch)["total"].backward()
    return [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("name", ["scene_prior", "priorclip", "priorclip_open", "swan", "vsepp"])
def test_a_batch_without_scene_labels_still_gives_every_parameter_a_gradient(name):
    """DDP waits for a gradient of every parameter on every worker: a worker whose batch has no
    labelled row (or whose loss skips a term) must still put every parameter in the graph."""
    from tests.unit.test_models import build_tiny, random_batch

    model = build_tiny(name)
    assert not model.__dict__.get("ddp_kwargs", {}).get("find_unused_parameters")
    unlabelled = {**random_batch(), "scene_ids": torch.full((8,), -1)}
    assert _parameters_without_gradient(model, random_batch()) == []
    assert _parameters_without_gradient(model, unlabelled) == []


def _ddp_worker(rank: int, port: int, overrides: list[str], out: dict) -> None:
    """Two steps of the scene prior under DDP on 2 gloo workers, rank 1's batches unlabelled."""
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from rsray.train.loop import train_epoch
    from rsray.train.worker import DistributedModel, LossForward
    from tests.unit.test_models import build_tiny, random_batch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = build_tiny("scene_prior", *overrides)
        ddp = DistributedModel(DistributedDataParallel(LossForward(model), **getattr(model, "ddp_kwargs", {})))
        batches = [random_batch(seed=s) for s in range(2)]
        if rank == 1:
            batches = [{**b, "scene_ids": torch.full((8,), -1)} for b in batches]
        stats = train_epoch(ddp, batches, torch.optim.SGD(model.parameters(), lr=0.1), grad_clip=None)
        out[rank] = (stats.pairs, [p.detach().clone() for p in model.parameters()])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("overrides", [[], ["model.caption_weight=0"]])
def test_the_scene_prior_trains_under_ddp_with_unlabelled_batches_and_without_captions(overrides):
    import torch.multiprocessing as mp

    out = mp.Manager().dict()
    run_forked(_ddp_worker, (overrides, out), 2)
    assert out[0][0] == out[1][0] == 16  # both workers took both steps
    for ours, theirs in zip(out[0][1], out[1][1], strict=True):
        assert torch.equal(ours, theirs)  # and stayed in step: every gradient was all-reduced


def test_evaluation_runs_on_the_gpu_when_there_is_one(monkeypatch):
    """`rsray evaluate --device auto` and the post-training test scoring: the GPU when the process
    has one (CMPAGL's ITM stage is hours on CPU at paper size); `cuda` without one is one line."""
    from rsray.eval.checkpoint import eval_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert eval_device("auto") == "cpu" and eval_device("cpu") == "cpu"
    with pytest.raises(ValueError, match=r"^--device cuda: this process sees no GPU"):
        eval_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert eval_device("auto") == "cuda" and eval_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="--device must be one of auto, cuda, cpu"):
        eval_device("tpu")


class _OnTheDevice(torch.Tensor):
    """Stands for a tensor on a GPU: reading its values on the host is what makes a training step
    wait for the device to catch up, so here it raises."""

    def cpu(self, *args, **kwargs):
        raise AssertionError("lengths copied back to the host: a GPU sync every step")

    def tolist(self):
        raise AssertionError("lengths read on the host: a GPU sync every step")

    def item(self):
        raise AssertionError("a length read on the host: a GPU sync every step")


@pytest.mark.parametrize("name", ["vsepp", "swan", "dove"])
def test_the_gru_text_encoders_never_read_lengths_back_from_the_device(name):
    """`to_device` keeps the host's lengths beside the moved ones; the BiGRU packs with those, so a
    batch whose `lengths` live on the device encodes without copying them back, to the same result."""
    from rsray.models.base import to_device
    from tests.unit.test_models import build_tiny, random_batch

    model = build_tiny(name).eval()
    batch = to_device(random_batch(), "cpu")
    with torch.no_grad():
        expected = model.encode_texts(batch)
        batch["lengths"] = batch["lengths"].as_subclass(_OnTheDevice)
        encoded = model.encode_texts(batch)
        with pytest.raises(AssertionError, match="GPU sync"):  # without the host copy, packing reads them
            model.encode_texts({k: v for k, v in batch.items() if k != "lengths_host"})
    plain = lambda out: [t.as_subclass(torch.Tensor) for t in (out if isinstance(out, tuple) else (out,))]  # noqa: E731
    torch.testing.assert_close(plain(encoded), plain(expected))  # DOVE's features are a tuple
