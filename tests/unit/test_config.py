"""Config: YAML + overrides, defaults chains, and one-line errors naming key and file."""

import pytest
import yaml

from rsray.config import CONF_DIR, Config, ConfigError, load_config
from rsray.config_tree import (
    build_section,
    find_config_file,
    merge_config_file,
    merge_into,
    nest,
    parse_override,
    read_yaml_mapping,
)


def write(path, text):
    path.write_text(text)
    return path


def test_defaults_when_no_file():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.data.captions_per_image == 5 and cfg.data.validation.folds == 5


def test_file_then_overrides_win(tmp_path):
    f = write(tmp_path / "c.yaml", "data:\n  name: mine\n  vocab_min_count: 3\nprepare:\n  image_size: 64\n")
    cfg = load_config(f, ["prepare.image_size=96", "data.vocab_splits=[train,test]"])
    assert cfg.data.name == "mine" and cfg.data.vocab_min_count == 3
    assert cfg.prepare.image_size == 96
    assert cfg.data.vocab_splits == ["train", "test"]
    assert cfg.source_of("prepare.image_size") == "command line"
    assert cfg.source_of("data.name") == str(f.resolve())


def test_defaults_chain_is_merged_in_order(tmp_path):
    write(tmp_path / "base.yaml", "data:\n  name: base\n  images: imgs\n")
    f = write(tmp_path / "child.yaml", "defaults: [base.yaml]\ndata:\n  name: child\n")
    cfg = load_config(f)
    assert (cfg.data.name, cfg.data.images) == ("child", "imgs")
    assert cfg.source_of("data.images").endswith("base.yaml")


def test_every_shipped_config_loads():
    """Run configs load as configs; sweep files (conf/sweep/) load as sweeps, with their base config."""
    from rsray.sweep import load_sweep

    files = sorted(CONF_DIR.rglob("*.yaml"))
    sweeps = sorted((CONF_DIR / "sweep").glob("*.yaml"))
    assert files and sweeps
    needs = {  # what a user must add: the SMR sweep's checkpoint, the frozen ResNet-50's weights
        "smr": ["sweep.checkpoint=data/runs/some-run/checkpoint"],
        "swan-margin": ["model.backbone_checkpoint=/mnt/weights/resnet50.pth"],
        "dove-lambda_g": ["model.backbone_checkpoint=/mnt/weights/resnet50.pth"],
    }
    for f in files:
        if f in sweeps:
            load_sweep(f, needs.get(f.stem, []))
        else:
            load_config(f)


def test_config_names_resolve_under_conf():
    assert load_config("presets/cpu-tiny").sample.images == 200


@pytest.mark.parametrize(
    "text, override, needle",
    [
        ("data:\n  colour: red\n", [], "data.colour: unknown key"),
        ("prepare:\n  image_size: big\n", [], "prepare.image_size: expected int, got str 'big'"),
        ("prepare:\n  image_size: 4\n", [], "prepare.image_size: must be at least 16"),
        ("prepare:\n  max_reject_fraction: -0.5\n", [], "prepare.max_reject_fraction: must be in [0, 1]"),
        ("data:\n  validation:\n    fold: 7\n", [], "data.validation.fold: must be in [0, 5)"),
        ("data:\n  format: xml\n", [], "data.format: must be karpathy"),
        ("data:\n  stopwords: keep\n", [], "data.stopwords: must be drop or unk, got 'keep'"),
        ("colours: {}\n", [], "colours: unknown key"),
    ],
)
def test_bad_values_name_key_and_file(tmp_path, text, override, needle):
    f = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_config(f, override)
    message = str(err.value)
    assert needle in message and str(f.resolve()) in message
    assert "\n" not in message


