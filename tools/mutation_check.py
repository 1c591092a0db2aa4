"""Mutation check for the formula tests: change one detail of a formula, run the tests that pin it,
expect a failure, restore the file. `python -m tools.mutation_check` prints CAUGHT or MISSED per
mutation (a few seconds each); every MISSED names a formula no test pins down.

Each mutation edits a source file in place and puts it back in a `finally`; run it on a clean
checkout (an interrupted run can leave a mutated file behind: `git diff` shows it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BLOCKS, ENCODERS, LOSSES, OPTIM = (
    "rsray/models/blocks.py",
    "rsray/models/encoders.py",
    "rsray/losses.py",
    "rsray/optim.py",
)
PRIORCLIP, PAE, DOVE = "rsray/models/priorclip.py", "rsray/models/pae.py", "rsray/models/dove.py"
BLOCK_TESTS, LOSS_TESTS = "tests/unit/test_blocks.py", "tests/unit/test_losses.py"
PRIORCLIP_TESTS, DOVE_TESTS = "tests/unit/test_priorclip.py", "tests/unit/test_dove.py"
GSWIN, MOMENTUM = "rsray/models/gswin.py", "rsray/models/momentum.py"
CMPAGL_TESTS = "tests/unit/test_cmpagl_losses.py"
CMPAGL, CMPAGL_MODEL_TESTS = "rsray/models/cmpagl.py", "tests/unit/test_cmpagl_model.py"

# (file, original text, mutated text, what it breaks, the tests that must notice)
MUTATIONS = [
    (
        BLOCKS,
        'rounding_mode="floor" if self.floor_divide else None',
        'rounding_mode="floor"',
        "GSA always floor-divides",
        BLOCK_TESTS,
    ),
    (
        BLOCKS,
        "mask_q, mask_k = torch.sigmoid(",
        "mask_k, mask_q = torch.sigmoid(",
        "GSA gate halves swapped",
        BLOCK_TESTS,
    ),
    (
        BLOCKS,
        'scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))',
        "scores = scores",
        "GSA padding mask dropped",
        BLOCK_TESTS,
    ),
    (
        BLOCKS,
        'torch.einsum("t,btd->bd", self.token_weight.mean(dim=1), x)',
        'torch.einsum("t,btd->bd", self.token_weight.sum(dim=1), x)',
        "WSA sums instead of averaging",
        BLOCK_TESTS,
    ),
    (
        BLOCKS,
        'ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}',
        'ACTIVATIONS = {"gelu": nn.ReLU, "relu": nn.ReLU}',
        "feed-forward GELU -> ReLU",
        BLOCK_TESTS,
    ),
    (
        BLOCKS,
        'ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}',
        'ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.GELU}',
        "SWAN paper's ReLU -> GELU",
        BLOCK_TESTS,
    ),
    (
        BLOCKS,
        "inner = [nn.LayerNorm(ffn_dim)] if norm else []",
        "inner = []",
        "PIR's feed-forward LayerNorm dropped",
        BLOCK_TESTS,
    ),
    (
        BLOCKS,
        "outs.append(torch.relu(masked_batch_norm(",
        "outs.append((masked_batch_norm(",
        "JRU ReLU dropped",
        BLOCK_TESTS,
    ),
    (
        BLOCKS,
        "return torch.cat(outs, dim=1), torch.cat(valids, dim=1)",
        "return torch.cat(outs[::-1], dim=1), torch.cat(valids[::-1], dim=1)",
        "JRU windows reordered",
        BLOCK_TESTS,
    ),
    (
        BLOCKS,
        "    out[valid] = bn(x[valid])",
        "    out[valid] = bn(x.reshape(-1, x.shape[-1])).reshape(x.shape)[valid]",
        "BatchNorm statistics over padding",
        BLOCK_TESTS,
    ),
    (ENCODERS, "lengths.to(x.device) - 1]", "lengths.to(x.device) - 2]", "last-token pooling off by one", BLOCK_TESTS),
    (
        ENCODERS,
        "return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)",
        "return (x * weights).sum(dim=1) / x.shape[1]",
        "mean pooling over padding",
        BLOCK_TESTS,
    ),
    (
        LOSSES,
        "return same @ embeddings / same.sum(dim=1, keepdim=True)",
        "return embeddings",
        "per-sample affiliation centres",
        LOSS_TESTS,
    ),
    (PRIORCLIP, "if local_centres:", "if False:", "per-worker affiliation centres", PRIORCLIP_TESTS),
    (
        PAE,
        "return F.normalize(tokens * belief.unsqueeze(-1), dim=1)",
        "return F.normalize(tokens * belief.unsqueeze(-1), dim=-1)",
        "open release's belief normalised over channels, not tokens",
        PRIORCLIP_TESTS,
    ),
    (
        PAE,
        "        return tokens[:, 0] + self.head(x[:, 0])\n\n\nclass TemporalPAE",
        "        return x[:, 0] + self.head(x[:, 0])\n\n\nclass TemporalPAE",
        "Spatial-PAE residual from after the rounds",
        PRIORCLIP_TESTS,
    ),
    (
        PAE,
        "token_map(x), key_padding_mask=padding)",
        "token_map(x), key_padding_mask=None)",
        "Temporal-PAE cross-attention attends to padding",
        PRIORCLIP_TESTS,
    ),
    (DOVE, "h = g * a + (1 - g) * b", "h = (1 - g) * a + g * b", "DTGA gate sides swapped", DOVE_TESTS),
    (
        DOVE,
        "return self.norm(regions + attended).mean(dim=1)",
        "return self.norm(regions + attended).sum(dim=1)",
        "IFA sums the regions",
        DOVE_TESTS,
    ),
    (
        DOVE,
        "scale = 1.0 / math.sqrt(query.shape[-1])",
        "scale = 1.0",
        "IGA scores not scaled by sqrt(D)",
        DOVE_TESTS,
    ),
    (DOVE, "spatial_scale=1.0, aligned=True", "spatial_scale=1.0, aligned=False", "RoI boxes not aligned", DOVE_TESTS),
    (
        LOSSES,
        "text_logits.t() if transposed_t2i else text_logits",
        "text_logits",
        "the release's transposed term",
        LOSS_TESTS,
    ),
    (
        LOSSES,
        "targets = targets / targets.sum(dim=1, keepdim=True)",
        "targets = targets",
        "InfoNCE positives not normalised",
        LOSS_TESTS,
    ),
    (OPTIM, "return param.ndim < 2 or any(", "return any(", "open_clip's 1-d exemption", "tests/unit/test_optim.py"),
    (
        OPTIM,
        "gamma ** ((epoch + offset) // every)",
        "gamma ** (epoch // every)",
        "the release's lr phase",
        "tests/unit/test_optim.py",
    ),
    (
        LOSSES,
        "targets = positives / positives.sum(dim=1, keepdim=True)",
        "targets = positives",
        "CMPAGL ITC multi-positive targets not normalised",
        CMPAGL_TESTS,
    ),
    (
        LOSSES,
        "targets_i2t = alpha * teacher_i2t + (1 - alpha) * targets",
        "targets_i2t = alpha * targets + (1 - alpha) * teacher_i2t",
        "CMPAGL distillation mix swapped",
        CMPAGL_TESTS,
    ),
    (
        LOSSES,
        "replace = chosen & (how >= 0.8) & (how < 0.9)",
        "replace = chosen & (how >= 0.8)",
        "MLM 80/10/10 -> 80/20/0",
        CMPAGL_TESTS,
    ),
    (
        LOSSES,
        "weights = scores.softmax(dim=1).masked_fill(same, 0.0)",
        "weights = scores.softmax(dim=1)",
        "ITM negatives may share the image",
        CMPAGL_TESTS,
    ),
    (
        MOMENTUM,
        "torch._foreach_lerp_(own, theirs, 1.0 - self.momentum)",
        "torch._foreach_lerp_(own, theirs, self.momentum)",
        "momentum step uses m instead of 1 - m",
        CMPAGL_TESTS,
    ),
    (
        PAE,
        "index_weights = (order + 1).to(tokens.dtype).rsqrt()",
        "index_weights = (order + 2).to(tokens.dtype).rsqrt()",
        "PIR-CLIP HEAD's index weight off by one",
        PRIORCLIP_TESTS,
    ),
    (
        PRIORCLIP,
        "total = scale_gradient(total, 1.0 / world_size())",
        "total = scale_gradient(total, 1.0)",
        "gather_gradient: mean_over_workers ignored",
        PRIORCLIP_TESTS,
    ),
    (
        LOSSES,
        "self.log_scale.clamp_(0.0, self.max_log)",
        "self.log_scale.clamp_(max=self.max_log)",
        "after-step logit-scale clamp loses its lower bound",
        LOSS_TESTS,
    ),
    (
        "rsray/train/loop.py",
        "        after_optimizer_step(model)\n",
        "",
        "the training loop skips the after-step hooks",
        "tests/unit/test_train_loop.py",
    ),
    (
        "rsray/models/clip.py",
        "saved.text_config.hidden_act = saved.vision_config.hidden_act = config.activation",
        "saved.text_config.hidden_act = config.activation",
        "activation switch misses a loaded vision tower",
        "tests/unit/test_clip.py",
    ),
    (
        "rsray/models/priorclip_open.py",
        "self.clip.logit_scale.clamp = config.logit_scale_clamp",
        "pass",
        "stage 2's logit_scale_clamp not applied to stage 1's scale",
        PRIORCLIP_TESTS,
    ),
    (
        PRIORCLIP,
        "tokens = tokens[:, : self.config.ranked_tokens]",
        "tokens = tokens[:, 1 : self.config.ranked_tokens]",
        "ranked_tokens drops the pooled token",
        PRIORCLIP_TESTS,
    ),
    (
        PRIORCLIP,
        'model_kwargs = {"zero_init_last": False} if init == "torchvision" else None',
        "model_kwargs = None",
        "instruction_init: torchvision ignored",
        PRIORCLIP_TESTS,
    ),
    # CMPAGL's wiring: what Cmpagl.loss feeds each helper (the helpers' own formulas are above)
    (CMPAGL, "labels[: len(image_ids)] = 1", "labels[len(image_ids) :] = 1", "ITM labels flipped", CMPAGL_MODEL_TESTS),
    (
        CMPAGL,
        "return logits[:, 1] - logits[:, 0]",
        "return logits[:, 0] - logits[:, 1]",
        "ITM pair score's sign flipped",
        CMPAGL_MODEL_TESTS,
    ),
    (
        CMPAGL,
        "self.queue.enqueue(momentum_image, momentum_text, image_ids)",
        "self.queue.enqueue(image.embedding, text.embedding, image_ids)",
        "the queue takes the online features",
        CMPAGL_MODEL_TESTS,
    ),
    (
        CMPAGL,
        "        self.momentum.update(self._online())  # ALBEF: the teacher moves first, then encodes\n"
        "        image = self.encode_images(batch)\n",
        "        image = self.encode_images(batch)\n",
        "the momentum encoder never moves",
        CMPAGL_MODEL_TESTS,
    ),
    (
        CMPAGL,
        'momentum_image, momentum_text = self._momentum_embeddings(batch["images"], ids, mask)\n',
        'momentum_image, momentum_text = self._momentum_embeddings(batch["images"], ids, mask)\n'
        "        self.momentum.update(self._online())\n",
        "the momentum encoder moves twice, after encoding",
        CMPAGL_MODEL_TESTS,
    ),
    (
        CMPAGL,
        "fused = self.bert.fuse(self.bert.encode_text(masked, mask), mask, image_tokens)",
        "fused = self.bert.encode_text(masked, mask)",
        "MLM skips the fusion half",
        CMPAGL_MODEL_TESTS,
    ),
    (
        CMPAGL,
        "min(1.0, self.steps_taken() / c.distill_warmup_steps)",
        "min(1.0, (self.steps_taken() + 1) / c.distill_warmup_steps)",
        "distillation alpha ramp a step ahead",
        CMPAGL_MODEL_TESTS,
    ),
    (
        CMPAGL,
        "return self.w_triplet * self.lambda_intra",
        "return self.lambda_intra",
        "intra term not weighed by w_triplet",
        CMPAGL_MODEL_TESTS,
    ),
    (
        CMPAGL,
        "itm_i2t = full_precision_scores(image.embedding, momentum_text) / temperature",
        "itm_i2t = full_precision_scores(image.embedding, momentum_text)",
        "ITM negatives drawn from plain cosines",
        CMPAGL_MODEL_TESTS,
    ),
    (
        CMPAGL,
        "triplet = triplet / batch_size",
        "triplet = triplet",
        "triplet_reduction: mean ignored",
        CMPAGL_MODEL_TESTS,
    ),
    (
        GSWIN,
        "x = x + self.drop_path1(self.global_attn(x))",
        "x = x + self.drop_path1(self.global_attn(self.norm1(x)))",
        "global branch fed the window branch's LN1(x)",
        "tests/unit/test_gswin.py",
    ),
    (
        GSWIN,
        "pooled = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), self.window)",
        "pooled = F.adaptive_max_pool2d(x.permute(0, 3, 1, 2), self.window)",
        "global window max- instead of average-pooled",
        "tests/unit/test_gswin.py",
    ),
    (
        "rsray/compare.py",
        'return self.mean("test/mR") - self.reference.mean("test/mR") if self.reference else math.nan',
        'return self.reference.mean("test/mR") - self.mean("test/mR") if self.reference else math.nan',
        "difference from the published mR with its sign flipped",
        "tests/unit/test_compare.py",
    ),
    (
        "rsray/weights_fetch.py",
        'with bar, open(part, "ab" if resumed else "wb") as out:',
        'with bar, open(part, "wb") as out:',
        "a resumed download overwrites what arrived before the cut",
        "tests/unit/test_weights_fetch.py",
    ),
]


def unapplicable() -> list[str]:
    """The mutations whose original text is not in their file exactly once (the code moved on)."""
    return [what for path, old, _, what, _ in MUTATIONS if Path(path).read_text().count(old) != 1]


def main() -> int:
    missed = 0
    for path, old, new, what, tests in MUTATIONS:
        file = Path(path)
        source = file.read_text()
        if old not in source:
            print(f"NOT APPLIED {what} (the code changed: update the mutation)")
            missed += 1
            continue
        file.write_text(source.replace(old, new, 1))
        try:
            run = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-x", tests, "-p", "no:cacheprovider"], capture_output=True
            )
            caught = run.returncode != 0
        finally:
            file.write_text(source)
        print(f"{'CAUGHT' if caught else 'MISSED'} {what}")
        missed += not caught
    print(f"{len(MUTATIONS) - missed} of {len(MUTATIONS)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
