"""Gathering with gradients across two real gloo processes equals one process on the whole batch."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rsray.distributed import gather_no_grad, gather_with_grad, world_size
from rsray.losses import gathered_info_nce_loss, info_nce_loss
from tests.conftest import run_forked

WORLD, LOCAL, DIM = 2, 4, 8


def _worker(rank: int, port: int, images: torch.Tensor, texts: torch.Tensor, ids: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    warnings.simplefilter("error", FutureWarning)  # no deprecated collective (torch.distributed.nn's is)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        local_images = images[rows].clone().requires_grad_(True)
        local_texts = texts[rows].clone().requires_grad_(True)
        all_images, all_texts = gather_with_grad(local_images), gather_with_grad(local_texts)
        all_ids = gather_no_grad(ids[rows])
        loss = info_nce_loss(all_images @ all_texts.t(), 10.0, all_ids)
        loss.backward()
        out[rank] = (float(loss.detach()), local_images.grad.clone(), local_texts.grad.clone(), all_ids.clone())
    finally:
        dist.destroy_process_group()


def _local_loss_worker(rank: int, port: int, images, texts, ids, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        results = {}
        for name, local_ids in (("ids", ids[rows]), ("no ids", None)):
            local_images = images[rows].clone().requires_grad_(True)
            local_texts = texts[rows].clone().requires_grad_(True)
            loss = gathered_info_nce_loss(local_images, local_texts, 10.0, local_ids)
            loss.backward()
            results[name] = (float(loss.detach()), local_images.grad.clone(), local_texts.grad.clone())
        out[rank] = results
    finally:
        dist.destroy_process_group()


def test_local_rows_loss_gives_the_whole_matrix_gradients():
    """open_clip's local loss: each worker [B, W*B] logits per direction, not [W*B, W*B]; the mean
    of the workers' losses is the whole loss and each worker's rows get the gradients the whole
    matrix gives them (times W, which DDP's average divides out), with and without image ids."""
    torch.manual_seed(1)
    images = torch.nn.functional.normalize(torch.randn(WORLD * LOCAL, DIM), dim=1)
    texts = torch.nn.functional.normalize(torch.randn(WORLD * LOCAL, DIM), dim=1)
    ids = torch.tensor([0, 0, 1, 2, 3, 4, 4, 5])
    out = mp.Manager().dict()
    run_forked(_local_loss_worker, (images, texts, ids, out), WORLD)
    for name, whole_ids in (("ids", ids), ("no ids", None)):
        whole_images, whole_texts = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
        whole = info_nce_loss(whole_images @ whole_texts.t(), 10.0, whole_ids)
        whole.backward()
        losses = [out[rank][name][0] for rank in range(WORLD)]
        assert sum(losses) / WORLD == pytest.approx(float(whole.detach()), rel=1e-6), name
        assert losses[0] != pytest.approx(losses[1], rel=1e-3)  # each worker really has its own rows
        for rank in range(WORLD):
            rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
            torch.testing.assert_close(out[rank][name][1], WORLD * whole_images.grad[rows], msg=name)
            torch.testing.assert_close(out[rank][name][2], WORLD * whole_texts.grad[rows], msg=name)


def test_single_process_returns_input():
    x = torch.randn(3, 2)
    assert world_size() == 1
    assert gather_with_grad(x) is x and gather_no_grad(x) is x


def test_two_workers_see_all_negatives_and_get_full_batch_gradients():
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(WORLD * LOCAL, DIM), dim=1)
    texts = torch.nn.functional.normalize(torch.randn(WORLD * LOCAL, DIM), dim=1)
    ids = torch.tensor([0, 0, 1, 2, 3, 4, 4, 5])  # image 0 and image 4 have two captions each

    whole_images, whole_texts = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
    whole = info_nce_loss(whole_images @ whole_texts.t(), 10.0, ids)
    whole.backward()

    out = mp.Manager().dict()
    run_forked(_worker, (images, texts, ids, out), WORLD)

    for rank in range(WORLD):
        loss, image_grad, text_grad, gathered_ids = out[rank]
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        assert loss == pytest.approx(float(whole.detach()), rel=1e-6)  # the loss over all 8 pairs, not 4
        assert torch.equal(gathered_ids, ids)
        # Each worker's rows receive the gradient of every worker's (identical) loss; DDP's average
        # over workers then equals the single-process gradient.
        torch.testing.assert_close(image_grad, WORLD * whole_images.grad[rows])
        torch.testing.assert_close(text_grad, WORLD * whole_texts.grad[rows])
