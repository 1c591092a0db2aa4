"""Retrieval losses shared by the models: hinge triplet, InfoNCE, intra-class, affiliation.

Conventions, used by every function here:
  scores      [B, B] similarities; row i is the image of pair i, column j the caption of pair j,
              so the matched pairs lie on the diagonal.
  image_ids   [B] which image each pair shows. Two pairs of the same image are positives of each
              other (five captions per image, or one image drawn twice in a batch): no loss ever
              pushes them apart. None means every row is a different image.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rsray.distributed import gather_no_grad, gather_with_grad, rank, world_size


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """`t` in fp32 when it is in a 16-bit float dtype (what autocast hands on), else as it is (fp64 stays)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def positive_mask(image_ids: torch.Tensor | None, n: int, device: torch.device | None = None) -> torch.Tensor:
    """[n, n] bool, True where rows i and j show the same image (the diagonal always)."""
    if image_ids is None:
        return torch.eye(n, dtype=torch.bool, device=device)
    if image_ids.shape != (n,):
        raise ValueError(f"image_ids must have shape [{n}], got {list(image_ids.shape)}")
    return image_ids[:, None] == image_ids[None, :]


def triplet_loss(
    scores: torch.Tensor, image_ids: torch.Tensor | None = None, margin: float = 0.2, max_violation: bool = True
) -> torch.Tensor:
    """Bidirectional hinge triplet loss (VSE++), summed over the batch.

    Image-to-text: for image i, every caption j of another image costs
    max(0, margin + s[i, j] - s[i, i]); text-to-image: for caption j, every image i of another
    image costs max(0, margin + s[i, j] - s[j, j]). `max_violation` keeps only the hardest
    negative of each query (VSE++, the SWAN paper); otherwise all negatives are summed (the SWAN
    release). Summing over the batch, not averaging, is what VSE++ and SWAN's code do.
    """
    n = scores.shape[0]
    if scores.shape != (n, n):
        raise ValueError(f"triplet_loss needs square scores (pair i on the diagonal), got {list(scores.shape)}")
    positive = scores.diag()
    not_negative = positive_mask(image_ids, n, scores.device)
    cost_i2t = (margin + scores - positive[:, None]).clamp(min=0).masked_fill(not_negative, 0)  # row i: image i
    cost_t2i = (margin + scores - positive[None, :]).clamp(min=0).masked_fill(not_negative, 0)  # column j: caption j
    if max_violation:
        return cost_i2t.max(dim=1).values.sum() + cost_t2i.max(dim=0).values.sum()
    return cost_i2t.sum() + cost_t2i.sum()


CLAMPS = ("forward", "after_step")  # where LogitScale keeps its scale at most max_scale


class LogitScale(nn.Module):
    """Learnable inverse temperature, CLIP style: stored as a log, returned as exp(log).

    Initialised to 1 / `temperature` (0.07 -> 14.29); never above `max_scale` (100, as CLIP), kept
    there one of two ways (`clamp`):
    - forward (ours): the returned scale is clamped; the stored log may pass ln max_scale, and
      there it has no gradient to bring it back.
    - after_step (open_clip, PIR-CLIP's release): the returned scale is exp(log) as stored, and
      the training loop calls `after_optimizer_step` after every step, which clamps the stored log
      in place to [0, ln max_scale] (a scale between 1 and max_scale).
    """

    def __init__(
        self, temperature: float = 0.07, max_scale: float = 100.0, learnable: bool = True, clamp: str = "forward"
    ):
        super().__init__()
        if not 0 < temperature:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if clamp not in CLAMPS:
            raise ValueError(f"clamp must be one of {', '.join(CLAMPS)}, got {clamp!r}")
        self.max_log, self.clamp = math.log(max_scale), clamp
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learnable)

    def forward(self) -> torch.Tensor:
        if self.clamp == "after_step":
            return self.log_scale.exp()
        return self.log_scale.clamp(max=self.max_log).exp()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.clamp == "after_step":
            self.log_scale.clamp_(0.0, self.max_log)


