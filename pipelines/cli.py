"""The `rsray` command: one entry point that dispatches to the stage modules next to this one.

`rsray prepare conf.yaml key=value`, `python -m rsray.pipelines.prepare conf.yaml key=value` and, in
the repository's root, `python -m pipelines.prepare ...` run the same code. In the installed
package these modules are `rsray.pipelines.*` (pyproject.toml maps
the folder there, so no module named `pipelines` lands at the top of site-packages); the stages are
found relative to this package, so both names work.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from rsray.cli import EPILOG

# subcommand -> (module with main(argv), one-line summary)
STAGES: dict[str, tuple[str, str]] = {
    "sample": ("sample", "draw the embedded sample dataset (aerial-like scenes + captions)"),
    "prepare": ("prepare", "validate, resize and tokenize a dataset into Parquet shards (Ray Data)"),
    "data": ("data", "dataset tools: `rsray data inspect TARGET [--json]`, `rsray data verify PREPARED`"),
    "train": ("train", "train a model on Ray Train (DDP workers), checkpoint every epoch"),
    "sweep": ("sweep", "sweep hyperparameters: Ray Tune over Ray Train runs, ASHA, MLflow parent/child runs"),
    "study": ("study", "one config over several seeds and/or validation folds: child runs, mean ± std"),
    "evaluate": ("evaluate", "score a checkpoint on the test split, with and without SMR"),
    "compare": ("compare", "the paper-style table of an experiment's runs (md, csv, LaTeX) from MLflow"),
    "demo": ("demo", "run the whole pipeline on the embedded sample"),
    "metrics": ("metrics", "R@K, mR, ranks, SR@K (and SMR) from a saved similarity matrix (.npy)"),
    "weights": (
        "weights",
        "initial weights: `list` what each paper starts from, `fetch` one to a folder or S3, `verify`",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        lines = [f"  {name:<9} {summary}" for name, (_, summary) in STAGES.items()]
        print(
            "usage: rsray STAGE [config.yaml] [key=value ...]\n\n"
            "rsray trains and compares remote-sensing image-text retrieval models on Ray.\n\n"
            "stages:\n" + "\n".join(lines) + "\n\n" + EPILOG
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"{__package__}.{STAGES[argv[0]][0]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