def test_bad_override_names_command_line():
    with pytest.raises(ConfigError, match=r"^command line: prepare.rows_per_file: must be positive"):
        load_config(None, ["prepare.rows_per_file=0"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["prepare.rows_per_file"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    f = write(tmp_path / "broken.yaml", "data:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: line \d+, column \d+ invalid YAML"):
        load_config(f)


def test_error_helper_names_source(tmp_path):
    f = write(tmp_path / "c.yaml", "data:\n  root: /nowhere\n")
    cfg = load_config(f)
    assert str(cfg.error("data.root", "path does not exist")) == f"{f.resolve()}: data.root: path does not exist"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("presets/cpu-tiny", ["data.name=x"])
    cfg.save(tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again.to_dict() == cfg.to_dict()
    assert "origins" not in yaml.safe_load((tmp_path / "resolved.yaml").read_text())


def test_free_form_section_is_typed_on_demand(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Tiny:
        width: int = 8
        margin: float = 0.2

        def check(self):
            if self.margin < 0:
                yield "margin", f"must not be negative, got {self.margin}"

    f = write(tmp_path / "m.yaml", "model:\n  name: tiny\n  width: 16\n")
    cfg = load_config(f, ["model.margin=0.3"])
    assert cfg.typed_section("model", Tiny) == Tiny(width=16, margin=0.3)
    with pytest.raises(ConfigError, match=r"^command line: model.margin: must not be negative"):
        load_config(f, ["model.margin=-1"]).typed_section("model", Tiny)
    with pytest.raises(ConfigError, match=r"^command line: model.depth: unknown key"):
        load_config(f, ["model.depth=2"]).typed_section("model", Tiny)
    g = write(tmp_path / "g.yaml", "model:\n  name: tiny\n  depth: 2\n")
    with pytest.raises(ConfigError, match=r"g.yaml: model.depth: unknown key"):
        load_config(g).typed_section("model", Tiny)


def test_resolved_dict_round_trips_with_checks():
    from rsray.config import config_from_dict

    cfg = load_config("presets/cpu-tiny", ["model.name=vsepp", "train.epochs=3"])
    again = config_from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    bad = cfg.to_dict()
    bad["train"]["epochs"] = 0
    with pytest.raises(ConfigError, match=r"^resolved config: train.epochs: must be positive"):
        config_from_dict(bad)


def test_exponent_without_a_dot_is_a_float():
    """YAML 1.1 reads `1e-4` as a string; float fields accept it, other text still fails in one line."""
    assert load_config("model/vsepp-tiny", ["model.lr=1e-4"]).typed_section("model", _vsepp_config()).lr == 1e-4
    assert load_config("train/cpu-tiny", ["train.grad_clip=1e1"]).train.grad_clip == 10.0
    with pytest.raises(ConfigError, match="train.grad_clip: expected float"):
        load_config("train/cpu-tiny", ["train.grad_clip=lots"])


def _vsepp_config():
    from rsray.models.vsepp import VseppConfig

    return VseppConfig


def test_the_tree_helpers_other_config_files_build_on(tmp_path):
    """What sweeps reuse to embed a training config: find, read, merge with origins, build."""
    assert find_config_file("presets/cpu-tiny").name == "cpu-tiny.yaml"
    with pytest.raises(ConfigError, match="nowhere.yaml: sweep file not found"):
        find_config_file(tmp_path / "nowhere.yaml", "sweep file")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        read_yaml_mapping(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="command line: 'epochs': expected key=value"):
        parse_override("epochs")
    assert parse_override(" train.epochs = 3") == ("train.epochs", 3)
    tree, origins = {}, {}
    merge_config_file(find_config_file("train/cpu-tiny"), tree, origins)
    merge_into(tree, nest("train.epochs", 7), origins, "here")
    cfg = build_section(Config, tree, prefix="", origins=origins)
    assert cfg.train.epochs == 7 and origins["train.epochs"] == "here"
    assert origins["train.batch_size"].endswith("cpu-tiny.yaml")


def test_every_paper_recipe_has_its_published_row_and_names_its_weights_by_hub_name():
    """A recipe (conf/recipes/) trains one published row: its model and data have a row in
    rsray.published, its typed model config checks, and its initial weights are Hub names a run
    resolves through rsray.weights (no local paths that exist only on someone's machine)."""
    import re

    from rsray.models import model_config
    from rsray.published import published_rows

    recipes = sorted((CONF_DIR / "recipes").glob("*.yaml"))
    assert [r.stem for r in recipes] == ["clip-rsitmd", "pir-rsicd", "pir-rsitmd", "swan-rsicd", "swan-rsitmd"]
    hub_name = re.compile(r"^(hf-hub:)?[\w.-]+/[\w.-]+$")
    for recipe in recipes:
        cfg = load_config(f"recipes/{recipe.stem}")
        assert published_rows(cfg.model["name"], cfg.data.name), recipe.stem
        model_config(cfg)
        weights = {k: v for k, v in cfg.model.items() if k.endswith("checkpoint") and v and v != "train"}
        assert weights and all(hub_name.match(v) for v in weights.values()), (recipe.stem, weights)
        assert cfg.train.use_gpu and cfg.train.data == cfg.prepare.output, recipe.stem


def test_the_corpus_stages_chain_a_webdataset_stage_1_into_priorclip_open_on_rsitmd():
    """conf/corpus: stage 1 (CLIP on a WebDataset corpus) and stage 2 (PriorCLIP open domain on
    RSITMD from stage 1's checkpoint) check as configs and share one tokenizer, as stage 2 needs."""
    from rsray.models import model_config

    stage1, stage2 = load_config("corpus/stage1-clip"), load_config("corpus/stage2-priorclip-open-rsitmd")
    assert stage1.data.format == "webdataset" and stage1.model["name"] == "clip"
    assert stage1.train.data == stage1.prepare.output
    assert stage2.model["name"] == "priorclip_open" and stage2.model["clip_checkpoint"].startswith("s3://")
    assert stage1.data.tokenizer == stage2.data.tokenizer == stage1.model["checkpoint"]
    model_config(stage1), model_config(stage2)
