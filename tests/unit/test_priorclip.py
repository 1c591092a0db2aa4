"""PriorCLIP: the switches each change the computation, the Spatial-PAE belief filter, the loss and
its gathering across two real processes, loading real (tiny) checkpoints written here: a timm Swin
file, a BERT folder with its tokenizer, a stage-1 `clip` checkpoint for the open-domain stage 2;
the optimizer and schedule the training loop builds from the config."""

from __future__ import annotations

import math
import os

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from rsray.checkpoint import CONFIG_FILE, STATE_FILE
from rsray.config import ConfigError, load_config
from rsray.losses import affiliation_loss, info_nce_loss, row_centres
from rsray.models import build_model, model_config
from rsray.models.pae import SpatialPAE, TemporalPAE, belief_tokens
from rsray.models.priorclip import contrastive_and_affiliation
from rsray.optim import make_optimizer, steps_per_batch
from rsray.train.loop import selection_metric
from rsray.weights import WeightsError
from tests.conftest import run_forked
from tests.unit.transcriptions import post_ln_block

VOCAB = 40


def tiny(name: str, *overrides: str):
    return load_config(f"model/{name}-tiny", list(overrides))


def build(name: str = "priorclip", *overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny(name, *overrides), vocab_size=VOCAB).eval()


def word_batch(n: int = 6, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Images and word-id captions; rows 0/1 show one image, scenes 0, 0, 1, 1, 2, -1."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    tokens = torch.randint(2, VOCAB, (n, length), generator=g)
    tokens[torch.arange(length)[None, :] >= lengths[:, None]] = 0
    return {
        "images": torch.randn(n, 3, 64, 64, generator=g),
        "tokens": tokens,
        "lengths": lengths,
        "image_ids": torch.tensor([0, 0, 1, 2, 3, 4][:n]),
        "scene_ids": torch.tensor([0, 0, 1, 1, 2, -1][:n]),
    }


# ----------------------------------------------------------------------------- Spatial-PAE belief


def test_belief_hard_keeps_the_most_believed_tokens_in_belief_order():
    tokens = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [2.0, 0.0]]])
    instruction = torch.tensor([[1.0, 0.0]])  # belief follows the first coordinate: 3 > 2 > 1 > 0
    kept = belief_tokens(tokens, instruction, "hard", filter_size=2)
    assert torch.equal(kept, torch.tensor([[[3.0, 0.0], [2.0, 0.0]]]))
    with pytest.raises(ValueError, match="model.filter_size: 5 exceeds the image's 4 tokens"):
        belief_tokens(tokens, instruction, "hard", filter_size=5)


def test_belief_soft_scales_every_token_by_belief_plus_inverse_sqrt_rank():
    tokens = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [2.0, 0.0]]])
    instruction = torch.tensor([[1.0, 0.0]])
    belief = torch.softmax(torch.tensor([1.0, 3.0, 0.0, 2.0]), dim=0)
    rank = torch.tensor([3.0, 1.0, 4.0, 2.0])  # 1-based position in the belief order
    expected = tokens * (belief + 1 / rank.sqrt())[None, :, None]
    torch.testing.assert_close(belief_tokens(tokens, instruction, "soft"), expected)


def test_belief_token_norm_is_the_open_releases_normalisation_across_tokens():
    """PIR-CLIP: F.normalize(x * b + x * b) on [B, N, C], PyTorch's default dim=1 = the token axis."""
    tokens = torch.tensor([[[1.0, 0.0], [3.0, 1.0], [0.0, 1.0], [2.0, 2.0]]])
    instruction = torch.tensor([[1.0, 0.0]])
    belief = torch.softmax(torch.tensor([1.0, 3.0, 0.0, 2.0]), dim=0)
    scaled = 2 * tokens * belief[None, :, None]  # the release doubles it; the normalisation cancels that
    expected = scaled / scaled.pow(2).sum(dim=1, keepdim=True).sqrt()  # each channel over the 4 tokens
    torch.testing.assert_close(belief_tokens(tokens, instruction, "token_norm"), expected)
    assert torch.allclose(expected.pow(2).sum(dim=1), torch.ones(1, 2))


