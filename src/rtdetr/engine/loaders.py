"""The shape of the training loader: images per forward pass and accumulation (`batch_plan`), optimizer steps
per epoch, and the loader worker processes for a device."""

from __future__ import annotations

import math
from typing import Any

from ..config import TrainConfig


def loader_workers(device_type: str, cpu_cores: int, augmenting: bool) -> tuple[int, str]:
    """Loader worker processes for a device (TrainConfig.num_workers = -1), and why.

    Measured (benchmarks/train_step_profile.py, rtdetr_tiny at 320 px, batch 16, 2-core Xeon): without strong
    augmentation the loader needs 0.03-0.04 s per batch against a 0.56 s step, and workers only take cores from
    the step: 0.598 s/step with 0 workers, 0.618 with 1, 0.632 with 2, 0.655 with 4."""
    if device_type == "cuda":
        return min(4, cpu_cores), "CUDA: loader workers keep the GPU fed (official 4)"
    if not augmenting:
        return 0, ("CPU without strong augmentation: loading is ~6% of a step, so it runs in the main process "
                   "(0 workers 0.598 s/step, 4 workers 0.655 on 2 cores)")  # fmt: skip
    workers = max(1, min(4, cpu_cores // 2))
    return workers, f"CPU with strong augmentation: {workers} worker(s) on {cpu_cores} cores overlap it with the step"


def steps_per_epoch(num_images: int, config: TrainConfig, world_size: int, source: Any = "the dataset") -> int:
    """Optimizer steps in one epoch of `num_images` (each process gets ceil(num_images / world_size) images,
    as `ResumableSampler`; incomplete batches are dropped). Raises if not even one batch fits."""
    step_batch, accumulation = batch_plan(config, world_size)
    steps = math.ceil(num_images / world_size) // step_batch // accumulation
    if steps == 0:
        raise ValueError(
            f"{source} has {num_images} images: fewer than one batch of {config.batch_size}; lower --batch-size"
        )
    return steps


def batch_plan(config: TrainConfig, world_size: int) -> tuple[int, int]:
    """(images per process per forward pass, forward passes accumulated per optimizer step)."""
    per_process, rest = divmod(config.batch_size, world_size)
    step_batch = config.step_batch_size or per_process
    if rest or per_process == 0 or per_process % step_batch:
        raise ValueError(
            f"batch_size {config.batch_size} must split into {world_size} processes x step_batch_size "
            f"{step_batch} x an integer number of accumulation steps"
        )
    return step_batch, per_process // step_batch
