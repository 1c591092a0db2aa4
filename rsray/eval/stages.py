"""Two-stage retrieval: the first-stage (ITC) matrix for every pair, then each query's top k
re-scored by the model's pair scorer (CMPAGL's ITM), and SMR on the result.

A model with a second stage defines `pair_scores(image_features, text_features)` for aligned rows
(`rsray.models.cmpagl`); `rescore_stage` runs it over a scored split and returns the stage's
numbers beside the first stage's, so every report shows ITC, +ITM and +ITM+SMR side by side.
"""

from __future__ import annotations

import time
from typing import Any

from rsray.eval.metrics import retrieval_metrics, retrieval_ranks
from rsray.eval.rerank import SMRConfig, smr_rerank_pair
from rsray.eval.scoring import rescore_topk


def has_second_stage(model: Any) -> bool:
    """True for models that re-score top-k pairs (they define `pair_scores`)."""
    return callable(getattr(model, "pair_scores", None))


def rescore_stage(model: Any, scored: Any, k: int, pair_batch: int = 256, smr: SMRConfig | None = None) -> dict:
    """{"k", "pairs", "seconds", "metrics", "smr_metrics" (with `smr`), "ranks"} of the second stage
    on `scored` (`rsray.eval.split.SplitScores`, its features kept): i2t from S_i2t's rows, t2i
    from S_t2i's columns (`rescore_topk`)."""
    started = time.perf_counter()
    s_i2t, s_t2i, pairs = rescore_topk(model, scored.scores, scored.image_features, scored.text_features, k, pair_batch)
    out: dict[str, Any] = {"k": k, "pairs": pairs, "seconds": time.perf_counter() - started}
    out["metrics"] = retrieval_metrics(s_i2t, scored.caption_image, scored.scenes, t2i_scores=s_t2i)
    if smr is not None:
        a, b = smr_rerank_pair(s_i2t, s_t2i, smr.k, smr.w, smr.beta)
        out["smr_metrics"] = retrieval_metrics(a, scored.caption_image, scored.scenes, t2i_scores=b)
    out["ranks"] = retrieval_ranks(s_i2t, scored.caption_image, t2i_scores=s_t2i)
    return out
