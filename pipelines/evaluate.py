"""`rsray evaluate CHECKPOINT`: a trained checkpoint scored on the test split, with and without SMR."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile

from rsray.cli import command_parser, run_cli, setup_logging


def run(ns) -> int:
    from rsray.eval.checkpoint import eval_device, evaluate_loaded, load_checkpoint
    from rsray.eval.record import log_to_checkpoint_run
    from rsray.eval.rerank import SMRConfig

    from .metrics import format_table

    device = eval_device(ns.device)
    smr = SMRConfig(ns.smr_k, ns.smr_w, ns.smr_beta)
    for name, problem in smr.check():
        raise ValueError(f"--smr-{name}: {problem}")
    with contextlib.ExitStack() as stack:
        folder = ns.checkpoint
        if ns.checkpoint.startswith(MODEL_URIS):  # a logged or registered model: its checkpoint inside
            from rsray.logged_model import download_model

            into = stack.enter_context(tempfile.TemporaryDirectory(prefix="rsray-model-"))
            folder = download_model(ns.checkpoint, tracking_uri(ns), into)
        model, cfg, state = load_checkpoint(folder)
        report = evaluate_loaded(model, cfg, state, ns.checkpoint, ns.split, ns.data, smr, device, ns.itm_topk)[0]
    print(f"{ns.checkpoint} (epoch {report['epoch']}) on {report['split']} of {report['data']}, scored on {device}")
    first = "ITC, " if report["stages"] else ""
    print(format_table(report["metrics"], f"{first}without SMR"))
    print(format_table(report["smr_metrics"], f"{first}with SMR (K={smr.k}, w={smr.w}, beta={smr.beta})"))
    for name, stage in report["stages"].items():  # CMPAGL: + ITM re-scoring of each query's top k
        what = f"+{name.upper()} (top {stage['k']} re-scored, {stage['pairs']} pairs, {stage['seconds']:.1f} s)"
        print(format_table(stage["metrics"], f"{what}, without SMR"))
        print(format_table(stage["smr_metrics"], f"{what}, with SMR"))
    if ns.output:
        with open(ns.output, "w") as out:
            json.dump(report, out, indent=1)
        print(f"numbers and per-query ranks written to {ns.output}")
    if not ns.no_mlflow:
        print(log_to_checkpoint_run(cfg, report))
    return 0


MODEL_URIS = ("models:/",)


def tracking_uri(ns) -> str:
    """Where a models:/ URI is resolved: --tracking-uri, else $MLFLOW_TRACKING_URI, else rsray's default."""
    from rsray.config import TrackingConfig

    return ns.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or TrackingConfig().uri


def main(argv=None) -> int:
    parser = command_parser(
        "rsray evaluate",
        "Score a checkpoint folder (state.pt + config.yaml, local or "
        "s3://) on a split of the prepared data it was trained on: i2t/t2i R@1/5/10, mR, median/mean "
        "rank and SR@1/5/10 where scenes exist, without and with SMR re-ranking. Weights load with "
        "torch.load(weights_only=True): no arbitrary pickles.",
    )
    parser.add_argument(
        "checkpoint",
        help="checkpoint folder written by `rsray train` (local or s3://), or a logged model: "
        "models:/NAME@ALIAS (registered with tracking.register_as), models:/NAME/VERSION or models:/MODEL_ID",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow server or store that resolves a models:/ URI (default: $MLFLOW_TRACKING_URI, else "
        "sqlite:///mlflow.db)",
    )
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--data", help="prepared output to read instead of the one in the checkpoint's config")
    parser.add_argument("--output", "-o", metavar="FILE.json", help="write the numbers and per-query ranks here")
    parser.add_argument(
        "--no-mlflow",
        action="store_true",
        help="do not log the numbers into the checkpoint's MLflow run (by default they go there as "
        "<split>/* and <split>_smr/*, or into a child run of it when --data is other data)",
    )
    parser.add_argument(
        "--itm-topk",
        type=int,
        metavar="K",
        help="models with a second stage (CMPAGL): re-score each query's top K by ITM (default: the "
        "model's itm_topk; 0 skips the stage)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cuda", "cpu"],
        help="where the model scores (default auto: this machine's GPU when it has one, else the CPU)",
    )
    parser.add_argument("--smr-k", type=int, default=30, help="SMR top-K (default 30)")
    parser.add_argument("--smr-w", type=float, default=1.0, help="SMR boost weight (default 1)")
    parser.add_argument("--smr-beta", type=float, default=0.1, help="SMR rank decay (default 0.1)")
    ns = parser.parse_args(argv)
    setup_logging(ns.verbose, "evaluate")
    return run_cli(lambda: run(ns))


if __name__ == "__main__":
    sys.exit(main())
