"""`rsray demo`: the whole pipeline on the embedded sample, end to end on this machine.

Draw the sample, prepare Parquet shards with Ray Data, train every model (tiny presets: VSE++,
SWAN, DOVE, CLIP, PriorCLIP after its scene prior, PriorCLIP open-domain from the CLIP run, CMPAGL) with
2 Ray Train workers each (each run ends with its best checkpoint scored on the test split, with
and without SMR, into its MLflow run), and end with `rsray compare` on those runs: the paper-style
table from MLflow's records (logged as a compare run too), the chance level of the test split
(what an untrained model scores) and the command that opens the MLflow UI.

The default data (`presets/demo`: 500 images at 64 px, 3 epochs) is sized so the whole demo takes
under ten minutes on 2 CPU cores; any config and override of `rsray demo [config] key=value` apply.
"""

from __future__ import annotations

import sys

from rsray.cli import config_from_args, run_cli, setup_logging, stage_parser

# (model, extra overrides of its tiny preset). PriorCLIP trains its scene prior first in the same
# command; PriorCLIP open-domain's stage 2 starts from the demo's own CLIP run (its stage 1).
DEMO_RUNS = (
    ("vsepp", ()),
    ("swan", ()),
    ("dove", ()),
    ("clip", ()),
    ("priorclip", ("model.instruction_checkpoint=train",)),
    ("priorclip_open", ("model.clip_checkpoint={clip}",)),
    ("cmpagl", ()),  # compare adds its +ITM and +ITM+SMR rows
)


def compare_runs(cfg, run_ids: list[str]) -> int:
    """The demo's table: `rsray compare --runs ...` on its runs in its experiment (cfg.tracking),
    every other option as the command's parser sets it."""
    from . import compare

    return compare.run(cfg, compare.build_parser().parse_intermixed_args(["--runs", *run_ids]))


def run(cfg, epochs: int) -> int:
    import time

    from rsray.config import load_config
    from rsray.console import hide_on_console
    from rsray.eval.checkpoint import evaluate_checkpoint
    from rsray.tracking import ui_command
    from rsray.train.records import best_checkpoint
    from rsray.train.run import train

    from . import prepare, sample

    # one line per step and model here; what prepare and each run narrate is in the log file
    hide_on_console("rsray.prepare", "rsray.train", "rsray.tracking", "rsray.logged_model")
    started = time.perf_counter()
    sample.run(cfg)
    prepared = prepare.run(cfg)

    run_ids, links, best_paths, n_images = [], {}, {}, 0
    for name, extra in DEMO_RUNS:
        train_cfg = load_config(
            f"model/{name}-tiny",
            [
                *_train_preset_overrides(),
                f"train.data={prepared.output}",
                f"train.epochs={epochs}",
                f"data.name={cfg.data.name}",
                f"tracking.uri={cfg.tracking.uri}",
                f"tracking.experiment={cfg.tracking.experiment}",
                *(e.format(**best_paths) for e in extra),
            ],
        )
        print(f"training {name} (tiny preset) with {train_cfg.train.num_workers} Ray Train workers, {epochs} epochs")
        model_started = time.perf_counter()
        result = train(train_cfg)
        best = best_checkpoint(result, train_cfg)
        best_paths[name] = best.path
        # the run logged its best checkpoint's test numbers; scored here only if that logging failed
        report = getattr(result, "test_report", None) or evaluate_checkpoint(best.path, split="test")
        run_ids.append(result.mlflow_run_id)
        n_images = len(report["image_ids"])
        links[name] = result.mlflow_link
        print(
            f"{name}: test mR {report['metrics']['mR']:.2f}, with SMR {report['smr_metrics']['mR']:.2f} "
            f"({time.perf_counter() - model_started:.0f} s)"
        )

    print("test split (best checkpoint by validation mR), from the runs' MLflow records")
    compare_runs(cfg, run_ids)
    if n_images:
        chance = chance_metrics(n_images, cfg.train.seed)
        print(f"{table_row(chance)}   (random scores: what an untrained model gets)")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    link = next(iter(links.values()), "")
    if cfg.tracking.uri.startswith("sqlite"):
        print(f"Open the runs in MLflow:  {ui_command(cfg.tracking.uri)}\nthen browse {link}")
    else:
        print(f"MLflow runs: {link}")
    return 0


def table_row(m: dict[str, float], name: str = "chance") -> str:
    """One more Markdown row under the compare table (i2t and t2i R@1/5/10, mR; no runs, no SMR)."""
    keys = ("i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10", "mR")
    return f"| {name} | - | " + " | ".join(f"{m[key]:.2f}" for key in keys) + " | - |"


def chance_metrics(n_images: int, seed: int, captions_per_image: int = 5) -> dict[str, float]:
    """The protocol's numbers for uniformly random scores on a gallery of `n_images` images and
    their captions: the level an untrained model sits at, for reading the trained rows."""
    import torch

    from rsray.eval.metrics import retrieval_metrics

    scores = torch.rand(n_images, n_images * captions_per_image, generator=torch.Generator().manual_seed(seed))
    return retrieval_metrics(scores, torch.arange(n_images * captions_per_image) // captions_per_image)


def _train_preset_overrides() -> list[str]:
    """The train section of conf/train/cpu-tiny.yaml as overrides, to pair with any model's tiny preset."""
    import dataclasses

    from rsray.config import load_config

    train = dataclasses.asdict(load_config("train/cpu-tiny").train)
    return [f"train.{key}={_yaml(value)}" for key, value in train.items()]


def _yaml(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def main(argv=None) -> int:
    parser = stage_parser(
        "rsray demo",
        "Run the whole pipeline on the embedded sample: generate it, prepare "
        "shards with Ray Data, train every model (tiny presets) with 2 Ray Train workers, evaluate on the "
        "test split with and without SMR, record the runs in MLflow and print a comparison.",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=3,
        help="training epochs per model (default 3: the whole demo took 7 min 54 s on 2 cores)",
    )
    ns = parser.parse_intermixed_args(argv)
    setup_logging(ns.verbose, "demo")
    return run_cli(lambda: run(config_from_args(ns.args, default="presets/demo"), ns.epochs))


if __name__ == "__main__":
    sys.exit(main())