def test_belief_token_norm_index_is_the_open_releases_head_line():
    """PIR-CLIP at 9554baf: normalize(x * b + x * w), w = 1 / sqrt(sorted_ind + 1) indexed by rank
    position: token k is weighted by 1/sqrt(1 + index of the k-th most believed token)."""
    tokens = torch.tensor([[[1.0, 0.0], [3.0, 1.0], [0.0, 1.0], [2.0, 2.0]]])
    instruction = torch.tensor([[1.0, 0.0]])
    belief = torch.softmax(torch.tensor([1.0, 3.0, 0.0, 2.0]), dim=0)
    # the belief order is tokens 1, 3, 0, 2: position k gets 1/sqrt(1 + that index)
    weights = torch.tensor([1 / 2**0.5, 1 / 2, 1.0, 1 / 3**0.5])
    mixed = tokens * belief[None, :, None] + tokens * weights[None, :, None]
    expected = mixed / mixed.pow(2).sum(dim=1, keepdim=True).sqrt()
    torch.testing.assert_close(belief_tokens(tokens, instruction, "token_norm_index"), expected)
    assert not torch.allclose(expected, belief_tokens(tokens, instruction, "token_norm"))


@pytest.mark.parametrize("ffn_norm", [False, True])
def test_spatial_pae_rounds_are_their_formula(ffn_norm):
    """x = belief(tokens); each round x = CA_r(SA_r(x), query = W_r instruction + b_r), the one
    query's attention added to every token; out = token 0 before the rounds + head(token 0 after)."""
    torch.manual_seed(0)
    pae = SpatialPAE(16, rounds=2, heads=4, ffn_dim=32, dropout=0.0, belief="hard", filter_size=5, ffn_norm=ffn_norm)
    pae.eval()
    tokens, instruction = torch.randn(2, 7, 16), torch.randn(2, 16)
    with torch.no_grad():
        x = belief_tokens(tokens, instruction, "hard", 5)
        for r in range(2):
            query = instruction @ pae.instruction_maps[r].weight.t() + pae.instruction_maps[r].bias
            x = post_ln_block(pae.cross_attn[r], post_ln_block(pae.self_attn[r], x), queries=query[:, None])
        expected = tokens[:, 0] + x[:, 0] @ pae.head.weight.t() + pae.head.bias
        torch.testing.assert_close(pae(tokens, instruction), expected)


def test_temporal_pae_rounds_are_their_formula():
    """Each round x = CA_r(SA_r(x), queries = W_r x + b_r of the round's input), padded keys masked
    in both; out = CLS + head(CLS after the rounds)."""
    torch.manual_seed(1)
    pae = TemporalPAE(16, rounds=3, heads=4, ffn_dim=32, dropout=0.0).eval()
    tokens = torch.randn(3, 6, 16)
    valid = torch.arange(6)[None, :] < torch.tensor([[6], [2], [4]])
    with torch.no_grad():
        x = tokens
        for r in range(3):
            queries = x @ pae.token_maps[r].weight.t() + pae.token_maps[r].bias
            attended = post_ln_block(pae.self_attn[r], x, key_valid=valid)
            x = post_ln_block(pae.cross_attn[r], attended, queries=queries, key_valid=valid)
        expected = tokens[:, 0] + x[:, 0] @ pae.head.weight.t() + pae.head.bias
        torch.testing.assert_close(pae(tokens, valid), expected)


# ----------------------------------------------------------------------------- switches


def test_ranked_tokens_keeps_the_first_swin_tokens_for_the_belief():
    """PIR ranks swin_feat[:, 0:50]: the image embedding is the Spatial-PAE of the first N tokens."""
    model = build("priorclip", "model.ranked_tokens=20", "model.belief=hard", "model.filter_size=12")
    everything = build("priorclip", "model.belief=hard", "model.filter_size=12")
    images = word_batch()["images"]
    with torch.no_grad():
        tokens = model.vision_proj(model.visual(images))
        assert tokens.shape[1] == 65  # 64 px: the pooled token and an 8 x 8 map
        expected = F.normalize(model.spatial_pae(tokens[:, :20], model.instruction(images)), dim=-1)
        torch.testing.assert_close(model.encode_images({"images": images}), expected)
        assert not torch.allclose(everything.encode_images({"images": images}), expected, atol=1e-4)
    with pytest.raises(ConfigError, match="model.filter_size: keeps 30 of only 20 ranked tokens"):
        model_config(tiny("priorclip", "model.ranked_tokens=20", "model.belief=hard", "model.filter_size=30"))


