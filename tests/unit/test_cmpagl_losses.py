"""CMPAGL's training machinery, each piece against its formula: the momentum step, the queue ring,
ALBEF's queue ITC with multi-positive and distilled targets, BERT's MLM masking and ITM's hard
negatives."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rsray.losses import mask_tokens, queue_itc_loss, sample_hard_negatives
from rsray.models.momentum import FeatureQueue, MomentumCopy


def test_one_momentum_step_moves_each_weight_by_exactly_the_configured_momentum():
    online = {"enc": nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Dropout(0.5))}
    teacher = MomentumCopy(online, momentum=0.995)
    for p in teacher.copies.parameters():
        p.data.zero_()
    for p in online["enc"].parameters():
        p.data.fill_(1.0)
    teacher.update(online)
    for p in teacher.copies.parameters():
        assert torch.allclose(p, torch.full_like(p, 1 - 0.995), rtol=0, atol=1e-7)  # 0.995 * 0 + 0.005 * 1
        assert not p.requires_grad and p.grad is None
    teacher.train()
    assert not teacher.copies["enc"][2].training  # the teacher never drops out
    start = [p.clone() for p in teacher.copies.parameters()]
    for p in online["enc"].parameters():
        p.data.fill_(3.0)
    teacher.update(online)
    for before, p in zip(start, teacher.copies.parameters(), strict=True):
        assert torch.allclose(p, 0.995 * before + 0.005 * 3.0, rtol=0, atol=1e-7)


def test_the_queue_wraps_and_keeps_features_and_ids():
    queue = FeatureQueue(size=10, dim=2)
    for step in range(3):  # 3 x 4 rows into 10 slots: the third step wraps to slots 8, 9, 0, 1
        rows = torch.arange(4) + 4 * step
        queue.enqueue(rows[:, None].float().expand(4, 2), -rows[:, None].float().expand(4, 2), rows)
    assert int(queue.ptr) == 2 and int(queue.filled) == 10
    assert queue.ids.tolist() == [10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    assert queue.image[:, 0].tolist() == [10, 11, 2, 3, 4, 5, 6, 7, 8, 9] and queue.text[0, 1] == -10
    image, _, ids = queue.contents()
    image += 1  # a clone: the queue is untouched
    assert queue.image[0, 0] == 10 and ids.tolist() == queue.ids.tolist()
    with pytest.raises(ValueError, match="queue of 10 cannot take 11 rows"):
        queue.enqueue(torch.zeros(11, 2), torch.zeros(11, 2), torch.zeros(11, dtype=torch.long))
    restored = FeatureQueue(size=10, dim=2)
    restored.load_state_dict(queue.state_dict())  # a resumed run continues with its queue
    assert int(restored.ptr) == 2 and torch.equal(restored.ids, queue.ids)


def _hand_itc(image, text, m_image, m_text, ids, q_image, q_text, q_ids, t, alpha):
    keys_t, keys_i, key_ids = torch.cat([m_text, q_text]), torch.cat([m_image, q_image]), torch.cat([ids, q_ids])
    total = 0.0
    for queries, keys, teacher_q in ((image, keys_t, m_image), (text, keys_i, m_text)):
        direction = 0.0
        for i in range(len(ids)):
            positive = [float(key_ids[j] == ids[i]) for j in range(len(key_ids))]
            target = [p / sum(positive) for p in positive]
            if alpha:
                teacher = torch.softmax(teacher_q[i] @ keys.t() / t, 0).tolist()
                target = [alpha * a + (1 - alpha) * b for a, b in zip(teacher, target, strict=True)]
            logits = (queries[i] @ keys.t() / t).tolist()
            log_z = math.log(sum(math.exp(x) for x in logits))
            direction += -sum(w * (x - log_z) for w, x in zip(target, logits, strict=True))
        total += direction / len(ids)
    return total / 2


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_queue_itc_equals_a_hand_computation_with_same_image_entries_as_positives(alpha):
    torch.manual_seed(0)
    unit = lambda *shape: F.normalize(torch.randn(*shape), dim=-1)  # noqa: E731
    image, text, m_image, m_text = unit(4, 8), unit(4, 8), unit(4, 8), unit(4, 8)
    ids = torch.tensor([0, 1, 1, 2])
    q_image, q_text, q_ids = unit(5, 8), unit(5, 8), torch.tensor([2, 7, 0, 9, 1])  # ids 0, 1, 2 recur
    loss = queue_itc_loss(image, text, m_image, m_text, ids, (q_image, q_text, q_ids), 0.07, alpha)
    expected = _hand_itc(image, text, m_image, m_text, ids, q_image, q_text, q_ids, 0.07, alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_mlm_masks_fifteen_percent_of_eligible_tokens_80_10_10_and_never_specials():
    cls, sep, pad, mask, vocab = 101, 102, 0, 103, 1000
    g = torch.Generator().manual_seed(0)
    rows, length = 4000, 60
    ids = torch.randint(1000, 2000, (rows, length), generator=g) % vocab
    ids[ids < 200] += 200  # ordinary words only
    ids[:, 0], lengths = cls, torch.randint(5, length, (rows,), generator=g)
    positions = torch.arange(length)[None, :]
    ids[positions == lengths[:, None]] = sep
    attention = (positions <= lengths[:, None]).long()
    ids[attention == 0] = pad
    masked, labels = mask_tokens(ids, attention, (cls, sep, pad), mask, vocab, 0.15, g)
    chosen = labels != -100
    eligible = attention.bool() & (ids != cls) & (ids != sep)
    assert not (chosen & ~eligible).any()  # never padding, CLS or SEP
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    assert chosen.sum() / eligible.sum() == pytest.approx(0.15, abs=0.005)
    to_mask = (masked[chosen] == mask).float().mean()
    kept = (masked[chosen] == ids[chosen]).float().mean()
    assert to_mask == pytest.approx(0.8, abs=0.01) and kept == pytest.approx(0.1 + 0.1 / vocab, abs=0.01)
    none, no_labels = mask_tokens(ids[:2], torch.zeros_like(ids[:2]), (cls, sep, pad), mask, vocab, 0.15, g)
    assert torch.equal(none, ids[:2]) and (no_labels == -100).all()


def test_itm_negatives_never_share_the_image_and_follow_the_softmax():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.5], [0.2, 0.7, 0.4, 0.3], [0.6, 0.3, 0.9, 0.0], [0.1, 0.1, 0.1, 0.1]])
    ids = torch.tensor([0, 0, 1, 2])  # rows 0 and 1 show the same image
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4, 4)
    for _ in range(10_000):
        drawn, valid = sample_hard_negatives(scores, ids, g)
        counts[torch.arange(4), drawn] += 1
    assert valid.all()
    same = ids[:, None] == ids[None, :]
    assert counts[same].sum() == 0
    expected = scores.softmax(1).masked_fill(same, 0)
    expected /= expected.sum(1, keepdim=True)
    assert torch.allclose(counts / 10_000, expected, atol=0.02)
    _, valid = sample_hard_negatives(scores[:2, :2], torch.tensor([5, 5]), g)
    assert not valid.any()  # every key shows the same image: no negative, the rows are dropped
