"""rsray.models.cmpagl: its state (queue, pointer, step, momentum weights) survives a checkpoint,
the momentum weights never reach the optimizer, and across two real gloo workers under DDP the
queue holds both workers' features in rank order and the momentum weights stay bitwise equal."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rsray.config import load_config
from rsray.models import build_model, model_config
from rsray.optim import make_optimizer
from tests.conftest import run_forked

VOCAB, WORLD, BATCH = 40, 2, 4


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(load_config("model/cmpagl-tiny"), vocab_size=VOCAB)


def batch_for(rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 10 + rank)
    lengths = torch.randint(2, 8, (BATCH,), generator=g)
    tokens = torch.randint(2, VOCAB, (BATCH, 8), generator=g)
    tokens[torch.arange(8)[None, :] >= lengths[:, None]] = 0
    return {
        "images": torch.randn(BATCH, 3, 64, 64, generator=g),
        "tokens": tokens,
        "lengths": lengths,
        "image_ids": torch.arange(BATCH) + 100 * rank + 1000 * seed,
        "scene_ids": torch.zeros(BATCH, dtype=torch.long),
    }


def test_the_checkpoint_carries_queue_pointer_step_and_momentum_weights():
    model = tiny().train()
    for step in range(2):
        model.loss(batch_for(0, step))["total"].backward()
    state = model.state_dict()
    assert {"queue.image", "queue.text", "queue.ids", "queue.ptr", "queue.filled", "step"} <= set(state)
    assert any(k.startswith("momentum.copies.visual.") for k in state)
    restored = tiny(seed=1)
    restored.load_state_dict(state)
    assert int(restored.queue.filled) == 2 * BATCH and int(restored.step) == 2
    assert restored.queue.ids[: 2 * BATCH].tolist() == list(range(BATCH)) + list(range(1000, 1000 + BATCH))
    for key in ("queue.image", "momentum.copies.text_proj.weight", "momentum.copies.visual.swin.norm.weight"):
        assert torch.equal(restored.state_dict()[key], state[key]), key


def test_momentum_weights_get_no_gradient_and_are_not_optimised():
    model = tiny().train()
    model.loss(batch_for(0, 0))["total"].backward()
    momentum = {id(p) for p in model.momentum.parameters()}
    assert momentum and all(p.grad is None and not p.requires_grad for p in model.momentum.parameters())
    optimizer, _ = make_optimizer(model, model_config(load_config("model/cmpagl-tiny")))
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimised & momentum
    assert id(model.bert.mlm_head.predictions.decoder.weight) == id(model.bert.embeddings.word_embeddings.weight)


class _LossForward(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)["total"]


def _sharded_validation(rank: int, sample_root: str) -> dict:
    """Validation with each rank encoding its share (`evaluate(sharded=True)`) against one process
    encoding everything, for a two-tower model (VSE++) and a pairwise one (CMPAGL: feature tuples)."""
    from rsray.data.prepare import prepare_in_process
    from rsray.eval.split import encode_split, evaluate

    tables, vocab = prepare_in_process(load_config("presets/cpu-tiny", [f"data.root={sample_root}"]))
    results = {}
    for name in ("vsepp-tiny", "cmpagl-tiny"):
        cfg = load_config(f"model/{name}")
        torch.manual_seed(0)
        model = build_model(cfg, vocab_size=len(vocab))
        augment = model_config(cfg).augment
        table = tables["test"].slice(0, 7)  # 7 images: shares of 3 and 4
        with torch.no_grad():  # each rank's own batch moves its BatchNorm statistics, as after DDP's last step
            model.train()
            model.encode_images({"images": torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(rank))})
        shared = encode_split(model, table, augment, sharded=True)
        alone = encode_split(model, table, augment)
        for ours, theirs in zip(shared, alone, strict=True):  # every rank gets the whole split in table order
            if torch.is_tensor(ours):
                torch.testing.assert_close(ours, theirs)
            else:  # CMPAGL's tuples: the same embeddings; token states differ only where masks say padding
                torch.testing.assert_close(ours.embedding, theirs.embedding)
        results[name] = (evaluate(model, table, augment, sharded=True), evaluate(model, table, augment))
        # rank 0's own numbers are the reference (its model is what the checkpoint holds)
    return results


def _ddp_worker(rank: int, port: int, out: dict, sample_root: str | None = None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(100 + rank)  # each worker draws its own MLM masks and ITM negatives
        model = tiny(seed=0).train()  # same initial weights on both
        ddp = torch.nn.parallel.DistributedDataParallel(_LossForward(model), **model.ddp_kwargs)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        first_ids = None
        for step in range(3):
            loss = ddp(batch_for(rank, step))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step == 0:
                first_ids = model.queue.ids[: WORLD * BATCH].clone()
        out[rank] = {
            "first_ids": first_ids,
            "momentum": [p.detach().clone() for p in model.momentum.parameters()],
            "queue": model.queue.image[: int(model.queue.filled)].clone(),
            "filled": int(model.queue.filled),
            "validation": _sharded_validation(rank, sample_root) if sample_root else None,
        }
    finally:
        dist.destroy_process_group()


def test_two_workers_share_one_queue_in_rank_order_and_identical_momentum_weights(tmp_path):
    from rsray.data.synthetic import generate_sample

    generate_sample(tmp_path / "sample", n_images=30, image_size=64, seed=0, progress=False)
    out = mp.Manager().dict()
    run_forked(_ddp_worker, (out, str(tmp_path / "sample")), WORLD)
    for name in ("vsepp-tiny", "cmpagl-tiny"):  # validation shared by the two workers, scored by rank 0
        (sharded, alone), (other, _) = out[0]["validation"][name], out[1]["validation"][name]
        numbers = {key for key in alone if not key.endswith("_seconds")}  # timings differ
        assert {k: sharded[k] for k in numbers} == pytest.approx({k: alone[k] for k in numbers}, abs=1e-9), name
        assert other is None, name
    expected = list(range(BATCH)) + list(range(100, 100 + BATCH))  # rank 0's batch, then rank 1's
    for rank in range(WORLD):
        assert out[rank]["first_ids"].tolist() == expected
        assert out[rank]["filled"] == 3 * WORLD * BATCH
    assert torch.equal(out[0]["queue"], out[1]["queue"])
    assert all(torch.equal(a, b) for a, b in zip(out[0]["momentum"], out[1]["momentum"], strict=True))
    start = list(tiny(seed=0).momentum.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(out[0]["momentum"], start, strict=True))  # they moved


def test_the_paper_config_counts_the_parameters_cmpagl_md_lists():
    """Swin-T + global windows, BERT-base split 6 + 6 with cross-attention and the MLM head, the
    256-d projections and the ITM head; the momentum copies hold the image side and the text half."""
    with torch.device("meta"):
        model = build_model(load_config("model/cmpagl"), vocab_size=VOCAB)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # tied decoder counted once
    momentum = sum(p.numel() for p in model.momentum.parameters())
    h, v, d = 768, 30522, 256
    swin, global_windows = 27_519_354, 3_930_624  # test_gswin counts both from timm and the formula
    embeddings = v * h + 512 * h + 2 * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * 3072 + 3072) + (3072 * h + h) + 2 * h
    cross = 4 * (h * h + h) + 2 * h
    mlm_head = h * h + h + 2 * h + v
    projections = 2 * (h * d + d)
    assert (
        trainable
        == swin + global_windows + embeddings + 12 * layer + 6 * cross + mlm_head + projections + (2 * h + 2) + 1
    )  # + ITM head + log temperature
    assert momentum == swin + global_windows + projections + embeddings + 6 * layer
    # cmpagl.md §4 says about 155.6 M and 98.2 M: its parts (31.45 + 108.89 + 14.16 + 0.65 + 0.39) sum to 155.54
    assert round(trainable / 1e6, 2) == 155.54 and round(momentum / 1e6, 1) == 98.2


def test_the_itm_stage_on_a_prepared_split_equals_full_itm_ranking_when_k_covers_the_gallery(tmp_path):
    """The real model end to end: prepared shards -> ITC matrix -> ITM re-scoring. With k at the
    gallery's size the stage is full ITM ranking, checked against every pair scored directly."""
    from rsray.data.prepare import prepare_in_process
    from rsray.data.synthetic import generate_sample
    from rsray.eval.metrics import retrieval_ranks
    from rsray.eval.scoring import index_rows
    from rsray.eval.split import rescore_metrics, score_split
    from rsray.eval.stages import rescore_stage

    generate_sample(tmp_path / "s", n_images=40, image_size=64, seed=0, progress=False)
    cfg = load_config("model/cmpagl-tiny", [f"data.root={tmp_path / 's'}", "prepare.image_size=64"])
    tables, vocab = prepare_in_process(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=len(vocab)).eval()
    scored = score_split(model, tables["test"], model_config(cfg).augment)
    n_img, n_txt = scored.scores.shape
    stage = rescore_stage(model, scored, k=n_txt, pair_batch=5)
    rows = torch.arange(n_img).repeat_interleave(n_txt)
    cols = torch.arange(n_txt).repeat(n_img)
    with torch.no_grad():
        full = model.pair_scores(index_rows(scored.image_features, rows), index_rows(scored.text_features, cols))
    expected = retrieval_ranks(full.view(n_img, n_txt), scored.caption_image)
    assert stage["ranks"] == expected and stage["pairs"] == n_img * n_txt
    small = rescore_stage(model, scored, k=2)
    assert small["pairs"] <= n_img * 2 + n_txt * 2 and set(small["metrics"]) == set(stage["metrics"])
    assert set(rescore_metrics(model, scored)) >= {"itm_mR", "itm_i2t_R1", "itm_seconds"}  # itm_in_validation
    model.config.itm_in_validation = False
    assert rescore_metrics(model, scored) == {}