def _last_block_norms(model) -> list[torch.Tensor]:
    """Each residual block's last BatchNorm weight in the instruction CNN (timm zero-inits them)."""
    from timm.models.resnet import BasicBlock, Bottleneck

    blocks = [m for m in model.instruction.backbone.body.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert blocks
    return [(b.bn3 if isinstance(b, Bottleneck) else b.bn2).weight for b in blocks]


def test_instruction_init_torchvision_is_the_releases_random_prior():
    """PIR's release loads no tensor into its prior: a torchvision-initialised ResNet (every
    BatchNorm weight 1, bias 0; convs kaiming fan-out), not timm's (each block's last BN zeroed)."""
    timm_init = build("priorclip")
    torchvision_init = build("priorclip", "model.instruction_init=torchvision")
    assert all(torch.equal(w, torch.zeros_like(w)) for w in _last_block_norms(timm_init))
    assert all(torch.equal(w, torch.ones_like(w)) for w in _last_block_norms(torchvision_init))
    body = torchvision_init.instruction.backbone.body
    conv = max((m.weight for m in body.modules() if isinstance(m, torch.nn.Conv2d)), key=lambda w: w.numel())
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
    assert float(conv.std()) == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.25)  # kaiming_normal_, fan_out
    with pytest.raises(ConfigError, match="model.instruction_init: initialises a random prior"):
        model_config(tiny("priorclip", "model.instruction_init=torchvision", "model.instruction_checkpoint=train"))


def test_belief_and_filter_size_switches_change_image_embeddings():
    batch = word_batch()
    with torch.no_grad():
        soft = build("priorclip", "model.belief=soft").encode_images(batch)
        hard = build("priorclip", "model.belief=hard").encode_images(batch)
        hard_fewer = build("priorclip", "model.belief=hard", "model.filter_size=8").encode_images(batch)
    assert not torch.allclose(soft, hard, atol=1e-4)
    assert not torch.allclose(hard, hard_fewer, atol=1e-4)


def test_cycle_num_switch_changes_caption_embeddings():
    batch = word_batch()
    model = build("priorclip", "model.cycle_num=0")
    with torch.no_grad():
        none = model.encode_texts(batch)
        one = build("priorclip", "model.cycle_num=1").encode_texts(batch)
        two = build("priorclip", "model.cycle_num=2").encode_texts(batch)
        # with no rounds the caption is L2norm(CLS + head(CLS)) of the projected transformer tokens
        from rsray.models.priorclip import text_inputs

        ids, mask = text_inputs(batch, "tokens", model.config.max_text_tokens, model.cls_id)
        cls = model.text_proj(model.text(ids, mask)[0])[:, 0]
        torch.testing.assert_close(none, torch.nn.functional.normalize(cls + model.temporal_pae.head(cls), dim=-1))
    assert not torch.allclose(none, one, atol=1e-4) and not torch.allclose(one, two, atol=1e-4)


def test_lambda_cs_weights_the_affiliation_term():
    batch = word_batch()
    with torch.no_grad():
        off = build("priorclip", "model.lambda_cs=0").loss(batch)
        double = build("priorclip", "model.lambda_cs=2").loss(batch)
    assert off["affiliation"] > 0
    torch.testing.assert_close(off["total"], off["info_nce"])
    torch.testing.assert_close(double["info_nce"], off["info_nce"])  # same weights, same embeddings
    torch.testing.assert_close(double["total"], off["info_nce"] + 2 * off["affiliation"])


def test_caption_embedding_ignores_what_sits_in_padding():
    model = build()
    batch = word_batch()
    other = dict(batch, tokens=batch["tokens"].clone())
    padding = torch.arange(batch["tokens"].shape[1])[None, :] >= batch["lengths"][:, None]
    other["tokens"][padding] = 7  # a real word id, but past each caption's length
    with torch.no_grad():
        torch.testing.assert_close(model.encode_texts(other), model.encode_texts(batch), atol=1e-5, rtol=0)