def info_nce_loss(
    scores: torch.Tensor, logit_scale: torch.Tensor | float, image_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE with multi-positive targets, averaged over rows and both directions.

    Logits are `logit_scale * scores`. Each row's target is spread evenly over its positives: all
    in-batch captions of the same image (for a caption, all rows showing its image); the even
    split is our choice (the spec says only that they all count as positives). With distinct
    images this is CLIP's cross-entropy against the diagonal.
    """
    n = scores.shape[0]
    if scores.shape != (n, n):
        raise ValueError(f"info_nce_loss needs square scores, got {list(scores.shape)}")
    return info_nce_rows(scores, scores.t(), logit_scale, positive_mask(image_ids, n, scores.device))


def info_nce_rows(
    image_rows: torch.Tensor, text_rows: torch.Tensor, logit_scale: torch.Tensor | float, positives: torch.Tensor
) -> torch.Tensor:
    """`info_nce_loss` for some of the rows: `image_rows` [B, N] scores of B images against all N
    captions, `text_rows` [B, N] of the B captions of the same pairs against all N images,
    `positives` [B, N] which of the N show the row's image. The whole matrix is B = N."""
    targets = positives.to(image_rows.dtype)
    targets = targets / targets.sum(dim=1, keepdim=True)  # the same rows for both directions
    i2t = -(targets * F.log_softmax(logit_scale * image_rows, dim=1)).sum(dim=1).mean()
    t2i = -(targets * F.log_softmax(logit_scale * text_rows, dim=1)).sum(dim=1).mean()
    return (i2t + t2i) / 2


def gathered_info_nce_loss(
    images: torch.Tensor,
    texts: torch.Tensor,
    logit_scale: torch.Tensor | float,
    image_ids: torch.Tensor | None = None,
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda a, b: a @ b.t(),
) -> torch.Tensor:
    """InfoNCE over every worker's batch, each worker computing only its own B rows against all W*B
    (open_clip's `local_loss`): [B, W*B] logits per direction instead of the whole [W*B, W*B] on
    every worker. The mean of the workers' losses is the whole matrix's loss, and with
    `gather_with_grad`'s summing backward and DDP's average the parameter gradients are the whole
    matrix's too (tested on two gloo processes). One process: exactly `info_nce_loss`."""
    if world_size() == 1:
        return info_nce_loss(score(images, texts), logit_scale, image_ids)
    if image_ids is None:  # each pair its own image: positives are the pair's own position
        image_ids = torch.arange(images.shape[0], device=images.device) + rank() * images.shape[0]
    gathered = gather_with_grad(images), gather_with_grad(texts), gather_no_grad(image_ids)
    return local_info_nce_loss(images, texts, image_ids, *gathered, logit_scale=logit_scale, score=score)


def local_info_nce_loss(
    images: torch.Tensor,
    texts: torch.Tensor,
    image_ids: torch.Tensor,
    all_images: torch.Tensor,
    all_texts: torch.Tensor,
    all_ids: torch.Tensor,
    logit_scale: torch.Tensor | float,
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda a, b: a @ b.t(),
) -> torch.Tensor:
    """This worker's rows of the gathered InfoNCE, for callers that gathered already (PriorCLIP's
    affiliation term uses the same gathered rows)."""
    positives = image_ids[:, None] == all_ids[None, :]
    return info_nce_rows(score(images, all_texts), score(all_images, texts).t(), logit_scale, positives)


def intra_class_loss(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """CMPAGL's intra-class term: mean over matched pairs of 1 - cos(v_i, t_i)."""
    return (1 - F.cosine_similarity(image_emb, text_emb, dim=-1)).mean()


def row_centres(embeddings: torch.Tensor, scene_ids: torch.Tensor) -> torch.Tensor:
    """[N, D]: for each row, the mean of the rows with its scene (itself included): the releases'
    per-sample centres. Rows with scene -1 get the mean of the unlabelled rows; the loss drops them."""
    same = (scene_ids[:, None] == scene_ids[None, :]).to(embeddings.dtype)
    return same @ embeddings / same.sum(dim=1, keepdim=True)


def affiliation_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    scene_ids: torch.Tensor,
    logit_scale: torch.Tensor | float,
    centres: str = "class",
    transposed_t2i: bool = False,
    given_centres: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """PriorCLIP's affiliation loss: pull each sample towards its scene's centre in the other modality.

    Per batch, the centre of scene c is the mean image embedding (resp. mean text embedding) of
    the rows labelled c; rows with scene -1 are skipped, and only scenes present in the batch
    are classes. Image rows are classified against the text centres and text rows against the
    image centres, logits = `logit_scale` * dot product, cross-entropy with the row's own scene;
    the loss is the mean of the two directions (our choice: the spec names both terms but not
    how they combine; both releases do the same). Centres are plain means, not re-normalised, and
    keep their gradient (as specified). Same-image rows share a scene, so they are never each
    other's negatives.

    `centres="sample"` is the releases': one centre per row (the mean of the rows sharing its
    scene, `row_centres`) and the row's own centre as the target, so same-scene centres sit among
    the negatives. `given_centres` = (image, text) per-row centres computed elsewhere (the
    releases compute them on each worker's rows and gather them). `transposed_t2i` reproduces
    PIR's text->image term, which takes the softmax of the transposed logits (over texts for
    each image centre: a bug, kept only for the release preset). Computed in fp32 under any autocast.
    """
    with torch.autocast(image_emb.device.type, enabled=False):  # fp32 logits under any autocast
        return _affiliation_fp32(
            at_least_fp32(image_emb),
            at_least_fp32(text_emb),
            scene_ids,
            logit_scale,
            centres,
            transposed_t2i,
            None if given_centres is None else (at_least_fp32(given_centres[0]), at_least_fp32(given_centres[1])),
        )


def _affiliation_fp32(image_emb, text_emb, scene_ids, logit_scale, centres, transposed_t2i, given_centres):
    valid = scene_ids >= 0
    if not bool(valid.any()):  # no labelled rows: zero, still in the graph (DDP waits for every gradient)
        return (image_emb.sum() + text_emb.sum()) * 0.0 + 0.0 * logit_scale
    if centres not in ("class", "sample"):
        raise ValueError(f"centres must be class or sample, got {centres!r}")
    if centres == "class" and (transposed_t2i or given_centres is not None):
        raise ValueError("transposed_t2i needs sample centres, and so do given centres")
    images, texts = image_emb[valid], text_emb[valid]
    if centres == "sample":  # each row's own copy of its scene's centre, and that copy as the target
        if given_centres is None:
            given_centres = (row_centres(image_emb, scene_ids), row_centres(text_emb, scene_ids))
        image_centres, text_centres = given_centres[0][valid], given_centres[1][valid]
        target = torch.arange(images.shape[0], device=images.device)
    else:
        _, target = torch.unique(scene_ids[valid], return_inverse=True)  # class index among present scenes
        n_classes = int(target.max()) + 1
        counts = torch.bincount(target, minlength=n_classes).to(images.dtype)[:, None]
        image_centres = images.new_zeros(n_classes, images.shape[1]).index_add(0, target, images) / counts
        text_centres = texts.new_zeros(n_classes, texts.shape[1]).index_add(0, target, texts) / counts
    image_to_text = F.cross_entropy(logit_scale * images @ text_centres.t(), target)
    text_logits = logit_scale * texts @ image_centres.t()
    text_to_image = F.cross_entropy(text_logits.t() if transposed_t2i else text_logits, target)
    return (image_to_text + text_to_image) / 2


# ----------------------------------------------------------------------------- CMPAGL (ALBEF-style)


def queue_itc_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    momentum_image: torch.Tensor,
    momentum_text: torch.Tensor,
    image_ids: torch.Tensor,
    queue: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    temperature: torch.Tensor | float,
    alpha: float = 0.0,
) -> torch.Tensor:
    """ALBEF's image-text contrastive loss with a momentum encoder and a feature queue.

    Online embeddings (L2-normalised) are scored against [this batch's momentum embeddings; the
    queue] / temperature, both ways. The targets are multi-positive: every key with the query's
    image id (in the batch or the queue) shares the target mass equally; with `alpha` > 0 they are
    mixed with the momentum model's own softmax (momentum distillation):
    targets = alpha * softmax(momentum sims) + (1 - alpha) * positives. Loss = (i2t + t2i) / 2,
    each the mean over queries of the cross-entropy with soft targets. Computed in fp32 under any
    autocast (rsray's rule for similarity logits)."""
    with torch.autocast(image.device.type, enabled=False):  # fp32 logits: / 0.07 magnifies bf16's rounding
        return _queue_itc_fp32(
            *(at_least_fp32(t) for t in (image, text, momentum_image, momentum_text)),
            image_ids,
            queue,
            temperature,
            alpha,
        )


def _queue_itc_fp32(image, text, momentum_image, momentum_text, image_ids, queue, temperature, alpha) -> torch.Tensor:
    queue_image, queue_text, queue_ids = at_least_fp32(queue[0]), at_least_fp32(queue[1]), queue[2]
    keys_text = torch.cat([momentum_text, queue_text], dim=0)
    keys_image = torch.cat([momentum_image, queue_image], dim=0)
    key_ids = torch.cat([image_ids, queue_ids], dim=0)
    positives = (image_ids[:, None] == key_ids[None, :]).to(image.dtype)
    targets = positives / positives.sum(dim=1, keepdim=True)
    sims_i2t = image @ keys_text.t() / temperature
    sims_t2i = text @ keys_image.t() / temperature
    targets_i2t = targets_t2i = targets
    if alpha > 0:
        with torch.no_grad():
            teacher_i2t = (momentum_image @ keys_text.t() / temperature).softmax(dim=1)
            teacher_t2i = (momentum_text @ keys_image.t() / temperature).softmax(dim=1)
        targets_i2t = alpha * teacher_i2t + (1 - alpha) * targets
        targets_t2i = alpha * teacher_t2i + (1 - alpha) * targets
    loss_i2t = -(F.log_softmax(sims_i2t, dim=1) * targets_i2t).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(sims_t2i, dim=1) * targets_t2i).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    special_ids: tuple[int, ...],
    mask_id: int,
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking for MLM: each valid token that is not special (CLS, SEP, PAD: `special_ids`)
    is chosen with `probability`; a chosen token becomes [MASK] 80% of the time, a random token
    10%, itself 10%. Returns (masked ids, labels: the original id where chosen, -100 elsewhere)."""
    device = input_ids.device
    eligible = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids, device=device))
    draw = torch.rand(input_ids.shape, generator=generator, device=device)
    chosen = eligible & (draw < probability)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    how = torch.rand(input_ids.shape, generator=generator, device=device)
    masked = input_ids.clone()
    masked[chosen & (how < 0.8)] = mask_id
    replace = chosen & (how >= 0.8) & (how < 0.9)
    masked[replace] = torch.randint(vocab_size, input_ids.shape, generator=generator, device=device)[replace]
    return masked, labels


def sample_hard_negatives(
    scores: torch.Tensor, image_ids: torch.Tensor, generator: torch.Generator | None = None, hardest: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM's hard negatives (ALBEF, BLIP): for each row of `scores` [B, B] (a query against the
    batch's keys, as logits: ALBEF passes similarity / temperature), one key drawn with probability
    softmax(scores)[j] over the keys of *another* image (same-image keys get 0); `hardest` takes the
    most probable instead. Returns (key index per row, valid: rows that had a negative)."""
    scores = scores.detach().float()
    same = image_ids[:, None] == image_ids[None, :]
    if hardest:
        valid = (~same).any(dim=1)
        return scores.masked_fill(same, float("-inf")).argmax(dim=1), valid
    weights = scores.softmax(dim=1).masked_fill(same, 0.0)
    valid = (~same).any(dim=1)
    underflow = valid & (weights.sum(dim=1) == 0)  # fp32 softmax can round every other key to 0
    weights[underflow] = (~same[underflow]).float()
    weights[~valid] = 1.0  # multinomial needs mass; these rows are dropped by the caller
    drawn = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return drawn, valid
