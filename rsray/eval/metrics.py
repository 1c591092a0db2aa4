"""The protocol's retrieval metrics: R@K, mR, median/mean rank and scene recall SR@K.

S is the [n_img, n_txt] similarity matrix and `caption_image[j]` the image caption j describes,
so any number of captions per image works (`caption_to_image` builds the benchmark layout: 5
consecutive captions per image). One ordering rule holds everywhere, here and in
`rsray.eval.scoring`: results by descending score, ties by ascending index (what a stable sort
gives), so the numbers never depend on the device or on how a kernel happens to break ties.
Everything is vectorised torch and runs on the device S is on; percentages are 0-100 and the
key names avoid `@` (MLflow refuses it in metric names).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_KS = (1, 5, 10)
Scenes = Sequence[str | None] | torch.Tensor


def caption_to_image(
    n_images: int, captions_per_image: int = 5, device: torch.device | str | None = None
) -> torch.Tensor:
    """The benchmark layout: caption j belongs to image j // captions_per_image."""
    return torch.arange(n_images, device=device).repeat_interleave(captions_per_image)


def scene_ids(image_scenes: Scenes, n_images: int, device: torch.device | str | None = None) -> torch.Tensor:
    """One integer per image, -1 for no scene; accepts scene names (None or "" = no scene) or ids."""
    if isinstance(image_scenes, torch.Tensor):
        ids = image_scenes.to(device=device, dtype=torch.long)
    else:
        names: dict[str, int] = {}
        ids = torch.tensor(
            [names.setdefault(s, len(names)) if s else -1 for s in image_scenes], dtype=torch.long, device=device
        )
    if ids.shape != (n_images,):
        raise ValueError(f"got {ids.numel()} scenes for {n_images} images: give one per image (None = no scene)")
    return ids