def test_itm_negatives_are_drawn_from_the_itc_logits_with_momentum_keys(monkeypatch):
    """ALBEF: for each image, softmax(image . momentum caption / temperature) over the batch; for
    each caption, softmax(caption . momentum image / temperature). Checked at the model: what
    `Cmpagl.loss` hands the sampler, against the features it handed the ITC loss."""
    import rsray.models.cmpagl as cmpagl

    seen: dict[str, object] = {"sampler": []}
    real_itc, real_sampler = cmpagl.queue_itc_loss, cmpagl.sample_hard_negatives

    def itc(image, text, momentum_image, momentum_text, ids, queue, temperature, alpha):
        seen["itc"] = (image.detach(), text.detach(), momentum_image, momentum_text, float(temperature))
        return real_itc(image, text, momentum_image, momentum_text, ids, queue, temperature, alpha)

    def sampler(scores, ids, generator=None, hardest=False):
        seen["sampler"].append((scores.detach(), hardest))
        return real_sampler(scores, ids, generator, hardest)

    monkeypatch.setattr(cmpagl, "queue_itc_loss", itc)
    monkeypatch.setattr(cmpagl, "sample_hard_negatives", sampler)
    model = tiny()
    model.train()
    model.loss(batch_for(0, 0))
    image, text, momentum_image, momentum_text, temperature = seen["itc"]
    (i2t, hardest_i2t), (t2i, hardest_t2i) = seen["sampler"]
    torch.testing.assert_close(i2t, image @ momentum_text.t() / temperature)
    torch.testing.assert_close(t2i, text @ momentum_image.t() / temperature)
    assert not hardest_i2t and not hardest_t2i and temperature == pytest.approx(0.07, rel=1e-4)
    seen["sampler"].clear()
    build_model(load_config("model/cmpagl-tiny", ["model.itm_negatives=hardest"]), vocab_size=VOCAB).loss(
        batch_for(0, 0)
    )
    assert [hardest for _, hardest in seen["sampler"]] == [True, True]


