"""Figures a person would rather look at than read: training curves, retrieval grids, embeddings.

Each function returns a matplotlib `Figure` built without pyplot (no global state, safe in Ray
workers and threads); save it with `fig.savefig(path)` or `Tracker.log_figure(fig, name)`.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on workers and servers

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

HIT, MISS = "#2ca02c", "#d62728"
NOT_LOSSES = ("pairs", "seconds", "per_second", "lr", "epoch")  # train/ keys that are not loss terms


def loss_and_mr_curves(history: Sequence[dict[str, Any]]) -> Figure:
    """Two panels over epochs: every train loss term (keys `train/<term>` or `loss/<term>`) and
    every validation mR (keys ending in `mR`, e.g. `val/mR`, `val/smr_mR`). One dict per epoch;
    its `epoch` key gives the x value (else its position, from 1)."""
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    keys = list(dict.fromkeys(k for h in history for k in h))
    losses = [k for k in keys if k.startswith(("train/", "loss/")) and not k.endswith(NOT_LOSSES)]
    mrs = [k for k in keys if k.endswith("mR")]
    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    for ax, names, title, ylabel in (
        (left, losses, "training loss", "loss (epoch mean)"),
        (right, mrs, "validation mR", "mR (%)"),
    ):
        for name in names:
            points = [(e, h[name]) for e, h in zip(epochs, history, strict=True) if h.get(name) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                style = {"linewidth": 2.5} if name.endswith(("total", "/mR")) else {"linewidth": 1.2, "alpha": 0.8}
                ax.plot(xs, ys, marker="o", markersize=3, label=name.split("/", 1)[-1], **style)
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if names:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


def retrieval_grid(
    query_captions: Sequence[str], top_images: Sequence[Sequence[Any]], hits: Sequence[Sequence[bool]]
) -> Figure:
    """Text-to-image: one row per query caption, then its top-k images in rank order, each framed
    green (a correct image) or red."""
    k = max((len(row) for row in top_images), default=1)
    n = len(query_captions)
    fig = Figure(figsize=(2.2 + 1.7 * k, 1.8 * max(n, 1)), layout="constrained")
    grid = fig.add_gridspec(max(n, 1), k + 1, width_ratios=[1.3] + [1] * k)
    for row, (caption, images, marks) in enumerate(zip(query_captions, top_images, hits, strict=True)):
        text_ax = fig.add_subplot(grid[row, 0])
        text_ax.axis("off")
        text_ax.text(1, 0.5, textwrap.fill(caption, 26), va="center", ha="right", fontsize=8.5)
        for col, (image, hit) in enumerate(zip(images, marks, strict=True)):
            ax = fig.add_subplot(grid[row, col + 1])
            ax.imshow(_image(image))
            _frame(ax, hit)
            if row == 0:
                ax.set_title(f"#{col + 1}", fontsize=8)
    fig.suptitle(f"text → image: top-{k} (green = correct image)", fontsize=10)
    return fig


def retrieval_grid_i2t(
    query_images: Sequence[Any], top_captions: Sequence[Sequence[str]], hits: Sequence[Sequence[bool]]
) -> Figure:
    """Image-to-text: one row per query image, then its top-k captions in rank order, each
    coloured green (a caption of that image) or red."""
    n = len(query_images)
    fig = Figure(figsize=(9, 1.9 * max(n, 1)), layout="constrained")
    grid = fig.add_gridspec(max(n, 1), 2, width_ratios=[1, 4.5])
    for row, (image, captions, marks) in enumerate(zip(query_images, top_captions, hits, strict=True)):
        ax = fig.add_subplot(grid[row, 0])
        ax.imshow(_image(image))
        ax.set_xticks([]), ax.set_yticks([])
        text_ax = fig.add_subplot(grid[row, 1])
        text_ax.axis("off")
        slots = max(len(captions), 1)
        for i, (caption, hit) in enumerate(zip(captions, marks, strict=True)):
            line = f"#{i + 1} {'✓' if hit else '✗'}  {textwrap.shorten(caption, 90)}"
            text_ax.text(
                0,
                1 - (i + 0.5) / slots,
                line,
                va="center",
                ha="left",
                fontsize=8,
                color=HIT if hit else MISS,
                transform=text_ax.transAxes,
            )
    fig.suptitle(
        f"image → text: top-{max((len(c) for c in top_captions), default=0)} (green = a caption of that image)",
        fontsize=10,
    )
    return fig


def embedding_projection(
    image_emb: torch.Tensor | np.ndarray,
    text_emb: torch.Tensor | np.ndarray,
    image_scenes: Sequence[str | None],
    caption_scenes: Sequence[str | None],
    max_points: int = 3000,
    seed: int = 0,
) -> Figure:
    """Images (circles) and captions (crosses) in one 2-D PCA of the shared embedding space,
    coloured by scene. Features are L2-normalised first, as retrieval compares them."""
    images, texts = _as_2d(image_emb), _as_2d(text_emb)
    if images.shape[1] != texts.shape[1]:
        raise ValueError(f"image and text embeddings differ in size: {images.shape[1]} vs {texts.shape[1]}")
    feats = torch.nn.functional.normalize(torch.cat([images, texts]), dim=1)
    centred = feats - feats.mean(0, keepdim=True)
    with torch.random.fork_rng(devices=[]):  # pca_lowrank is randomised: same data, same picture
        torch.manual_seed(seed)
        _, _, v = torch.pca_lowrank(centred, q=min(2, *centred.shape), center=False, niter=4)
    xy = (centred @ v[:, :2]).numpy()
    if xy.shape[1] < 2:
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    scenes = [s or "unknown" for s in list(image_scenes) + list(caption_scenes)]
    kind = np.array([0] * len(images) + [1] * len(texts))
    keep = np.arange(len(xy))
    if len(keep) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(keep), max_points, replace=False))
    names = sorted(set(scenes))
    colours = matplotlib.colormaps["tab20" if len(names) > 10 else "tab10"]
    fig = Figure(figsize=(8.5, 6), layout="constrained")
    ax = fig.subplots()
    for index, name in enumerate(names):
        colour = colours(index % colours.N)
        for k, marker, size, alpha in ((1, "x", 14, 0.45), (0, "o", 42, 0.95)):
            sel = [i for i in keep if kind[i] == k and scenes[i] == name]
            if sel:
                ax.scatter(
                    xy[sel, 0],
                    xy[sel, 1],
                    c=[colour],
                    marker=marker,
                    s=size,
                    alpha=alpha,
                    linewidths=1.0 if k else 0.6,
                    edgecolors="black" if k == 0 else None,
                )
    scene_handles = [
        Line2D([], [], marker="s", linestyle="", color=colours(i % colours.N), label=n) for i, n in enumerate(names)
    ]
    kind_handles = [
        Line2D([], [], marker="o", linestyle="", color="gray", label="image"),
        Line2D([], [], marker="x", linestyle="", color="gray", label="caption"),
    ]
    first = ax.legend(handles=kind_handles, loc="upper left", fontsize=8)
    ax.add_artist(first)
    ax.legend(
        handles=scene_handles,
        title="scene",
        fontsize=7,
        title_fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        ncols=1 if len(names) <= 24 else 2,
        frameon=False,
    )
    ax.set(title=f"embeddings, PCA to 2-D ({len(images)} images, {len(texts)} captions)", xlabel="PC 1", ylabel="PC 2")
    ax.grid(alpha=0.2)
    return fig


def split_figures(
    scores: torch.Tensor,
    caption_image: torch.Tensor,
    table: Any,
    image_features: Any = None,
    text_features: Any = None,
    queries: int = 4,
    k: int = 5,
    seed: int = 0,
) -> dict[str, Figure]:
    """The figures a person looks at after a run, from one scored split (`rsray.eval.split.SplitScores`
    fields and its Arrow table with `image`, `captions`, `scene`): t2i and i2t top-k grids for
    `queries` sample queries drawn with `seed` (the same queries every run, so runs compare), and
    the embedding projection when the features are embeddings (pairwise models' are not)."""
    images = table.column("image").to_pylist()
    captions = [c for row in table.column("captions").to_pylist() for c in row]
    scenes = table.column("scene").to_pylist() if "scene" in table.column_names else [None] * len(images)
    owner = caption_image.cpu().tolist()
    scores = scores.float().cpu()
    rng = np.random.default_rng(seed)
    k = min(k, len(images), len(captions))
    figures: dict[str, Figure] = {}

    text_queries = sorted(rng.choice(len(captions), min(queries, len(captions)), replace=False).tolist())
    top_images = [scores[:, j].topk(k).indices.tolist() for j in text_queries]
    figures["retrieval_t2i.png"] = retrieval_grid(
        [captions[j] for j in text_queries],
        [[images[i] for i in row] for row in top_images],
        [[i == owner[j] for i in row] for j, row in zip(text_queries, top_images, strict=True)],
    )

    image_queries = sorted(rng.choice(len(images), min(queries, len(images)), replace=False).tolist())
    top_captions = [scores[i].topk(k).indices.tolist() for i in image_queries]
    figures["retrieval_i2t.png"] = retrieval_grid_i2t(
        [images[i] for i in image_queries],
        [[captions[j] for j in row] for row in top_captions],
        [[owner[j] == i for j in row] for i, row in zip(image_queries, top_captions, strict=True)],
    )

    if (
        torch.is_tensor(image_features)
        and torch.is_tensor(text_features)
        and image_features.shape[-1] == text_features.shape[-1]
    ):
        figures["embedding_projection.png"] = embedding_projection(
            image_features, text_features, scenes, [scenes[i] for i in owner], seed=seed
        )
    return figures


# ----------------------------------------------------------------------------- helpers


def _as_2d(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """[n, d] float32 on CPU; token- or region-level features [n, ..., d] are averaged."""
    x = torch.as_tensor(x).detach().float().cpu()
    if x.ndim > 2:
        x = x.flatten(1, -2).mean(1)
    return x


def _image(image: Any) -> np.ndarray:
    """Encoded bytes (JPEG/PNG/TIFF), a PIL image or an HxW(xC) array -> RGB array for imshow."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(image)))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[2] not in (1, 3):
        array = array.transpose(1, 2, 0)  # CHW tensor
    return array


def _frame(ax: Any, hit: bool) -> None:
    ax.set_xticks([]), ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(HIT if hit else MISS)
        spine.set_linewidth(4)
