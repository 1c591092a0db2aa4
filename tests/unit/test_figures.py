"""Figures build from small random inputs and save as PNG."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from rsray import figures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def encoded(seed: int, fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def saved(fig, tmp_path, name: str) -> bytes:
    path = tmp_path / name
    fig.savefig(path, dpi=50)
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    return data


def test_loss_and_mr_curves(tmp_path):
    history = [
        {
            "epoch": e,
            "train/total": 1 / e,
            "train/triplet": 0.5 / e,
            "train/pairs_per_second": 100.0,
            "val/mR": 10.0 * e,
        }
        for e in range(1, 5)
    ]
    fig = figures.loss_and_mr_curves(history)
    loss_ax, mr_ax = fig.axes
    assert {line.get_label() for line in loss_ax.get_lines()} == {"total", "triplet"}
    assert [line.get_label() for line in mr_ax.get_lines()] == ["mR"]
    saved(fig, tmp_path, "curves.png")
    saved(figures.loss_and_mr_curves([]), tmp_path, "empty.png")


def test_retrieval_grids(tmp_path):
    captions = ["a plane at the airport", "two boats near a long pier in the harbor"]
    top = [[encoded(i * 5 + j, "PNG" if j % 2 else "JPEG") for j in range(5)] for i in range(2)]
    hits = [[True, False, False, True, False], [False] * 5]
    fig = figures.retrieval_grid(captions, top, hits)
    assert len(fig.axes) == 2 * 6
    saved(fig, tmp_path, "t2i.png")
    fig = figures.retrieval_grid_i2t(
        [encoded(0), np.zeros((16, 16, 3), np.uint8)], [[f"caption {j}" for j in range(5)]] * 2, hits
    )
    saved(fig, tmp_path, "i2t.png")


def test_embedding_projection(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images, texts = torch.randn(12, 16, generator=generator), torch.randn(60, 16, generator=generator)
    scenes = ["beach", "forest", None] * 4
    fig = figures.embedding_projection(images, texts, scenes, [s for s in scenes for _ in range(5)])
    assert "12 images, 60 captions" in fig.axes[0].get_title()
    first = saved(fig, tmp_path, "embed.png")
    again = figures.embedding_projection(images, texts, scenes, [s for s in scenes for _ in range(5)])
    assert saved(again, tmp_path, "embed2.png") == first  # deterministic picture
    with pytest.raises(ValueError, match="differ in size"):
        figures.embedding_projection(images, torch.randn(5, 8), scenes, ["beach"] * 5)


def test_split_figures_mark_hits_from_the_scores(tmp_path):
    import pyarrow as pa

    n = 6
    table = pa.table(
        {
            "image": [encoded(i) for i in range(n)],
            "captions": [[f"caption {i}.{c}" for c in range(2)] for i in range(n)],
            "scene": ["a", "b"] * (n // 2),
        }
    )
    owner = torch.arange(n).repeat_interleave(2)
    scores = torch.eye(n)[:, owner]  # every caption scores highest with its own image
    image_emb, text_emb = torch.randn(n, 4), torch.randn(2 * n, 4)
    made = figures.split_figures(scores, owner, table, image_emb, text_emb, queries=3, k=3)
    assert set(made) == {"retrieval_t2i.png", "retrieval_i2t.png", "embedding_projection.png"}
    for name, fig in made.items():
        saved(fig, tmp_path, name)
    # t2i: the correct image is ranked first for every query -> the first frame of each row is green
    t2i_frames = [ax for ax in made["retrieval_t2i.png"].axes if ax.images]
    first_column = t2i_frames[::3]
    assert all(ax.spines["left"].get_edgecolor()[:3] == matplotlib_rgb(figures.HIT) for ax in first_column)
    assert all(ax.spines["left"].get_edgecolor()[:3] == matplotlib_rgb(figures.MISS) for ax in t2i_frames[1::3])
    # pairwise features (not [n, d] embeddings of one size) give no projection, and no error
    assert "embedding_projection.png" not in figures.split_figures(scores, owner, table, object(), object())


def matplotlib_rgb(colour) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return to_rgb(colour)