def test_the_hardest_itm_negative_is_the_most_similar_other_image():
    from rsray.losses import sample_hard_negatives

    scores = torch.tensor([[5.0, 4.0, 1.0, 2.0], [4.0, 5.0, 3.0, 1.0], [0.0, 2.0, 5.0, 4.0], [9.0, 0.0, 1.0, 5.0]])
    ids = torch.tensor([0, 0, 1, 2])
    drawn, valid = sample_hard_negatives(scores, ids, hardest=True)
    assert drawn.tolist() == [3, 2, 3, 0] and valid.all()  # the largest score outside its own image


@pytest.mark.parametrize("reduction, divisor", [("mean", BATCH), ("sum", 1)])
def test_the_triplet_term_is_reduced_as_configured(monkeypatch, reduction, divisor):
    """`triplet_reduction`: the hinge summed over the batch's queries, divided by the batch (mean,
    the spec's default) or not (sum, VSE++'s). Checked at the model, against what triplet_loss gave."""
    import rsray.models.cmpagl as cmpagl

    summed = []
    real = cmpagl.triplet_loss

    def recording(*args, **kwargs):
        summed.append(real(*args, **kwargs).detach())
        return real(*args, **kwargs)

    monkeypatch.setattr(cmpagl, "triplet_loss", recording)
    torch.manual_seed(0)
    model = build_model(load_config("model/cmpagl-tiny", [f"model.triplet_reduction={reduction}"]), vocab_size=VOCAB)
    losses = model.loss(batch_for(0, 0))
    (total,) = summed
    torch.testing.assert_close(losses["triplet"].detach(), total / divisor)


