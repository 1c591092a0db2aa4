"""Benchmark: CMPAGL at paper widths: training pairs/s and each retrieval stage on an RSICD-sized test set.

The paper config (`conf/model/cmpagl.yaml`: Gswin-T at 224 px, BERT-base split 6 + 6, 256-d ITC,
queue 8,192) with random weights (timing only: nothing downloads) on random images and captions
whose lengths are the real RSICD test captions' word counts plus [CLS] and [SEP] when
`../shared/datasets/rsicd_captions/test_caps.txt` exists (BERT's word pieces make real captions a
little longer; no tokenizer is available offline), else drawn from 6..14 tokens.

1. Training: `--train-steps` optimizer steps of `--train-batch` pairs (every loss term: ITC with
   momentum and queue, triplet + intra, ITM with hard negatives, MLM) after one warm-up step.
2. Encoding: 1,093 images (batches of 64) and 5,465 captions (batches of 256) through the
   model's own `encode_images` / `encode_texts`, as `rsray evaluate` encodes a split.
3. ITC: `score_matrix` + `retrieval_metrics` over all 1,093 x 5,465 pairs, and SMR on top.
4. +ITM at each k of `--ks`: `rescore_topk` (each query's top k by ITC re-scored by the fusion
   half, both directions, the union of pairs once each) + metrics, + SMR. On CPU the stage is
   estimated by default: the exact number of pairs it scores (from the ITC top-k lists) times the
   seconds per pair measured on `--itm-sample` of those pairs through the same `pair_scores`
   batches; `--full-itm` runs it whole (the default on CUDA).

Random weights put the metrics at chance: the numbers are times and memory, not accuracy.
Prints wall time and peak memory per step (process peak RSS; GPU peak allocated on CUDA).

    python -m benchmarks.cmpagl_eval                                  # this CPU
    python -m benchmarks.cmpagl_eval --device cuda --amp bf16         # a GPU, every stage whole
    python -m benchmarks.cmpagl_eval --images 200 --train-steps 1     # a quicker CPU look
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path

import torch

from benchmarks.eval_throughput import measured, peak_rss_mb, sync
from rsray.config import load_config
from rsray.eval.metrics import caption_to_image, retrieval_metrics
from rsray.eval.rerank import smr_rerank, smr_rerank_pair
from rsray.eval.scoring import concat_rows, index_rows, rescore_topk, score_matrix, scoring_order, topk_pairs
from rsray.models import build_model, model_config
from rsray.models.base import to_device
from rsray.optim import make_optimizer

SHARED = Path(os.environ.get("RSRAY_SHARED_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
N_IMAGES, CAPTIONS_PER_IMAGE, VOCAB = 1093, 5, 30522  # RSICD's test split; BERT-base's vocabulary


def caption_lengths(n: int, max_tokens: int, seed: int) -> tuple[torch.Tensor, str]:
    """Token counts (words + [CLS] + [SEP]) of the real RSICD test captions, or a stand-in."""
    path = SHARED / "rsicd_captions" / "test_caps.txt"
    if path.is_file():
        counts = [min(len(line.split()) + 2, max_tokens) for line in path.read_text().splitlines() if line.strip()]
        if len(counts) >= n:
            return torch.tensor(counts[:n]), f"real RSICD test captions' words + 2 ({path})"
    g = torch.Generator().manual_seed(seed)
    return torch.randint(6, 15, (n,), generator=g), "drawn 6..14 (no RSICD caption file found)"


def caption_batch(lengths: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    """BERT inputs padded to the batch's longest caption: [CLS] words [SEP] [PAD]...; and the same
    words as word-vocabulary tokens, for a config whose `text_input` is `tokens` (the tiny one)."""
    width = int(lengths.max())
    ids = torch.randint(1000, VOCAB, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    words = ids * mask
    ids[:, 0] = 101
    ids[torch.arange(len(lengths)), lengths - 1] = 102
    return {"input_ids": ids * mask, "attention_mask": mask, "tokens": words, "lengths": lengths.clone()}


def image_batch(n: int, size: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"images": torch.randn(n, 3, size, size, generator=g)}


def train_rate(model, cfg, args, lengths, device, autocast) -> None:
    """Steady pairs/s of full optimizer steps (every loss term), after one warm-up step."""
    g = torch.Generator().manual_seed(args.seed)
    optimizer, _ = make_optimizer(model, model_config(cfg), total_steps=1000)
    model.train()
    size = model.config.augment.crop

    def step(i: int) -> dict[str, float]:
        chosen = lengths[torch.randint(len(lengths), (args.train_batch,), generator=g)]
        batch = {
            **image_batch(args.train_batch, size, g),
            **caption_batch(chosen, g),
            "image_ids": torch.arange(args.train_batch) + i * args.train_batch,
        }
        with autocast():
            losses = model.loss(to_device(batch, device))
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    with measured("training warm-up step", device):
        step(0)
    with measured(f"training: {args.train_steps} steps x {args.train_batch} pairs", device):
        started = time.perf_counter()
        for i in range(args.train_steps):
            losses = step(i + 1)
        sync(device)
        seconds = time.perf_counter() - started
    terms = ", ".join(f"{k} {v:.3f}" for k, v in losses.items())
    print(f"    {args.train_steps * args.train_batch / seconds:.2f} training pairs/s ({terms})")


@torch.no_grad()
def encode(model, args, lengths, device, autocast):
    """Every image and caption's features, in evaluation's batch sizes."""
    g = torch.Generator().manual_seed(args.seed + 1)
    model.eval()
    size = model.config.augment.crop
    with measured(f"encode {args.images:,} images (batches of 64)", device), autocast():
        images = [
            model.encode_images(to_device(image_batch(min(64, args.images - s), size, g), device))
            for s in range(0, args.images, 64)
        ]
    with measured(f"encode {len(lengths):,} captions (batches of 256)", device), autocast():
        texts = [
            model.encode_texts(to_device(caption_batch(lengths[s : s + 256], g), device))
            for s in range(0, len(lengths), 256)
        ]
    return concat_rows(images), concat_rows(texts)


def estimate_itm(model, itc, images, texts, k, args, device, autocast) -> None:
    """The stage's exact pair count at k, and its time from `--itm-sample` of those pairs."""
    n_txt = itc.shape[1]
    _, _, keys = topk_pairs(itc, k)  # the pairs rescore_topk would score
    g = torch.Generator().manual_seed(args.seed + 2)
    sample = keys[torch.randperm(len(keys), generator=g)[: args.itm_sample].to(keys.device)].sort().values
    sample = sample[scoring_order(sample, n_txt, texts)]  # in rescore_topk's order
    batch = model.config.itm_batch
    with measured(f"+ITM k={k}: {len(sample):,} of its {len(keys):,} pairs", device), autocast():
        started = time.perf_counter()
        for s in range(0, len(sample), batch):
            chosen = sample[s : s + batch]
            model.pair_scores(index_rows(images, chosen // n_txt), index_rows(texts, chosen % n_txt))
        sync(device)
        per_pair = (time.perf_counter() - started) / len(sample)
    print(
        f"    {1 / per_pair:,.1f} pairs/s -> the whole +ITM stage at k={k} ({len(keys):,} pairs): "
        f"about {per_pair * len(keys):,.0f} s (estimated; --full-itm runs it)"
    )


def full_itm(model, itc, images, texts, k, caption_image, device, autocast) -> None:
    with measured(f"+ITM k={k}: rescore_topk + metrics", device), autocast():
        s_i2t, s_t2i, pairs = rescore_topk(model, itc, images, texts, k, model.config.itm_batch)
        metrics = retrieval_metrics(s_i2t, caption_image, t2i_scores=s_t2i)
    print(f"    {pairs:,} pairs re-scored; mR {metrics['mR']:.2f}")
    with measured(f"+ITM+SMR k={k}", device):
        a, b = smr_rerank_pair(s_i2t, s_t2i)
        metrics = retrieval_metrics(a, caption_image, t2i_scores=b)
    print(f"    mR {metrics['mR']:.2f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="off", choices=["off", "bf16"], help="autocast dtype")
    parser.add_argument("--images", type=int, default=N_IMAGES, help="test images (5 captions each; RSICD: 1,093)")
    parser.add_argument("--ks", default="16,128", help="itm_topk values to time, comma-separated")
    parser.add_argument("--train-batch", type=int, default=8, help="pairs per training step")
    parser.add_argument("--train-steps", type=int, default=3, help="timed training steps (0: skip training)")
    parser.add_argument("--itm-sample", type=int, default=512, help="pairs timed per k when estimating +ITM")
    parser.add_argument("--full-itm", action=argparse.BooleanOptionalAction, default=None, help="run +ITM whole")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="cmpagl-tiny, 6 images, k=2, +ITM whole (make test)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.ks, args.train_batch, args.train_steps, args.itm_sample = 6, "2", 4, 1, 8
        args.full_itm = True
    device = torch.device(args.device)
    full = device.type == "cuda" if args.full_itm is None else args.full_itm
    dtype = torch.bfloat16 if args.amp == "bf16" else None

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    torch.manual_seed(args.seed)
    cfg = load_config("model/cmpagl-tiny" if args.smoke else "model/cmpagl")
    model = build_model(cfg, vocab_size=VOCAB).to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"CMPAGL benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
        f"device {device}, amp {args.amp}; {'tiny (smoke)' if args.smoke else 'paper'} config: "
        f"{trainable:,} trainable parameters, "
        f"itm_batch {model.config.itm_batch}, max_text_tokens {model.config.max_text_tokens}"
    )
    n_captions = args.images * CAPTIONS_PER_IMAGE
    lengths, source = caption_lengths(n_captions, model.config.max_text_tokens, args.seed)
    mean = lengths.float().mean()
    print(f"  {args.images:,} images x {n_captions:,} captions; caption tokens {source}: mean {mean:.1f}")
    print(f"  peak RSS after building the model: {peak_rss_mb():,.0f} MiB")

    if args.train_steps:
        train_rate(model, cfg, args, lengths, device, autocast)
    images, texts = encode(model, args, lengths, device, autocast)
    caption_image = caption_to_image(args.images, CAPTIONS_PER_IMAGE, device)
    with torch.no_grad():
        with measured("ITC: score_matrix + retrieval_metrics", device):
            itc = score_matrix(model, images, texts).float()
            metrics = retrieval_metrics(itc, caption_image)
        print(f"    mR {metrics['mR']:.2f}")
        with measured("ITC+SMR", device):
            metrics = retrieval_metrics(smr_rerank(itc), caption_image)
        print(f"    mR {metrics['mR']:.2f}")
        for k in (int(k) for k in args.ks.split(",")):
            if full:
                full_itm(model, itc, images, texts, k, caption_image, device, autocast)
            else:
                estimate_itm(model, itc, images, texts, k, args, device, autocast)


if __name__ == "__main__":
    main()
