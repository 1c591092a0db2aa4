"""`rsray metrics SCORES.npy`: JSON keys and values on known matrices, the table, one-line errors."""

import json

import numpy as np
import pytest

from pipelines.cli import STAGES, main
from tests.unit.test_metrics import KEYS, SCENE_KEYS  # the protocol's key order, written out once


def perfect(n_images: int, cpi: int = 5) -> np.ndarray:
    """Own pairs score 1, all others 0."""
    return (np.arange(n_images * cpi)[None, :] // cpi == np.arange(n_images)[:, None]).astype(np.float32)


@pytest.fixture
def saved(tmp_path):
    def save(array: np.ndarray, name: str = "scores.npy") -> str:
        np.save(tmp_path / name, array)
        return str(tmp_path / name)

    return save


def run_json(capsys, *args) -> dict:
    assert main(["metrics", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_registered():
    assert STAGES["metrics"][0] == "metrics"


def test_json_on_a_perfect_matrix(saved, capsys):
    m = run_json(capsys, saved(perfect(12)))
    assert list(m) == KEYS
    assert all(m[key] == 100 for key in KEYS[:7]) and m["i2t_medr"] == m["t2i_meanr"] == 1


def test_json_on_a_worst_matrix_with_three_captions_each(saved, capsys):
    # own pairs -1, others 0: an image's captions come after the other 33 (1-based rank 34), a
    # caption's image after the other 11 (rank 12, 0-based 11: a miss at R@10 too)
    m = run_json(capsys, saved(-perfect(12, 3)), "--captions-per-image", "3")
    assert all(m[key] == 0 for key in KEYS[:7])
    assert (m["i2t_medr"], m["t2i_medr"]) == (34, 12)


def test_scenes_file_adds_scene_recall(saved, tmp_path, capsys):
    (tmp_path / "scenes.txt").write_text("a\nb\n\na\n")  # image 2 has no scene
    m = run_json(capsys, saved(perfect(4, 2)), "--captions-per-image", "2", "--scenes", str(tmp_path / "scenes.txt"))
    assert list(m) == KEYS + SCENE_KEYS
    # image 0 (a): own c0 c1, then c2 c3 (b), c4 c5 (none), c6 c7 (a) -> top 5 = a a b b - = 2/5
    # image 1 (b): own c2 c3, then c0 c1 (a), c4 -> 2/5; image 3 (a): own c6 c7, c0 c1 (a), c2 -> 4/5
    assert m["i2t_SR1"] == 100 and m["i2t_SR5"] == pytest.approx(100 * (2 + 2 + 4) / 15)


def test_smr_switch(saved, capsys):
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((30, 150)).astype(np.float32) + 2 * perfect(30)
    raw = run_json(capsys, saved(scores))
    smr = run_json(capsys, saved(scores), "--smr", "--smr-k", "10", "--smr-w", "2", "--smr-beta", "0.5")
    assert list(smr) == KEYS + ["smr_k", "smr_w", "smr_beta"]
    assert (smr["smr_k"], smr["smr_w"], smr["smr_beta"]) == (10, 2.0, 0.5)
    assert smr != {**raw, "smr_k": 10, "smr_w": 2.0, "smr_beta": 0.5}  # re-ranking changed something
    no_op = run_json(capsys, saved(scores), "--smr", "--smr-w", "0")
    assert {key: no_op[key] for key in KEYS} == raw


def test_table(saved, capsys):
    assert main(["metrics", saved(perfect(3))]) == 0
    out = capsys.readouterr().out
    assert "3 images x 15 captions" in out and "R@10" in out and "100.00" in out and "mR" in out


@pytest.mark.parametrize(
    "make, args, message",
    [
        (None, [], "no such file"),
        (lambda: np.zeros((2, 5, 5)), [], "expected a 2-D images x captions matrix, got shape (2, 5, 5)"),
        (lambda: np.zeros((2, 7)), [], "7 captions is not a multiple of --captions-per-image 5"),
        (lambda: np.zeros((2, 15)), [], "2 images x 5 captions each needs 10 caption columns, got 15"),
        (lambda: perfect(3), ["--scenes", "SCENES"], "2 lines for 3 images"),
        (lambda: perfect(3), ["--smr", "--smr-k", "0"], "--smr-k must be a positive integer"),
    ],
)
def test_errors_are_one_line(saved, tmp_path, capsys, make, args, message):
    path = saved(make()) if make else str(tmp_path / "missing.npy")
    (tmp_path / "scenes.txt").write_text("a\nb\n")
    args = [str(tmp_path / "scenes.txt") if a == "SCENES" else a for a in args]
    assert main(["metrics", path, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rsray: error: ") and message in err[0]