def test_the_global_branch_takes_its_blocks_drop_path():
    """Stochastic depth on the global-window branch too (our choice): with drop_path_rate 1 in
    training every residual branch of a Gswin block is dropped, the global one included."""
    from rsray.models.gswin import Gswin

    kwargs = {"img_size": 64, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4}
    gswin = Gswin("swin_tiny_patch4_window7_224", None, (0, 1), drop_path_rate=1.0, **kwargs).train()
    block = gswin.swin.layers[1].blocks[0]  # timm spaces the rate over the depth: the last block gets 1.0
    with torch.no_grad():
        torch.nn.init.normal_(block.global_attn.proj.weight)  # zero-initialised: make the branch count
        x = torch.randn(2, 8, 8, 32)
        assert torch.equal(block(x), x)  # every branch dropped (timm's DropPath with rate 1 zeroes it)


def test_itm_labels_and_pair_scores_follow_the_head_match_column():
    """Column 1 of the ITM head is "match": a head rigged to it gives pair_scores of +10 and an ITM
    loss of ~10 on the 2 B negatives only (labels 1 for the B pairs, 0 for the drawn negatives)."""
    model = tiny().train()
    with torch.no_grad():
        model.itm_head.weight.zero_()
        model.itm_head.bias.copy_(torch.tensor([0.0, 10.0]))
    batch = batch_for(0, 0)  # four different images: every image and caption has a negative
    losses = model.loss(batch)
    wrong, right = 10.0 + math.log1p(math.exp(-10.0)), math.log1p(math.exp(-10.0))
    assert float(losses["itm"]) == pytest.approx((2 * BATCH * wrong + BATCH * right) / (3 * BATCH), rel=1e-5)
    model.eval()
    with torch.no_grad():
        scores = model.pair_scores(model.encode_images(batch), model.encode_texts(batch))
    torch.testing.assert_close(scores, torch.full((BATCH,), 10.0))


def test_the_momentum_encoder_moves_first_and_the_queue_takes_its_new_outputs():
    """ALBEF's order in one step: momentum weights = m * old + (1 - m) * online, then the momentum
    encoder's embeddings of the batch (with the moved weights) are what the queue receives."""
    model = tiny().train()
    m = model.config.momentum
    with torch.no_grad():  # as after some optimizer steps: the online weights have left the momentum copy
        for module in model._online().values():
            for parameter in module.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    online = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(("momentum.", "queue."))}
    before = {k: v.detach().clone() for k, v in model.momentum.copies.state_dict().items()}
    batch = batch_for(0, 1)
    model.loss(batch)
    moved = model.momentum.copies.state_dict()
    checked = 0
    for key, value in before.items():
        part, rest = key.split(".", 1)
        source = {
            "visual": "visual.",
            "vision_proj": "vision_proj.",
            "text_proj": "text_proj.",
            "embeddings": "bert.embeddings.",
            "text_layers": "bert.text_layers.",
        }.get(part)
        if source is None or not value.is_floating_point():
            continue
        torch.testing.assert_close(moved[key], m * value + (1 - m) * online[source + rest])
        checked += 1
    assert {key.split(".", 1)[0] for key in before} == {
        "visual",
        "vision_proj",
        "text_proj",
        "embeddings",
        "text_layers",
    }
    assert checked > 10
    ids, mask = model.text_inputs(batch)
    image, text = model._momentum_embeddings(batch["images"], ids, mask)
    queued_image, queued_text, queued_ids = model.queue.contents()
    torch.testing.assert_close(queued_image[-BATCH:], image)
    torch.testing.assert_close(queued_text[-BATCH:], text)
    assert torch.equal(queued_ids[-BATCH:], batch["image_ids"])


