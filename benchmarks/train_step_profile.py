"""Where a CPU training step's time goes: the loader alone, the step alone (forward + loss + backward + AdamW on
one batch held in memory), and full steps with 0 / 1 / 2 / 4 loader workers.

    python3 benchmarks/train_step_profile.py --data runs/budget/digits --img-size 320 --steps 20

Prints seconds per optimizer step (medians after warm-up) of each, on the preset's defaults. Run it alone on the
machine: the loader workers and the training threads share the same cores, which is what it measures.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rtdetr.config import TrainConfig
from rtdetr.data.datasets import open_split
from rtdetr.engine.distributed import Rank
from rtdetr.engine.run import build_model
from rtdetr.engine.trainer import Trainer


def make_trainer(data: str, img_size: int, workers: int, output: str) -> Trainer:
    train_set, val_set = open_split(data, "train"), open_split(data, "val")
    network = build_model("rtdetr_tiny", None, len(train_set.class_names), {"image_size": (img_size, img_size)})
    config = TrainConfig(num_workers=workers, stop_epoch=0, warmup_steps=10, output=output, lr=1e-3, backbone_lr=1e-3)
    trainer = Trainer(network, config, train_set, val_set, Rank(0, 1, torch.device("cpu")))
    trainer.ddp.train()
    trainer.set_epoch(0)
    return trainer


def median_after_warmup(times: list[float], warmup: int = 2) -> float:
    return statistics.median(times[warmup:])


def time_loader(trainer: Trainer, steps: int) -> float:
    """Seconds per batch of the loader alone (its workers have the cores to themselves)."""
    batches, times = iter(trainer.loader), []
    for _ in range(steps):
        tic = time.perf_counter()
        next(batches)
        times.append(time.perf_counter() - tic)
    return median_after_warmup(times)


def time_compute(trainer: Trainer, steps: int) -> float:
    """Seconds per optimizer step on one batch held in memory (no loader)."""
    batch = next(iter(trainer.loader))
    times = []
    for _ in range(steps):
        tic = time.perf_counter()
        trainer.train_step(iter([batch]))
        times.append(time.perf_counter() - tic)
    return median_after_warmup(times)


def time_steps(trainer: Trainer, steps: int) -> float:
    """Seconds per optimizer step with the loader feeding it (mean over the steps after warm-up: stalls count)."""
    batches, ends = iter(trainer.loader), []
    for _ in range(steps):
        trainer.train_step(batches)
        ends.append(time.perf_counter())
    return (ends[-1] - ends[2]) / (len(ends) - 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--img-size", type=int, default=320)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output", default="/tmp/train_step_profile")
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}, rtdetr_tiny at {args.img_size} px, batch 16")
    reference = make_trainer(args.data, args.img_size, 1, args.output)
    print(f"loader alone (1 worker): {time_loader(reference, args.steps):.3f} s/batch")
    print(f"loader alone (main process): {time_loader(make_trainer(args.data, args.img_size, 0, args.output), args.steps):.3f} s/batch")
    print(f"step alone (batch in memory): {time_compute(reference, args.steps):.3f} s/step")
    for workers in (0, 1, 2, 4):
        trainer = make_trainer(args.data, args.img_size, workers, args.output)
        print(f"full steps, {workers} loader workers: {time_steps(trainer, args.steps):.3f} s/step")


if __name__ == "__main__":
    main()