def test_frozen_swin_gets_no_grad_and_instruction_backbone_is_always_frozen():
    model = build("priorclip", "model.freeze_backbone=true").train()
    model.loss(word_batch())["total"].backward()
    assert not model.visual.model.training
    assert all(not p.requires_grad and p.grad is None for p in model.visual.parameters())
    assert all(not p.requires_grad and p.grad is None for p in model.instruction.backbone.parameters())
    assert model.instruction.proj.weight.grad is not None and model.vision_proj.weight.grad is not None


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.belief=medium", "model.belief: must be soft or hard"),
        ("model.heads=5", "model.heads: must divide embed_dim"),
        ("model.instruction_checkpoint=/no/such/folder", "model.instruction_checkpoint: no such checkpoint folder"),
        ("model.text_config.hiden_size=3", "model.text_config.hiden_size: not a bert config field"),
        ("model.schedule=cosine", "model.schedule: must be one of step, linear_warmup, cosine_warmup"),
        ("model.betas=[0.9]", "model.betas: expected [beta1, beta2]"),
        ("model.gather_gradient=half", "model.gather_gradient: must be one of whole_batch, mean_over_workers"),
        ("model.ranked_tokens=0", "model.ranked_tokens: must be positive or null"),
        ("model.instruction_init=xavier", "model.instruction_init: must be timm or torchvision"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        model_config(tiny("priorclip", override))
    assert needle in str(err.value) and "command line" in str(err.value) and "\n" not in str(err.value)


def test_paper_config_is_the_papers():
    cfg = model_config(load_config("model/priorclip"))
    assert (cfg.embed_dim, cfg.belief, cfg.filter_size, cfg.instru_num, cfg.cycle_num, cfg.max_text_tokens) == (
        512,
        "soft",
        40,
        2,
        3,
        47,
    )
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.betas, cfg.schedule, cfg.warmup) == (
        "adamw",
        6e-5,
        0.01,
        [0.9, 0.98],
        "linear_warmup",
        0.1,
    )
    assert (
        cfg.augment.crop,
        cfg.augment.random_resized_crop,
        cfg.augment.rand_augment,
        cfg.augment.normalize,
        cfg.augment.interpolation,
        cfg.augment.hflip,
    ) == (224, [0.5, 1.0], [2, 7], "clip", "bicubic", True)
    assert cfg.instruction_checkpoint == "train" and cfg.gather_across_workers and cfg.lambda_cs == 1.0
    assert selection_metric(cfg) == "val/mR"


def test_paper_swin_gives_fifty_tokens_at_224_px():
    from rsray.models.priorclip import SwinTokens

    torch.manual_seed(0)
    swin = SwinTokens("swin_tiny_patch4_window7_224").eval()
    with torch.no_grad():
        tokens = swin(torch.randn(1, 3, 224, 224))
    assert tokens.shape == (1, 50, 768)
    torch.testing.assert_close(tokens[:, 0], tokens[:, 1:].mean(dim=1))  # token 0 is the pooled map


# ----------------------------------------------------------------------------- real checkpoints


