"""Evaluate a trained checkpoint on one split of its prepared data: the protocol's numbers with
and without SMR, and every query's rank (so two runs can be compared query by query).

The folder's layout (state.pt, config.yaml) is `rsray.checkpoint`'s.
"""

from __future__ import annotations

from typing import Any

import torch

from rsray.checkpoint import CONFIG_FILE, read_checkpoint
from rsray.config import config_from_dict
from rsray.data.loader import read_split
from rsray.data.manifest import read_manifest, vocab_size
from rsray.eval.metrics import retrieval_metrics, retrieval_ranks
from rsray.eval.rerank import SMRConfig, smr_rerank
from rsray.eval.split import score_split
from rsray.eval.stages import has_second_stage, rescore_stage
from rsray.models import model_config
from rsray.models.registry import build_for_loading

DEVICES = ("auto", "cuda", "cpu")


def eval_device(name: str = "auto") -> str:
    """Where evaluation runs: `auto` is the GPU when this process has one (CMPAGL's ITM stage at paper
    size takes hours on CPU), else the CPU; `cuda` without a GPU is refused in one line."""
    if name not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this process sees no GPU (--device auto uses one when there is one)")
    return "cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name)


def load_checkpoint(uri: str, s3_endpoint: str | None = None):
    """(model in eval mode, resolved Config, state dict) from a checkpoint folder, local or s3://."""
    state, saved = read_checkpoint(uri, s3_endpoint)
    cfg = config_from_dict(saved, source=f"{uri.rstrip('/')}/{CONFIG_FILE}")
    manifest = read_manifest(cfg.train.data, cfg.prepare.s3_endpoint)
    model = build_for_loading(cfg, vocab_size(manifest))
    model.load_state_dict(state["model"])  # strict: every weight comes from the checkpoint
    return model.eval(), cfg, state


def check_same_tokens(cfg, data: str) -> None:
    """Other prepared data must map words to ids as the checkpoint's did: the same word vocabulary
    and the same stop-word rule (`data.stopwords`), or its captions would read as other words."""
    trained = read_manifest(cfg.train.data, cfg.prepare.s3_endpoint)["vocab"]
    other = read_manifest(data, cfg.prepare.s3_endpoint)["vocab"]
    rule = (other.get("stopwords", "drop"), trained.get("stopwords", "drop"))
    if rule[0] != rule[1]:
        raise ValueError(f"{data}: prepared with data.stopwords={rule[0]}, the checkpoint trained on {rule[1]}")
    if other["words"] != trained["words"]:
        raise ValueError(
            f"{data}: its word vocabulary ({len(other['words'])} entries) is not the one the checkpoint "
            f"trained with ({cfg.train.data}, {len(trained['words'])} entries)"
        )


@torch.no_grad()
def evaluate_checkpoint(
    uri: str, split: str = "test", data: str | None = None, smr: SMRConfig | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """Scores `split` of the checkpoint's prepared data (or `data`) and returns
    {"checkpoint", "epoch", "split", "data", "metrics", "smr_metrics", "smr", "ranks", "image_ids",
    "mlflow_run_id"} (the run the checkpoint was logged to, or None)."""
    return evaluate_loaded(*load_checkpoint(uri), uri, split, data, smr, device)[0]


@torch.no_grad()
def evaluate_loaded(
    model,
    cfg,
    state: dict,
    uri: str,
    split: str = "test",
    data: str | None = None,
    smr: SMRConfig | None = None,
    device: str = "cpu",
    itm_topk: int | None = None,
) -> tuple[dict[str, Any], Any, Any]:
    """`evaluate_checkpoint` for a checkpoint already loaded; also returns the scored split and its
    Arrow table (for the retrieval figures). A model with a second stage (CMPAGL's ITM) adds
    `report["stages"]["itm"]`: its numbers without and with SMR, re-scoring each query's top
    `itm_topk` (default: the model's `itm_topk`; 0 skips the stage)."""
    model.to(device)
    data = data or cfg.train.data
    if data != cfg.train.data:
        check_same_tokens(cfg, data)
    table = read_split(data, split, cfg.prepare.s3_endpoint)
    scored = score_split(model, table, model_config(cfg).augment, device)
    smr = smr or SMRConfig()
    reranked = smr_rerank(scored.scores, k=smr.k, w=smr.w, beta=smr.beta)
    report = {
        "checkpoint": uri,
        "epoch": int(state["epoch"]),
        "split": split,
        "data": data,
        "metrics": retrieval_metrics(scored.scores, scored.caption_image, scored.scenes),
        "smr_metrics": retrieval_metrics(reranked, scored.caption_image, scored.scenes),
        "smr": {"k": smr.k, "w": smr.w, "beta": smr.beta},
        "ranks": retrieval_ranks(scored.scores, scored.caption_image),  # 0-based: i2t per image, t2i per caption
        "image_ids": table["image_id"].to_pylist(),
        "mlflow_run_id": state.get("mlflow_run_id"),
        "stages": {},
    }
    if has_second_stage(model):
        model_cfg = model_config(cfg)
        k = model_cfg.itm_topk if itm_topk is None else itm_topk
        if k > 0:
            report["stages"]["itm"] = rescore_stage(model, scored, k, model_cfg.itm_batch, smr)
    return report, scored, table
