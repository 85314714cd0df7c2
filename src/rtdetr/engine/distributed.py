"""torch.distributed support: `torchrun --nproc_per_node N -m rtdetr.cli train ...` runs one process per
device (NCCL on GPUs, gloo on CPU). Rank 0 logs and writes checkpoints; evaluation is gathered from all ranks.

Without torchrun's environment (RANK, WORLD_SIZE, ...) everything here is a no-op for a single process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rank:
    """Where this process runs: its rank among `world_size` processes and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> Rank:
    """Join the process group torchrun describes in the environment (if any) and pick the device.

    device: 'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:k'. Under torchrun each process
    takes cuda:LOCAL_RANK and NCCL; on CPU the processes use gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = requested_device(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device '{device}' requested but CUDA is not available")
    if device == "cuda":
        device = f"cuda:{local_rank}"
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend=backend)
        logger.info("process %d of %d on %s (%s)", rank, world_size, device, backend)
    return Rank(rank, world_size, torch.device(device))


def requested_device(device: str) -> str:
    """'auto' -> 'cuda' when CUDA is available, else 'cpu'; any other name unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, process: Rank, sync_bn: bool, find_unused_parameters: bool) -> nn.Module:
    """DistributedDataParallel around `model` (returned unchanged for one process).

    sync_bn converts BatchNorm to SyncBatchNorm first (official default), so statistics are computed over the
    whole batch; PyTorch implements it for GPUs only, so on CPU each process keeps its own statistics.
    Every process must run the same graph each step; the decoder guarantees this for batches without
    boxes (one dummy denoising query), so `find_unused_parameters` is needed only without denoising.
    """
    if not process.distributed:
        return model
    if sync_bn and process.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif sync_bn and process.is_main:
        logger.info("BatchNorm: each CPU process normalises with its own share of the batch (SyncBatchNorm needs GPUs)")
    device_ids = [process.device.index] if process.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose order is a function of (seed, epoch) only, able to start mid-epoch.

    Every rank shuffles the same permutation (seeded with seed + epoch, padded to a multiple of the world
    size) and takes every world_size-th index. `set_epoch(epoch, start)` skips this rank's first `start`
    indices, so a run resumed after k steps sees exactly the batches the uninterrupted run would have.
    """

    def __init__(self, dataset_len: int, process: Rank, seed: int, shuffle: bool = True) -> None:
        super().__init__(
            range(dataset_len), num_replicas=process.world_size, rank=process.rank, shuffle=shuffle, seed=seed
        )
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


def all_reduce_mean(values: dict[str, float], process: Rank) -> dict[str, float]:
    """The mean of each value over all processes (the values themselves for one process)."""
    if not process.distributed or not values:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=process.device)
    dist.all_reduce(tensor)
    return dict(zip(values, (tensor / process.world_size).tolist()))


def all_gather_objects(obj: object, process: Rank) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not process.distributed:
        return [obj]
    gathered: list = [None] * process.world_size
    dist.all_gather_object(gathered, obj)
    return gathered