def test_swin_weights_load_from_a_timm_file(tmp_path):
    kwargs = model_config(tiny("priorclip")).backbone_kwargs
    torch.manual_seed(3)
    source = timm.create_model("swin_tiny_patch4_window7_224", num_classes=5, **kwargs)  # its head is dropped
    torch.save(source.state_dict(), tmp_path / "swin.pth")
    model = build("priorclip", f"model.backbone_checkpoint={tmp_path / 'swin.pth'}")
    loaded = model.visual.model.state_dict()
    assert loaded and all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.items())
    with pytest.raises(WeightsError, match="nope.pth: no such local file or folder"):  # `rsray train` names the key
        build("priorclip", f"model.backbone_checkpoint={tmp_path / 'nope.pth'}")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, tiny_tokenizer):
    """A 1-layer BERT for the tiny tokenizer's vocabulary, saved with save_pretrained like a hub folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("bert")
    torch.manual_seed(5)
    tokenizer = BertTokenizerFast.from_pretrained(str(tiny_tokenizer))
    bert = BertModel(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )
    bert.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, bert


def tokenized_batch(folder, captions: list[str], seed: int = 0) -> dict[str, torch.Tensor]:
    from rsray.data.loader import collate_pairs
    from rsray.data.text import load_tokenizer

    tokenizer = load_tokenizer(folder)
    g = torch.Generator().manual_seed(seed)
    samples = [
        {
            "image": torch.randn(3, 64, 64, generator=g),
            "tokens": [2, 3],
            "image_index": i,
            "scene_id": i % 2,
            "input_ids": tokenizer(c)["input_ids"],
        }
        for i, c in enumerate(captions)
    ]
    return collate_pairs(samples)


def test_bert_text_encoder_loads_from_a_local_folder_and_reads_input_ids(tiny_bert):
    folder, bert = tiny_bert
    torch.manual_seed(0)
    model = build_model(
        tiny(
            "priorclip",
            "model.text_input=input_ids",
            f"model.text_checkpoint={folder}",
            "model.text_config={}",
            "model.max_text_tokens=6",
        ),
        vocab_size=VOCAB,
    ).eval()
    for key, value in bert.state_dict().items():
        if not key.startswith("pooler."):  # BERT's pooler is dropped: nothing uses it
            assert torch.equal(model.text.model.state_dict()[key], value), key
    assert model.text.model.pooler is None
    batch = tokenized_batch(
        folder, ["two planes at the airport .", "a red park near the river , many trees .", "a beach", "green sea"]
    )
    assert batch["input_ids"].shape[1] > 6  # the longest caption is cut to max_text_tokens, keeping [SEP]
    with torch.no_grad():
        texts = model.encode_texts(batch)
        losses = model.loss(batch)
    assert texts.shape == (4, 32)
    torch.testing.assert_close(texts.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(losses["total"], losses["info_nce"] + model.config.lambda_cs * losses["affiliation"])
    with pytest.raises(ValueError, match="set data.tokenizer"):
        model.encode_texts({k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")})


def test_max_text_tokens_keeps_the_final_separator(tiny_bert):
    from rsray.models.priorclip import text_inputs

    folder, _ = tiny_bert
    batch = tokenized_batch(folder, ["a red park near the river , many trees .", "a beach"])
    ids, mask = text_inputs(batch, "input_ids", 5)
    sep = 3  # [SEP] in the tiny vocabulary
    assert ids.shape == (2, 5) and ids[0, -1] == sep and ids[0, 0] == 2  # [CLS] ... [SEP]
    assert mask[0].tolist() == [1] * 5 and mask[1].tolist() == [1, 1, 1, 1, 0]


# ----------------------------------------------------------------------------- loss across workers

WORLD, LOCAL, DIM = 2, 3, 8


def _gather_worker(rank: int, port: int, images, texts, batch, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        local = {k: v[rows] for k, v in batch.items()}
        gathered = contrastive_and_affiliation(images[rows], texts[rows], local, 14.0, 10.0, True, 1.0)
        alone = contrastive_and_affiliation(images[rows], texts[rows], local, 14.0, 10.0, False, 1.0)
        local_centres = contrastive_and_affiliation(
            images[rows], texts[rows], local, 14.0, 10.0, True, 1.0, centres="sample", local_centres=True
        )
        grads, totals = {}, {}
        cases = (
            ("class", {}),
            ("local", {"centres": "sample", "local_centres": True}),
            ("release", {"gather_gradient": "mean_over_workers"}),
        )
        for name, switches in cases:
            leaf_images, leaf_texts = images[rows].clone().requires_grad_(), texts[rows].clone().requires_grad_()
            total = contrastive_and_affiliation(leaf_images, leaf_texts, local, 14.0, 10.0, True, 1.0, **switches)
            total["total"].backward()
            grads[name], totals[name] = (leaf_images.grad, leaf_texts.grad), float(total["total"])
        assert totals["release"] == totals["class"]  # the switch scales the gradient, not the loss
        out[rank] = (
            {k: float(v) for k, v in gathered.items()},
            {k: float(v) for k, v in alone.items()},
            float(local_centres["affiliation"]),
            grads,
        )
    finally:
        dist.destroy_process_group()


def test_gathered_loss_on_two_workers_is_the_loss_of_the_whole_batch():
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(WORLD * LOCAL, DIM), dim=1)
    texts = torch.nn.functional.normalize(torch.randn(WORLD * LOCAL, DIM), dim=1)
    batch = {"image_ids": torch.tensor([0, 0, 1, 2, 3, 3]), "scene_ids": torch.tensor([0, 0, 1, 0, 1, -1])}
    whole = contrastive_and_affiliation(images, texts, batch, 14.0, 10.0, True, 1.0)  # one process: nothing to gather

    out = mp.Manager().dict()
    run_forked(_gather_worker, (images, texts, batch, out), WORLD)
    for term in ("total", "info_nce"):  # InfoNCE: each worker its own rows against all; their mean is the whole
        mean = sum(out[rank][0][term] for rank in range(WORLD)) / WORLD
        assert mean == pytest.approx(float(whole[term]), rel=1e-5), term
    # the releases' centres: each worker's rows make its rows' centres, then all rows meet all centres
    halves = [slice(0, LOCAL), slice(LOCAL, 2 * LOCAL)]
    given = tuple(torch.cat([row_centres(x[h], batch["scene_ids"][h]) for h in halves]) for x in (images, texts))
    per_worker = affiliation_loss(images, texts, batch["scene_ids"], 10.0, "sample", given_centres=given)
    across = affiliation_loss(images, texts, batch["scene_ids"], 10.0, "sample")
    assert float(per_worker) != pytest.approx(float(across), rel=1e-3)  # scene 0 spans both workers
    # gradients: every worker's rows get W x the whole batch's (DDP's average divides W out), for
    # InfoNCE's local rows and the affiliation term alike, with class or per-worker centres
    whole_grads = {}
    for name in ("class", "local"):
        leaf_images, leaf_texts = images.clone().requires_grad_(), texts.clone().requires_grad_()
        contrastive = info_nce_loss(leaf_images @ leaf_texts.t(), 14.0, batch["image_ids"])
        if name == "class":
            affiliation = affiliation_loss(leaf_images, leaf_texts, batch["scene_ids"], 10.0)
        else:
            centres = tuple(
                torch.cat([row_centres(x[h], batch["scene_ids"][h]) for h in halves]) for x in (leaf_images, leaf_texts)
            )
            affiliation = affiliation_loss(leaf_images, leaf_texts, batch["scene_ids"], 10.0, "sample", False, centres)
        (contrastive + affiliation).backward()
        whole_grads[name] = (leaf_images.grad, leaf_texts.grad)
    whole_grads["release"] = whole_grads["class"]
    for rank in range(WORLD):
        gathered, alone, local_centres, grads = out[rank]
        assert gathered["affiliation"] == pytest.approx(float(whole["affiliation"]), rel=1e-5)  # over all rows
        assert alone["info_nce"] != pytest.approx(gathered["info_nce"], rel=1e-3)  # the switch matters
        assert local_centres == pytest.approx(float(per_worker), rel=1e-5)
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        for name in ("class", "local"):
            for worker, single in zip(grads[name], whole_grads[name], strict=True):
                torch.testing.assert_close(worker, WORLD * single[rows], msg=f"{name} centres, rank {rank}")
        # the releases' gathers: after DDP's average 1/W of the whole batch's, so here 1x, not Wx
        for worker, single in zip(grads["release"], whole_grads["release"], strict=True):
            torch.testing.assert_close(worker, single[rows], msg=f"mean_over_workers, rank {rank}")


# ----------------------------------------------------------------------------- optimizer and schedule


def test_linear_warmup_schedule_rises_then_decays_to_zero():
    model = build()
    cfg = model_config(tiny("priorclip", "model.warmup=0.2", "model.lr=0.001", "model.weight_decay=0.05"))
    optimizer, schedule = make_optimizer(model, cfg, total_steps=10)
    assert steps_per_batch(cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert (group["betas"], group["weight_decay"]) == ((0.9, 0.98), 0.05)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(
        1 for p in model.parameters() if p.requires_grad
    )
    assert optimizer.param_groups[1]["weight_decay"] == 0.0  # biases, norms, temperatures (PIR's AdamW)
    lrs = []
    for _ in range(10):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs[:3] == pytest.approx([0.0, 0.0005, 0.001])  # 2 warm-up steps of 10
    assert lrs[2:] == sorted(lrs[2:], reverse=True) and schedule.get_last_lr()[0] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="total number of optimizer steps"):
        make_optimizer(model, cfg)


def test_configs_without_the_new_keys_get_adam_and_step_decay_as_before():
    model = torch.nn.Linear(2, 2)
    cfg = model_config(load_config("model/vsepp-tiny"))
    optimizer, schedule = make_optimizer(model, cfg)
    assert type(optimizer) is torch.optim.Adam and not steps_per_batch(cfg)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (cfg.lr, (0.9, 0.999), 0)
    assert isinstance(schedule, torch.optim.lr_scheduler.StepLR) and schedule.step_size == cfg.decay_every


# ----------------------------------------------------------------------------- open domain, stage 2


def save_checkpoint(folder, cfg, model) -> str:
    """A checkpoint folder in the layout `rsray train` writes (state.pt + config.yaml)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "epoch": 0}, folder / STATE_FILE)
    cfg.save(folder / CONFIG_FILE)
    return str(folder)


