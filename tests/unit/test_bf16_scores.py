"""benchmarks/bf16_scores: fp32 similarity matrices keep bf16 training closer to fp32's gradients."""

from __future__ import annotations

from benchmarks.bf16_scores import LOSSES, loss_and_gradient, main, pairs


def _gradient_error(loss_fn, images, captions, mode: str) -> float:
    _, reference = loss_and_gradient(loss_fn, images, captions, "fp32")
    _, gradient = loss_and_gradient(loss_fn, images, captions, mode)
    return float((gradient - reference).norm() / reference.norm())


def test_fp32_scores_bring_the_hardest_negative_gradient_closer_to_fp32():
    images, captions = pairs(batch=256, dim=512, noise=2.0, device="cpu")
    hardest = LOSSES["triplet, hardest negative"]
    assert _gradient_error(hardest, images, captions, "fp32") == 0.0
    bf16, kept = (
        _gradient_error(hardest, images, captions, "bf16"),
        _gradient_error(hardest, images, captions, "fp32-scores"),
    )
    assert kept < bf16 / 2, (kept, bf16)


def test_the_benchmark_prints_a_row_per_loss_and_noise(capsys):
    main(["--batch", "16", "--dim", "8", "--noise", "1", "3"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith(("1.0", "3.0"))]
    assert len(rows) == 2 * len(LOSSES) and all(line.rstrip().endswith("%") for line in rows)
