"""`rsray metrics SCORES.npy [--scenes FILE] [--smr] [--json]`: the protocol numbers of a saved matrix.

SCORES.npy holds an images x captions similarity matrix; caption j belongs to image j // cpi
(--captions-per-image, 5 in the benchmarks). The scenes file has one scene per image, line by
line, an empty line meaning no scene. With --smr the matrix is re-ranked first: every number is
then the re-ranked one, and the JSON also carries smr_k, smr_w and smr_beta. Useful for checking
numbers from elsewhere against the same evaluator.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from rsray.cli import EXIT_CODES, command_parser, run_cli, setup_logging

EPILOG = """This stage reads no config file and takes no key=value overrides: the options above are all
it uses. Example: rsray metrics scores.npy --scenes test_scenes.txt --smr --json"""


def load_scores(path: str, captions_per_image: int):
    """The matrix as a float tensor and its caption -> image map, refused with one line if unusable."""
    import torch

    from rsray.eval.metrics import caption_to_image

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        scores = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a NumPy .npy array ({exc})") from None
    if not isinstance(scores, np.ndarray):
        raise ValueError(f"{path}: expected one .npy array, got an archive of several")
    if scores.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D images x captions matrix, got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.number) or np.issubdtype(scores.dtype, np.complexfloating):
        raise ValueError(f"{path}: expected real scores, got dtype {scores.dtype}")
    n_img, n_txt = scores.shape
    if captions_per_image < 1:
        raise ValueError(f"--captions-per-image must be positive, got {captions_per_image}")
    if n_txt % captions_per_image:
        raise ValueError(f"{path}: {n_txt} captions is not a multiple of --captions-per-image {captions_per_image}")
    if n_txt != n_img * captions_per_image:
        raise ValueError(
            f"{path}: {n_img} images x {captions_per_image} captions each needs {n_img * captions_per_image} "
            f"caption columns, got {n_txt}"
        )
    S = torch.from_numpy(scores.astype(np.float64 if scores.dtype == np.float64 else np.float32))
    if torch.isnan(S).any():
        raise ValueError(f"{path}: the matrix holds NaN scores")
    return S, caption_to_image(n_img, captions_per_image)


def read_scenes(path: str, n_images: int) -> list[str | None]:
    """One scene per image, one per line; an empty line is an image without scene."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such scenes file")
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    if len(lines) != n_images:
        raise ValueError(
            f"{path}: {len(lines)} lines for {n_images} images: give one scene per image (an empty line for none)"
        )
    return [line or None for line in lines]


def format_table(metrics: dict[str, float], title: str) -> str:
    """A readable table, two decimals, one row per direction."""
    ks = [key[len("i2t_R") :] for key in metrics if key.startswith("i2t_R")]
    columns = [(f"R@{k}", f"R{k}") for k in ks] + [("medr", "medr"), ("meanr", "meanr")]
    columns += [(f"SR@{k}", f"SR{k}") for k in ks if f"i2t_SR{k}" in metrics or f"t2i_SR{k}" in metrics]
    lines = [title, "       " + "".join(f"{name:>9}" for name, _ in columns)]
    for direction in ("i2t", "t2i"):
        cells = [metrics.get(f"{direction}_{key}") for _, key in columns]
        lines.append(f"{direction:<7}" + "".join(f"{'-' if v is None else f'{v:.2f}':>9}" for v in cells))
    lines.append(f"mR     {metrics['mR']:9.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = command_parser(
        "rsray metrics",
        "Compute R@1/5/10, mR, median/mean rank and, with "
        "--scenes, SR@1/5/10 from a saved images x captions similarity "
        "matrix (caption j belongs to image j // captions-per-image).",
        epilog=f"{EPILOG}\n{EXIT_CODES}",
    )
    parser.add_argument("scores", metavar="SCORES.npy", help="similarity matrix saved with numpy.save")
    parser.add_argument("--captions-per-image", type=int, default=5, metavar="N", help="default 5")
    parser.add_argument("--scenes", metavar="FILE", help="one scene per image, line by line; empty line = none")
    parser.add_argument("--smr", action="store_true", help="re-rank with SMR first (report the re-ranked numbers)")
    parser.add_argument("--smr-k", type=int, default=30, metavar="K", help="SMR top-K (default 30)")
    parser.add_argument("--smr-w", type=float, default=1.0, metavar="W", help="SMR boost weight (default 1)")
    parser.add_argument("--smr-beta", type=float, default=0.1, metavar="BETA", help="SMR rank decay (default 0.1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ns = parser.parse_intermixed_args(argv)
    setup_logging(ns.verbose, "metrics")

    def compute() -> int:
        from rsray.eval.metrics import retrieval_metrics
        from rsray.eval.rerank import SMRConfig

        smr = SMRConfig(ns.smr_k, ns.smr_w, ns.smr_beta)
        problems = [f"--smr-{key} {problem}" for key, problem in smr.check()]
        if ns.smr and problems:
            raise ValueError(problems[0])
        S, caption_image = load_scores(ns.scores, ns.captions_per_image)
        scenes = read_scenes(ns.scenes, S.shape[0]) if ns.scenes else None
        if ns.smr:
            S = smr.apply(S)
        metrics = retrieval_metrics(S, caption_image, scenes)
        if ns.smr:
            metrics.update(smr_k=smr.k, smr_w=smr.w, smr_beta=smr.beta)
        if ns.json:
            print(json.dumps(metrics))
        else:
            title = f"{ns.scores}: {S.shape[0]} images x {S.shape[1]} captions ({ns.captions_per_image} per image)" + (
                f", after SMR (k={smr.k}, w={smr.w:g}, beta={smr.beta:g})" if ns.smr else ""
            )
            print(format_table(metrics, title))
        return 0

    return run_cli(compute)


if __name__ == "__main__":
    sys.exit(main())