def test_open_domain_stage_two_starts_from_a_stage_one_checkpoint(tmp_path):
    clip_cfg = tiny("clip")
    torch.manual_seed(11)
    stage_one = build_model(clip_cfg, vocab_size=VOCAB)
    with torch.no_grad():
        stage_one.logit_scale.log_scale.fill_(math.log(50.0))  # what stage 1 learned, not the 1/0.07 start
    folder = save_checkpoint(tmp_path / "clip-ckpt", clip_cfg, stage_one)

    model = build("priorclip_open", f"model.clip_checkpoint={folder}").train()
    for key, value in stage_one.state_dict().items():
        assert torch.equal(model.clip.state_dict()[key], value), key
    batch = word_batch()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_texts(batch), stage_one.eval().encode_texts(batch))
        # the InfoNCE term runs at stage 1's learned scale
        model.eval()
        images, texts = model.encode_images(batch), model.encode_texts(batch)
        expected = info_nce_loss(images @ texts.t(), 50.0, batch["image_ids"])
        torch.testing.assert_close(model.loss(batch)["info_nce"], expected)
        model.train()
    model.loss(batch)["total"].backward()
    assert not model.clip.text.training
    assert all(not p.requires_grad and p.grad is None for p in model.clip.text.parameters())  # text frozen
    assert all(p.grad is not None for p in model.clip.visual.parameters())  # the vision tower fine-tunes
    assert model.instruction.proj.weight.grad is not None

    with pytest.raises(ValueError, match="model.embed_dim: 16, but stage 1 embeds in 32"):
        build("priorclip_open", f"model.clip_checkpoint={folder}", "model.embed_dim=16")
    scene_cfg = tiny("scene_prior")
    other = save_checkpoint(tmp_path / "prior-ckpt", scene_cfg, build_model(scene_cfg, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="not a clip"):
        build("priorclip_open", f"model.clip_checkpoint={other}")


def test_open_domain_switches_change_image_embeddings():
    batch = word_batch()
    with torch.no_grad():
        soft = build("priorclip_open").encode_images(batch)
        hard = build("priorclip_open", "model.belief=hard").encode_images(batch)
        cls = build("priorclip_open", "model.pool=cls").encode_images(batch)
    assert not torch.allclose(soft, hard, atol=1e-4) and not torch.allclose(soft, cls, atol=1e-4)
    with pytest.raises(ConfigError, match="model.pool: cls needs belief soft"):
        model_config(tiny("priorclip_open", "model.pool=cls", "model.belief=hard"))
    with torch.no_grad():  # lambda_cs 0: the affiliation term is reported, not added
        model = build("priorclip_open", "model.lambda_cs=0")
        losses = model.loss(batch)
        images, texts = model.encode_images(batch), model.encode_texts(batch)
        expected = affiliation_loss(images, texts, batch["scene_ids"], model.affiliation_scale())
        torch.testing.assert_close(losses["affiliation"], expected)
        assert float(losses["affiliation"]) > 0 and torch.equal(losses["total"], losses["info_nce"])


def test_open_release_switches_reach_the_loss_and_the_text_tower():
    """shared_logit_scale: no tau2 of its own, the affiliation term at CLIP's scale; pair positives:
    InfoNCE against the diagonal although rows 0 and 1 show one image; freeze_text false: the text
    tower trains."""
    model = build(
        "priorclip_open",
        "model.shared_logit_scale=true",
        "model.contrastive_positives=pair",
        "model.affiliation_centres=sample",
        "model.freeze_text=false",
    )
    assert model.affiliation_scale is None
    batch = word_batch()
    with torch.no_grad():
        images, texts = model.encode_images(batch), model.encode_texts(batch)
        scale = model.clip.logit_scale()
        losses = model.loss(batch)
        affiliation = affiliation_loss(images, texts, batch["scene_ids"], scale, "sample")
        torch.testing.assert_close(losses["affiliation"], affiliation)
        torch.testing.assert_close(losses["info_nce"], info_nce_loss(images @ texts.t(), scale))
        assert float(losses["info_nce"]) != pytest.approx(
            float(info_nce_loss(images @ texts.t(), scale, batch["image_ids"]))
        )
    model.train().loss(batch)["total"].backward()
    assert model.clip.text.training
    assert all(p.grad is not None for p in model.clip.text.parameters())
    with pytest.raises(ConfigError, match="model.affiliation_local_centres: .* needs sample"):
        model_config(tiny("priorclip_open", "model.affiliation_local_centres=true"))


def test_the_open_release_preset_sets_each_documented_difference_and_trains_a_step():
    release = model_config(load_config("model/priorclip_open-release"))
    switches = {
        "belief": "token_norm_index",
        "freeze_text": False,
        "shared_logit_scale": True,
        "affiliation_centres": "sample",
        "affiliation_local_centres": True,
        "affiliation_t2i_transposed": False,
        "contrastive_positives": "pair",
        "weight_decay": 0.5,
        "betas": [0.9, 0.999],
        "schedule": "cosine_warmup",
        "warmup_steps": 10000,
        "decay_exempt": "open_clip",
        "logit_scale_clamp": "after_step",
        "gather_gradient": "mean_over_workers",
        "clip_checkpoint": None,
    }
    assert {key: getattr(release, key) for key in switches} == switches
    assert release.clip.activation == "gelu" and release.clip.checkpoint is None
    augment = release.augment
    assert (augment.random_resized_crop, augment.hflip, augment.rand_augment) == ([0.9, 1.0], False, [])
    paper = model_config(load_config("model/priorclip_open"))
    assert {key: getattr(paper, key) for key in switches} != switches
    # its tiny form takes an optimiser step: the text tower trains, the frozen prior does not
    cfg = load_config("model/priorclip_open-release-tiny")
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=VOCAB).train()
    # the switches reach the model: stage 1's towers built with exact GELU, its scale clamped after steps
    assert model.clip.visual.model.config.hidden_act == model.clip.text.model.config.hidden_act == "gelu"
    assert model.clip.logit_scale.clamp == "after_step" and model.affiliation_scale is None
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer, schedule = make_optimizer(model, model_config(cfg), total_steps=20)
    optimizer.step()  # step 0 of the warm-up has lr 0
    schedule.step()
    model.loss(word_batch())["total"].backward()
    optimizer.step()
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert any(name.startswith("clip.text.") for name in moved)
    assert not any(name.startswith("instruction.backbone.") for name in moved)


