"""Two CPU processes (gloo) take one training step through the trainer's code path and must get the gradients
a single process gets, including when one process's images have no boxes.

BatchNorm choice: in train mode BatchNorm couples the images of a batch, so per-process batches would
differ from the whole batch; SyncBatchNorm would fix that but PyTorch implements it for GPUs only. The
BatchNorm layers are therefore put in eval mode (running statistics), which makes every image's forward
pass independent of the others while every other layer still trains.

Two checks: (1) without denoising (whose group count depends on each process's largest image), the DDP
gradient equals one process on the whole batch; (2) with denoising, the process without boxes runs the same
graph (one dummy denoising query, no find_unused_parameters) and the DDP gradient equals the mean of the
two per-process gradients computed alone with the loss normaliser of the whole batch.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from rtdetr import RTDETR
from rtdetr.engine.distributed import init_distributed, wrap_model
from rtdetr.engine.trainer import compute_losses
from rtdetr.loss.criterion import RTDETRCriterion

SIZE = 64
TINY = dict(num_classes=3, num_queries=20, image_size=(SIZE, SIZE))


def make_model(num_denoising: int) -> RTDETR:
    torch.manual_seed(0)
    model = RTDETR.from_preset("rtdetr_tiny", num_denoising=num_denoising, **TINY).train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()  # running statistics: no coupling between the images of a batch (see module docstring)
    return model


def shards() -> list[tuple[torch.Tensor, list[dict]]]:
    """Rank 0: two images with 2 and 3 boxes; rank 1: two images without boxes."""
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, SIZE, SIZE, generator=g)
    targets = []
    for n in (2, 3, 0, 0):
        centers = torch.rand(n, 2, generator=g) * 0.5 + 0.25
        sizes = torch.rand(n, 2, generator=g) * 0.3 + 0.1
        targets.append({"labels": torch.randint(0, 3, (n,), generator=g), "boxes": torch.cat([centers, sizes], 1)})
    return [(images[:2], targets[:2]), (images[2:], targets[2:])]


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")  # fmt: skip
    torch.set_num_threads(1)
    process = init_distributed("cpu")
    images, targets = shards()[rank]
    for num_denoising in (0, 10):
        model = make_model(num_denoising)
        ddp = wrap_model(model, process, sync_bn=True, find_unused_parameters=num_denoising == 0)
        torch.manual_seed(123)  # the same denoising noise the reference draws
        compute_losses(ddp, RTDETRCriterion(3), images, targets, amp="off")["loss"].backward()
        torch.save(gradients(model), os.path.join(out_dir, f"dn{num_denoising}_rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_gradients(tmp_path_factory) -> dict:
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=2, join=True)
    return {f.stem: torch.load(f) for f in out_dir.glob("*.pt")}


def assert_same_gradients(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_ddp_step_equals_one_process_on_the_whole_batch(ddp_gradients):
    (images_a, targets_a), (images_b, targets_b) = shards()
    model = make_model(num_denoising=0)
    compute_losses(model, RTDETRCriterion(3), torch.cat([images_a, images_b]), targets_a + targets_b, amp="off")["loss"].backward()
    expected = gradients(model)
    assert ddp_gradients["dn0_rank0"].keys() == expected.keys()
    assert "decoder.denoising_class_embed.weight" not in expected  # unused without denoising
    assert_same_gradients(ddp_gradients["dn0_rank0"], expected)
    assert_same_gradients(ddp_gradients["dn0_rank1"], expected)


def test_ddp_with_denoising_and_a_process_without_boxes(ddp_gradients):
    """Each process alone normalises by its own box count (clamped to 1); under DDP by the mean count over
    processes. Rescaling the single-process losses by that ratio gives the DDP loss of each process."""
    model = make_model(num_denoising=10)
    data = shards()
    mean_boxes = max(sum(len(t["labels"]) for _, ts in data for t in ts) / 2, 1.0)
    for images, targets in data:
        torch.manual_seed(123)
        local_boxes = max(sum(len(t["labels"]) for t in targets), 1)
        loss = compute_losses(model, RTDETRCriterion(3), images, targets, amp="off")["loss"] * local_boxes / mean_boxes
        (loss / 2).backward()  # DDP averages the two processes' gradients
    expected = gradients(model)
    assert "decoder.denoising_class_embed.weight" in expected  # the dummy query keeps it in the graph
    assert set(expected) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert_same_gradients(ddp_gradients["dn10_rank0"], expected)
    assert_same_gradients(ddp_gradients["dn10_rank1"], expected)
