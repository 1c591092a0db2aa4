"""The `rsray` command: dispatch, help, one-line errors, and `data inspect --json` (no Ray needed)."""

import json

import pytest

from pipelines.cli import STAGES, main
from rsray.data.synthetic import generate_sample


def test_no_stage_prints_usage_and_fails(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(stage in out for stage in STAGES)
    assert main(["--help"]) == 0


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_explains_itself(stage, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([stage, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: rsray {stage}" in out and len(out) > 300  # a usage line and an explanation


def test_bad_override_is_one_line_with_key(capsys):
    assert main(["prepare", "prepare.image_size=big"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "rsray: error: command line: prepare.image_size: expected int, got str 'big'"


def test_missing_dataset_folder_names_key_before_starting_ray(tmp_path, capsys):
    assert main(["prepare", f"data.root={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.root: folder" in err[0] and "does not exist" in err[0]


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    generate_sample(root, n_images=40, image_size=32, seed=2, progress=False)
    return root


def test_inspect_json_on_a_folder(sample_dir, capsys):
    assert main(["data", "inspect", str(sample_dir), "--json", "data.vocab_min_count=1"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["splits"]["train"] == {"images": 32, "captions": 160}
    assert stats["splits"]["test"]["images"] == 4 and stats["validation"].startswith("fixed")
    assert sum(stats["scenes"].values()) == 40 and len(stats["scenes"]) == 10
    assert stats["vocab_size"] > 10


def test_inspect_table_on_a_config(sample_dir, capsys):
    assert main(["data", "inspect", "presets/sample", f"data.root={sample_dir}"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "scenes: 10" in out and "word vocabulary" in out


def test_inspect_unknown_target(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "nope")]) == 2
    assert "no such dataset folder" in capsys.readouterr().err