def test_one_instruction_query_is_the_releases_expanded_queries_in_eval_and_in_training():
    """In eval one query gives the copies' numbers; in training (dropout) it is expanded, so the
    same seed draws the same per-position masks as the release's copies."""
    from rsray.models.pae import CrossAttentionBlock

    torch.manual_seed(0)
    block = CrossAttentionBlock(16, 4, 32, dropout=0.3)
    x, query = torch.randn(2, 5, 16), torch.randn(2, 1, 16)
    copies = query.expand(-1, 5, -1)
    block.eval()
    torch.testing.assert_close(block(x, query), block(x, copies))
    block.train()
    torch.manual_seed(7)
    one = block(x, query)
    torch.manual_seed(7)
    torch.testing.assert_close(one, block(x, copies))


def test_release_switches_reach_the_model_and_its_loss():
    """pae_ffn_norm puts PIR's LayerNorm inside every PAE feed-forward; the affiliation switches
    give the model's loss exactly `affiliation_loss` with per-sample centres and the transposed term."""
    model = build(
        "priorclip",
        "model.pae_ffn_norm=true",
        "model.affiliation_centres=sample",
        "model.affiliation_t2i_transposed=true",
    )
    norms = [
        block.ffn[1] for pae in (model.spatial_pae, model.temporal_pae) for block in [*pae.self_attn, *pae.cross_attn]
    ]
    assert norms and all(isinstance(norm, torch.nn.LayerNorm) for norm in norms)
    batch = word_batch()
    with torch.no_grad():
        images, texts = model.encode_images(batch), model.encode_texts(batch)
        expected = affiliation_loss(
            images, texts, batch["scene_ids"], model.affiliation_scale(), centres="sample", transposed_t2i=True
        )
        torch.testing.assert_close(model.loss(batch)["affiliation"], expected)
    with pytest.raises(ConfigError, match="affiliation_t2i_transposed: reproduces the release's term"):
        model_config(tiny("priorclip", "model.affiliation_t2i_transposed=true"))


def test_the_release_preset_sets_each_documented_difference_and_trains_a_step():
    release = load_config("model/priorclip-release")
    typed = model_config(release)
    switches = ("belief", "pae_ffn_norm", "affiliation_centres", "affiliation_t2i_transposed", "instruction_bn")
    assert [getattr(typed, key) for key in switches] == ["hard", True, "sample", True, "train"]
    assert (typed.decay_exempt, typed.filter_size, typed.gather_gradient) == ("pir", 40, "mean_over_workers")
    assert model_config(load_config("model/priorclip")).gather_gradient == "whole_batch"
    assert (release.train.batch_size, release.train.num_workers, release.train.epochs) == (128, 2, 50)
    paper = model_config(load_config("model/priorclip"))
    assert [getattr(paper, key) for key in switches] == ["soft", False, "class", False, "eval"]
    # at test size: the tiny preset with the release's switches, one training step
    model = build(
        "priorclip", *(f"model.{key}={str(getattr(typed, key)).lower()}" for key in switches), "model.filter_size=8"
    ).train()
    assert model.instruction.backbone.body.training  # batch statistics in the frozen prior
    model.loss(word_batch())["total"].backward()
