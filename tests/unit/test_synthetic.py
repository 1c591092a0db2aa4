"""The embedded sample: deterministic, in the Karpathy layout, with captions that describe the pixels."""

from __future__ import annotations

import json
import re
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from rsray.data.synthetic import ANNOTATION_FILE, SCENES, draw_scene, generate_sample, sample_item
from rsray.data.synthetic.canvas import Canvas, Thing
from rsray.data.synthetic.captions import noun_phrase

KEY_WORDS = {  # the object a caption set must mention for each class
    "airport": ("plane", "runway"),
    "beach": ("sea", "umbrella"),
    "farmland": ("field",),
    "forest": ("tree", "clearing"),
    "harbor": ("pier", "boat"),
    "industrial": ("storage tank", "building"),
    "parking": ("car",),
    "residential": ("house",),
    "river": ("river", "bridge"),
    "stadium": ("track", "football field"),
}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    path = generate_sample(tmp_path_factory.mktemp("sample"), n_images=100, image_size=64, progress=False)
    return path, json.loads(path.read_text())


def files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_arguments_give_byte_identical_files(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        generate_sample(tmp_path / name, n_images=20, image_size=48, seed=seed, progress=False)
    a, b, c = (files(tmp_path / name) for name in "abc")
    assert a == b and len(a) == 21
    assert all(a[k] != c[k] for k in a)


def test_image_does_not_depend_on_generation_order(sample):
    path, data = sample
    img = data["images"][37]
    on_disk = np.asarray(Image.open(path.parent / "images" / img["filename"]))
    scene, image, captions = sample_item(37, seed=0, size=64)
    assert img["filename"] == f"{scene}_37.png"
    assert np.array_equal(on_disk, np.asarray(image))
    assert [s["raw"] for s in img["sentences"]] == captions


def test_content_does_not_depend_on_image_size():
    for index in range(10):
        assert sample_item(index, 3, 48)[2] == sample_item(index, 3, 96)[2]


def test_karpathy_layout(sample):
    path, data = sample
    assert path.name == ANNOTATION_FILE and data["dataset"] == "rsray_sample"
    assert data["generator"]["n_images"] == 100
    images = data["images"]
    assert [img["imgid"] for img in images] == list(range(100))
    scenes = Counter()
    for img in images:
        scene = re.match(r"[^_\d]+", img["filename"]).group(0)
        assert scene in SCENES
        scenes[scene] += 1
        raws = [s["raw"] for s in img["sentences"]]
        assert len(raws) == 5 and len(set(raws)) == 5 and all(r.strip() for r in raws)
        assert img["sentids"] == [s["sentid"] for s in img["sentences"]]
        for s in img["sentences"]:
            assert s["imgid"] == img["imgid"]
            assert s["tokens"] == re.findall(r"[a-z0-9]+", s["raw"].lower()) and s["tokens"]
    assert len(scenes) >= 10 and set(scenes.values()) == {10}
    assert len({sid for img in images for sid in img["sentids"]}) == 500
    assert Counter(img["split"] for img in images) == {"train": 80, "val": 10, "test": 10}
    for scene in SCENES:  # stratified: every class has val and test images
        splits = Counter(img["split"] for img in images if img["filename"].startswith(scene + "_"))
        assert splits == {"train": 8, "val": 1, "test": 1}


def test_tiny_sample_still_has_val_and_test(tmp_path):
    data = json.loads(generate_sample(tmp_path, n_images=10, image_size=32, progress=False).read_text())
    assert Counter(img["split"] for img in data["images"]) == {"train": 8, "val": 1, "test": 1}


def test_images_decode_at_requested_size(sample):
    path, data = sample
    for img in data["images"]:
        with Image.open(path.parent / "images" / img["filename"]) as image:
            assert image.size == (64, 64) and image.mode == "RGB"


def test_jpeg_format(tmp_path):
    data = json.loads(
        generate_sample(tmp_path, n_images=10, image_size=40, image_format="jpeg", progress=False).read_text()
    )
    for img in data["images"]:
        assert img["filename"].endswith(".jpg")
        with Image.open(tmp_path / "images" / img["filename"]) as image:
            assert image.format == "JPEG" and image.size == (40, 40) and image.mode == "RGB"


@pytest.mark.parametrize("scene", SCENES)
def test_captions_name_the_scene_objects_and_differ_between_images(scene):
    sets = []
    for k in range(50):
        image, captions = draw_scene(scene, np.random.default_rng(k), 32)
        assert image.size == (32, 32) and image.mode == "RGB"
        assert len(set(captions)) == 5
        assert any(word in captions[0] for word in KEY_WORDS[scene]), captions[0]
        sets.append(tuple(captions))
    assert len(set(sets)) >= 45  # at least 90% of caption sets are unique


def test_captions_carry_counts_colours_and_positions():
    captions = [c for k in range(20) for c in draw_scene("airport", np.random.default_rng(k), 32)[1]]
    text = " ".join(captions)
    assert re.search(r"\b(two|three|four|five|six)\b", text)
    assert re.search(r"\b(red|blue|white|yellow)\b", text)
    assert re.search(r"\b(left|right|top|bottom|center)\b", text)


def test_noun_phrases():
    assert noun_phrase(Thing("plane", 3, "red", "left")) == "three red planes"
    assert noun_phrase(Thing("running track", 1, "orange", "center")) == "an orange running track"
    assert noun_phrase(Thing("car", 23, "colorful", "everywhere")) == "many colorful cars"
    assert noun_phrase(Thing("row of parked cars", 2, None, "center")) == "two rows of parked cars"
    assert noun_phrase(Thing("water", 0, "blue", "bottom")) == "blue water"
    assert noun_phrase(Thing("pier", 2, "grey", "top"), definite=True) == "the two grey piers"


def test_regions_follow_the_mirrored_image():
    """A red square drawn near the frame's left edge must be reported where its pixels are."""
    for seed in range(16):  # covers all eight mirror/transpose orientations
        cv = Canvas(np.random.default_rng(seed), 64)
        cv.ground((0, 0, 0), rough=0)
        cv.rect(0.05, 0.05, 0.2, 0.2, (255, 0, 0))
        region = cv.region([(0.125, 0.125)])
        ys, xs = np.nonzero(np.asarray(cv.image)[..., 0] > 128)
        assert ("left" if xs.mean() < 32 else "right") in region
        assert ("top" if ys.mean() < 32 else "bottom") in region


def test_rerun_with_same_arguments_does_not_rewrite(tmp_path):
    path = generate_sample(tmp_path, n_images=20, image_size=32, progress=False)
    image = tmp_path / "images" / "airport_0.png"
    before = path.stat().st_mtime_ns, image.stat().st_mtime_ns
    assert generate_sample(tmp_path, n_images=20, image_size=32, progress=False) == path
    assert (path.stat().st_mtime_ns, image.stat().st_mtime_ns) == before
    foreign = tmp_path / "images" / "airport_999.jpg"  # not ours: must survive a redraw
    foreign.write_bytes(b"not a sample image")
    generate_sample(tmp_path, n_images=10, image_size=32, progress=False)  # other parameters: redrawn
    assert json.loads(path.read_text())["generator"]["n_images"] == 10
    left = {p.name for p in (tmp_path / "images").iterdir()}
    assert left == {img["filename"] for img in json.loads(path.read_text())["images"]} | {foreign.name}


def test_progress_bar_goes_to_stderr_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    generate_sample(tmp_path / "log", n_images=10, image_size=32, progress=True)
    assert capsys.readouterr() == ("", "")  # stderr is a file or a pipe: the command's one line says it all
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    generate_sample(tmp_path / "terminal", n_images=10, image_size=32, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "10/10" in err


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"n_images": 0}, "n_images"),
        ({"n_images": 5}, "n_images"),
        ({"image_size": 16}, "image_size"),
        ({"image_format": "gif"}, "image_format"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(tmp_path, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        generate_sample(tmp_path, **{"n_images": 20, "image_size": 32, "progress": False, **kwargs})
    assert not (tmp_path / ANNOTATION_FILE).exists()


def test_draw_scene_rejects_unknown_scene_and_tiny_size():
    with pytest.raises(ValueError, match="scene"):
        draw_scene("moon", np.random.default_rng(0), 64)
    with pytest.raises(ValueError, match="size"):
        draw_scene("airport", np.random.default_rng(0), 16)