def test_mlm_is_predicted_through_the_fusion_half_from_the_image():
    """MLM reads the fused states: with the same masking draw, other images give another MLM loss
    (a text-half-only prediction would not see the image)."""
    model = tiny().train()
    batch = batch_for(0, 2)
    other = dict(batch, images=torch.randn_like(batch["images"]))
    ids, mask = model.text_inputs(batch)
    torch.manual_seed(7)
    one = model._mlm_loss(ids, mask, model.encode_images(batch).tokens)
    torch.manual_seed(7)
    same = model._mlm_loss(ids, mask, model.encode_images(batch).tokens)
    torch.manual_seed(7)
    two = model._mlm_loss(ids, mask, model.encode_images(other).tokens)
    assert float(one) == pytest.approx(float(same), rel=1e-6) and float(one) != pytest.approx(float(two), rel=1e-4)


def test_distillation_alpha_ramps_linearly_over_the_warmup_steps(monkeypatch):
    """ALBEF's alpha: alpha x min(1, step / warm-up), the step counting losses taken; the model
    hands the ITC loss that value."""
    import rsray.models.cmpagl as cmpagl

    torch.manual_seed(0)
    model = build_model(
        load_config("model/cmpagl-tiny", ["model.distill_warmup_steps=4", "model.distill_alpha=0.4"]), vocab_size=VOCAB
    ).train()
    handed, real = [], cmpagl.queue_itc_loss

    def recording(*args):
        handed.append(args[-1])
        return real(*args)

    monkeypatch.setattr(cmpagl, "queue_itc_loss", recording)
    for step in range(6):
        model.loss(batch_for(0, step))
    assert handed == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])
    assert int(model.step) == 6


class _StepOnTheDevice(torch.Tensor):
    """Stands for the step buffer on a GPU: reading it on the host would sync every step."""

    def __int__(self):
        raise AssertionError("step read on the host: a GPU sync every step")

    __float__ = __index__ = item = __int__


def test_the_distillation_ramp_reads_the_step_buffer_once_after_a_load(monkeypatch):
    """The ramp counts steps on the host; the buffer (saved in checkpoints) is read once after a
    load_state_dict, so a resumed run goes on from its saved step without a GPU sync per step."""
    import rsray.models.cmpagl as cmpagl

    cfg = load_config("model/cmpagl-tiny", ["model.distill_warmup_steps=4", "model.distill_alpha=0.4"])
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=VOCAB).train()
    handed, real = [], cmpagl.queue_itc_loss

    def recording(*args):
        handed.append(args[-1])
        return real(*args)

    monkeypatch.setattr(cmpagl, "queue_itc_loss", recording)
    model.loss(batch_for(0, 0))  # reads the fresh buffer (0) once
    model.step = model.step.as_subclass(_StepOnTheDevice)
    model.loss(batch_for(0, 1))
    assert handed == pytest.approx([0.0, 0.1])
    resumed = build_model(cfg, vocab_size=VOCAB).train()
    state = {k: v.as_subclass(torch.Tensor) for k, v in model.state_dict().items()}
    state["step"] = torch.tensor(3)  # a checkpoint saved after 3 steps
    resumed.load_state_dict(state)
    handed.clear()
    resumed.loss(batch_for(0, 2))
    resumed.loss(batch_for(0, 3))
    assert handed == pytest.approx([0.3, 0.4]) and int(resumed.step) == 5


def test_the_total_weighs_intra_by_lambda_times_the_triplet_weight(monkeypatch):
    """The optimized triplet = hinge + lambda_intra x mean(1 - cos) of matched pairs: the intra term
    is that mean of the ITC embeddings, weighed w_triplet x lambda_intra in the total."""
    import rsray.models.cmpagl as cmpagl

    seen, real = {}, cmpagl.queue_itc_loss

    def recording(image, text, *rest):
        seen["features"] = (image.detach(), text.detach())
        return real(image, text, *rest)

    monkeypatch.setattr(cmpagl, "queue_itc_loss", recording)
    overrides = [
        "model.w_triplet=2.0",
        "model.lambda_intra=0.3",
        "model.w_itc=0.5",
        "model.w_itm=0.7",
        "model.w_mlm=0.9",
    ]
    torch.manual_seed(0)
    model = build_model(load_config("model/cmpagl-tiny", overrides), vocab_size=VOCAB).train()
    losses = model.loss(batch_for(0, 3))
    image, text = seen["features"]
    torch.testing.assert_close(losses["intra"].detach(), (1 - (image * text).sum(dim=1)).mean())
    expected = (
        0.5 * losses["itc"] + 2.0 * losses["triplet"] + 2.0 * 0.3 * losses["intra"] + 0.7 * losses["itm"]
    ) + 0.9 * losses["mlm"]
    torch.testing.assert_close(losses["total"].detach(), expected.detach())