def check_caption_image(
    caption_image: torch.Tensor | Sequence[int], n_img: int, n_txt: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """caption_image as a LongTensor on `device`, refused unless every image has a caption."""
    ci = torch.as_tensor(caption_image, device=device)
    if ci.shape != (n_txt,) or ci.is_floating_point() or ci.dtype == torch.bool:
        raise ValueError(
            f"caption_image must hold one integer image index per caption ({n_txt}), "
            f"got {ci.dtype} of shape {tuple(ci.shape)}"
        )
    ci = ci.long()
    if n_txt and (ci.min() < 0 or ci.max() >= n_img):
        raise ValueError(f"caption_image holds image indices outside [0, {n_img})")
    missing = torch.bincount(ci, minlength=n_img) == 0
    if missing.any():
        raise ValueError(f"image {int(missing.nonzero()[0])} has no caption: image-to-text ranks need at least one")
    return ci


def _check_matrix(S: torch.Tensor, caption_image) -> torch.Tensor:
    if S.dim() != 2:
        raise ValueError(f"expected a 2-D [images, captions] score matrix, got shape {tuple(S.shape)}")
    if S.numel() == 0:
        raise ValueError(f"empty score matrix of shape {tuple(S.shape)}")
    if torch.isnan(S).any():
        raise ValueError("the score matrix contains NaN")
    return check_caption_image(caption_image, *S.shape, device=S.device)


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive cut-offs such as (1, 5, 10), got {ks}")
    return ks


# ----------------------------------------------------------------------------- ranking


def stable_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of a 2-D tensor in result order: descending value, ties by lower index.

    torch.topk alone may return any of several entries tied at the k-th value, and in any order
    among equal values. Its values are well defined, though: asking for k + 1 of them shows the
    rows where the (k+1)-th value equals the k-th (ties across the cut, rare with real scores).
    Only those rows are redone, keeping the lowest-index ties; each row is then put in order
    with a stable sort. So the cost is about one torch.topk.
    """
    k = min(int(k), x.shape[-1])
    values, idx = x.topk(min(k + 1, x.shape[-1]), dim=-1)
    kth = values[:, k - 1 : k]
    if values.shape[-1] > k:
        crowded = (values[:, k] == values[:, k - 1]).nonzero()[:, 0]
        values, idx = values[:, :k], idx[:, :k]
    else:
        crowded = values.new_empty(0, dtype=torch.long)
    if crowded.numel():
        xc, kc = x[crowded], kth[crowded]
        above, tied = xc > kc, xc == kc
        room = k - above.sum(-1, keepdim=True)
        keep = above | (tied & (tied.cumsum(-1) <= room))  # exactly k per row
        idx[crowded] = keep.nonzero()[:, 1].view(-1, k)
    idx = idx.sort(dim=-1).values  # ascending index, so the stable sort below breaks ties by index
    values = x.gather(-1, idx)
    order = values.argsort(dim=-1, descending=True, stable=True)
    return values.gather(-1, order), idx.gather(-1, order)


def _position(S: torch.Tensor, value: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """0-based position, in row q's result order, of entry index[q] whose score is value[q]."""
    v = value[:, None]
    cols = torch.arange(S.shape[1], device=S.device)
    return (S > v).sum(1) + ((S == v) & (cols < index[:, None])).sum(1)


def _ranks_i2t(S: torch.Tensor, ci: torch.Tensor) -> torch.Tensor:
    n_img, n_txt = S.shape
    cols = torch.arange(n_txt, device=S.device)
    own = S[ci, cols]  # each caption's score with its own image
    # the image's own caption that comes first in its list: highest score, then lowest index
    # (every image has a caption, so include_self=False leaves no slot of `empty` unwritten)
    best = own.new_empty(n_img).scatter_reduce(0, ci, own, "amax", include_self=False)
    first = torch.where(own == best[ci], cols, n_txt)
    first = first.new_empty(n_img).scatter_reduce(0, ci, first, "amin", include_self=False)
    return _position(S, best, first)


def _ranks_t2i(S: torch.Tensor, ci: torch.Tensor) -> torch.Tensor:
    own = S[ci, torch.arange(S.shape[1], device=S.device)]
    return _position(S.t(), own, ci)


def ranks_i2t(S: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
    """LongTensor[n_img]: 0-based rank of each image's best-placed own caption among all captions."""
    return _ranks_i2t(S, _check_matrix(S, caption_image))


def ranks_t2i(S: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
    """LongTensor[n_txt]: 0-based rank of each caption's own image among all images."""
    return _ranks_t2i(S, _check_matrix(S, caption_image))


def _t2i_matrix(S: torch.Tensor, t2i_scores: torch.Tensor | None) -> torch.Tensor:
    """The matrix text-to-image ranks are read from: S itself, or a second one of the same shape
    (a re-scoring stage that orders each direction differently, `rsray.eval.scoring.rescore_topk`)."""
    if t2i_scores is None:
        return S
    if t2i_scores.shape != S.shape:
        raise ValueError(f"t2i_scores has shape {tuple(t2i_scores.shape)}, S {tuple(S.shape)}")
    if torch.isnan(t2i_scores).any():
        raise ValueError("the t2i score matrix contains NaN")
    return t2i_scores.to(S.device)


def retrieval_ranks(
    S: torch.Tensor, caption_image: torch.Tensor, t2i_scores: torch.Tensor | None = None
) -> dict[str, list[int]]:
    """Per-query 0-based ranks as plain lists, {"i2t": [n_img], "t2i": [n_txt]}, for per-query
    reports; t2i from `t2i_scores` when given."""
    ci = _check_matrix(S, caption_image)
    return {"i2t": _ranks_i2t(S, ci).tolist(), "t2i": _ranks_t2i(_t2i_matrix(S, t2i_scores), ci).tolist()}


# ----------------------------------------------------------------------------- metrics


def recall_at_k(r_i2t: torch.Tensor, r_t2i: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """i2t_R{K}, t2i_R{K} (% of queries with 0-based rank < K) and mR, their mean."""
    out = {
        f"{name}_R{k}": (r < k).double().mean().item() * 100 for name, r in (("i2t", r_i2t), ("t2i", r_t2i)) for k in ks
    }
    out["mR"] = sum(out.values()) / len(out)
    return out


def scene_recall(
    i2t_idx: torch.Tensor,
    t2i_idx: torch.Tensor,
    caption_image: torch.Tensor,
    scenes: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """SR@K from each query's results in order (columns of the *_idx tensors, at least max(ks)
    of them unless the gallery is smaller): the % of a query's top K whose scene is the query's,
    averaged over the queries that have a scene. i2t results are captions, carrying their image's
    scene; a result without scene never matches. A direction with no scene-bearing query is left out."""
    caption_scene = scenes[caption_image]
    out = {}
    for name, query_scene, result_scene in (
        ("i2t", scenes, caption_scene[i2t_idx]),
        ("t2i", caption_scene, scenes[t2i_idx]),
    ):
        has_scene = query_scene >= 0
        if not has_scene.any():
            continue
        match = (result_scene == query_scene[:, None])[has_scene].double()
        for k in ks:
            out[f"{name}_SR{k}"] = match[:, :k].mean(1).mean().item() * 100
    return out


def _median(x: torch.Tensor) -> float:
    """The usual median (mean of the two middle values for an even count); torch.median takes the lower."""
    x = x.double().sort().values
    n = x.numel()
    return ((x[(n - 1) // 2] + x[n // 2]) / 2).item()


def retrieval_metrics(
    S: torch.Tensor,
    caption_image: torch.Tensor,
    image_scenes: Scenes | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    t2i_scores: torch.Tensor | None = None,
) -> dict[str, float]:
    """All protocol numbers of one similarity matrix, as {name: float}.

    Keys: i2t_R1 i2t_R5 i2t_R10 t2i_R1 t2i_R5 t2i_R10 mR (percent), i2t_medr i2t_meanr t2i_medr
    t2i_meanr (1-based ranks) and, given one scene per image (None = no scene), i2t_SR1 .. t2i_SR10.
    With `t2i_scores`, text-to-image numbers are read from that matrix's columns instead of S's
    (image-to-text always from S's rows): two-stage retrieval orders each direction on its own.
    """
    ci = _check_matrix(S, caption_image)
    ks = check_ks(ks)
    T = _t2i_matrix(S, t2i_scores)
    r_i2t, r_t2i = _ranks_i2t(S, ci), _ranks_t2i(T, ci)
    out = recall_at_k(r_i2t, r_t2i, ks)
    for name, r in (("i2t", r_i2t), ("t2i", r_t2i)):
        out[f"{name}_medr"] = _median(r + 1)
        out[f"{name}_meanr"] = (r + 1).double().mean().item()
    if image_scenes is not None:
        scenes = scene_ids(image_scenes, S.shape[0], S.device)
        k = max(ks)
        out.update(scene_recall(stable_topk(S, k)[1], stable_topk(T.t(), k)[1], ci, scenes, ks))
    return out
