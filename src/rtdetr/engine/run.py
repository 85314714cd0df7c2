"""Starting a training run: `train(model, data=..., **settings) -> output folder`.

    from rtdetr.engine.run import train
    out = train("rtdetr_r18vd", data="datasets/my_data", epochs=12, batch_size=8)   # out/best.pt, out/last.pt
    out = train(data="datasets/my_data", weights="rtdetr_r18vd_dec3_6x_coco_from_paddle.pth")  # fine-tune
    out = train(resume="runs/train/last.pt")                                                  # continue

This module resolves what the run is (the network, its starting weights, the data, the settings) and hands it
to `Trainer`, which owns the loop. `RTDETR.fit` calls it with the model itself.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..config import ModelConfig, TrainConfig, check_overrides, native_bf16, preset
from ..data.coco import CocoDetection
from ..data.datasets import open_split
from ..data.validate import check_data, check_dataset, format_reports
from ..models.rtdetr import RTDETRModel
from ..weights.checkpoint import torch_load
from ..weights.loading import fit_state_dict, read_weights
from .allocator import keep_freed_memory
from .launch import launch, local_processes
from .distributed import Rank, all_gather_objects, cleanup_distributed, init_distributed, requested_device
from .recipe import Resolution, RunFacts, official_variant, resolve, training_amp
from .rng import rng_state, seed_everything, set_rng_state
from .schedule import TimeBudget, guess_eval_seconds
from .loaders import steps_per_epoch
from .trainer import Trainer

logger = logging.getLogger(__name__)


def build_model(
    model: RTDETRModel | str | None, weights: str | Path | None, num_classes: int, overrides: dict[str, Any]
) -> RTDETRModel:
    """The network to train on a dataset of `num_classes` classes.

    model: a preset name, a network (its weights are the starting point) or None (the architecture of
    `weights`, else rtdetr_r18vd). weights: any checkpoint `read_weights` reads, loaded into the network;
    with a different number of classes the class heads are re-initialised (and logged by name).
    """
    if isinstance(model, RTDETRModel) and (weights or overrides):
        raise ValueError("pass either a model or a preset name with weights/config overrides, not both")
    loaded = read_weights(weights) if weights else None
    if isinstance(model, RTDETRModel):
        config, state, source = model.config, model.state_dict(), "the given model"
    else:
        config = preset(model) if isinstance(model, str) else (loaded.config if loaded else preset("rtdetr_r18vd"))
        state, source = (loaded.state_dict, loaded.source) if loaded else (None, "")
    network = RTDETRModel(config.replace(**{"num_classes": num_classes, **overrides}))
    if state is not None:
        report = fit_state_dict(network, state, source, new_classes=True)
        if not report.reinitialised:
            logger.info("loaded %s (all %d tensors, class heads included)", source, len(state))
    return network


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Overrides by field name -> (TrainConfig ones, ModelConfig ones); unknown names raise."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - train_fields - model_fields)
    if unknown:
        raise ValueError(
            f"unknown setting(s) {', '.join(unknown)}; TrainConfig fields: {', '.join(sorted(train_fields))}; "
            f"ModelConfig fields: {', '.join(sorted(model_fields))}"
        )
    train_overrides = check_overrides(TrainConfig, {k: v for k, v in overrides.items() if k in train_fields})
    model_overrides = check_overrides(ModelConfig, {k: v for k, v in overrides.items() if k in model_fields})
    return train_overrides, model_overrides


@dataclass(frozen=True)
class DataSource:
    """Where a run's data is: a dataset folder of any layout (COCO, Roboflow, YOLO) and/or explicit COCO files
    per split, which win over the folder's. Stored in last.pt (plain strings) so a resumed run finds it."""

    data: str | None = None
    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None

    def explicit(self, split: str) -> tuple[str, str] | None:
        ann, images = getattr(self, f"{split}_ann"), getattr(self, f"{split}_images")
        if (ann is None) != (images is None):
            raise ValueError(f"give both {split}_ann and {split}_images (a COCO annotation file and its image folder)")
        return (ann, images) if ann is not None else None

    def check(self) -> None:
        """The dataset check of every split (`data.validate`): raises DatasetError listing every problem of
        every split at once, before anything is trained."""
        reports = []
        splits = [s for s in ("train", "val") if self.explicit(s) is None]
        if splits and self.data is None:
            raise ValueError("no dataset: pass data=<folder> (COCO, Roboflow or YOLO layout) or explicit "
                             + ", ".join(f"{s}_ann and {s}_images" for s in splits))  # fmt: skip
        if splits:
            reports += check_data(self.data, splits)
        reports += [check_dataset(*self.explicit(s)) for s in ("train", "val") if self.explicit(s) is not None]
        if not all(report.ok for report in reports):
            raise DatasetError(format_reports(reports, max_lines=None))
        for report in reports:
            if report.warnings:
                logger.warning("%s", report.summary())

    def open(self, split: str, skip_bad_images: bool = False) -> CocoDetection:
        explicit = self.explicit(split)
        if explicit is not None:
            return CocoDetection(*explicit, skip_bad_images=skip_bad_images)
        return open_split(self.data, split, skip_bad_images=skip_bad_images)

    def record(self) -> dict[str, str | None]:
        return {k: str(Path(v).resolve()) if v is not None else None for k, v in dataclasses.asdict(self).items()}


class DatasetError(ValueError):
    """The dataset check found errors; the message lists all of them."""


def train(
    model: RTDETRModel | str | None = None,
    data: str | Path | None = None,
    *,
    weights: str | Path | None = None,
    resume: str | Path | None = None,
    train_ann: str | Path | None = None,
    train_images: str | Path | None = None,
    val_ann: str | Path | None = None,
    val_images: str | Path | None = None,
    callbacks: Sequence[Callable[[Trainer], None]] = (),
    **overrides: Any,
) -> Path:
    """Train on a COCO-format dataset; returns the output folder (last.pt, best.pt, log.jsonl, curves.png).

    model: preset name (e.g. 'rtdetr_r18vd'), a network (e.g. an RTDETR), or None (the architecture of
    `weights`). data: a dataset folder of any layout (COCO, Roboflow, YOLO: `data.datasets`), and/or explicit COCO
    files per split. Every split is checked first (`DataSource.check`); errors refuse the run, all listed.
    weights: start from these weights (official, Hugging Face or ours; class heads re-initialised for new
    classes). resume: continue a run from its last.pt (config, data paths and state come from it; TrainConfig
    overrides such as epochs still apply). overrides: TrainConfig and ModelConfig fields by name; with
    processes=0 (chosen for the device) or N > 1 the run trains in that many new processes (`engine.launch`;
    `rtdetr train` passes 0) and this returns rank 0's output folder.
    """
    train_overrides, model_overrides = split_overrides(overrides)
    given = {"data": data, "train_ann": train_ann, "train_images": train_images, "val_ann": val_ann,
             "val_images": val_images}  # fmt: skip
    given = {k: str(v) for k, v in given.items() if v is not None}
    checkpoint = torch_load(resume) if resume else None
    if checkpoint is not None and (model is not None or weights is not None or model_overrides):
        raise ValueError("resume continues the saved model: do not pass a model, weights or ModelConfig fields")
    source = DataSource(**{**(checkpoint["data"] if checkpoint else {}), **given})
    if checkpoint is None and train_overrides.get("check_data", TrainConfig.check_data):
        source.check()
    saved = TrainConfig(**checkpoint["train_config"]) if checkpoint else TrainConfig()
    settings = saved.replace(**train_overrides)
    device_type = torch.device(requested_device(settings.device)).type
    processes, why = local_processes(settings.processes, device_type, os.cpu_count() or 1, settings.batch_size)
    if processes > 1 and "WORLD_SIZE" not in os.environ:  # not yet one of the processes (ours or torchrun's)
        if callbacks:
            raise ValueError("callbacks run in this process only: train with processes=1 to use them")
        logger.info("training in %d processes: %s", processes, why)
        kwargs = {"model": model, "weights": weights, "resume": resume, **given, **overrides, "processes": processes,
                  "check_data": False}  # (the data was checked here)  # fmt: skip
        return launch(train, kwargs, processes)
    process = init_distributed(settings.device)
    if process.device.type == "cpu":
        keep_freed_memory()  # ~10% faster CPU steps: no page faults for the same activations every step
    try:
        if checkpoint is not None:
            trainer = resumed_trainer(checkpoint, Path(resume), source, train_overrides, process, callbacks)
        else:
            trainer = new_trainer(model, weights, source, train_overrides, model_overrides, process, callbacks)
        trainer.fit()
        return trainer.output
    finally:
        cleanup_distributed()


def new_trainer(
    model: RTDETRModel | str | None, weights: str | Path | None, source: DataSource, train_overrides: dict[str, Any],
    model_overrides: dict[str, Any], process: Rank, callbacks: Sequence[Callable[[Trainer], None]],
) -> Trainer:  # fmt: skip
    """A fresh run: the network (from a preset, a model or weights), its data and the resolved recipe."""
    train_set = source.open("train", train_overrides.get("skip_bad_images", False))
    val_set = source.open("val")
    check_same_classes(train_set, val_set)
    seed_everything(train_overrides.get("seed", TrainConfig.seed))  # the same initial weights on every rank
    network = build_model(model, weights, len(train_set.class_names), model_overrides)
    pretrained = weights is not None or isinstance(model, RTDETRModel)
    resolution = resolve_recipe(train_overrides, network, train_set, val_set, process, pretrained)
    if process.is_main:
        logger.info("training settings (recipe %r):\n%s", resolution.config.recipe, resolution.table())
    seed_everything(resolution.config.seed + process.rank)  # augmentation and denoising noise differ per rank
    return Trainer(network, resolution.config, train_set, val_set, process, callbacks, resolution.budget,
                   resolution.record(), source.record())  # fmt: skip


def resumed_trainer(
    checkpoint: dict[str, Any], path: Path, source: DataSource, train_overrides: dict[str, Any], process: Rank,
    callbacks: Sequence[Callable[[Trainer], None]],
) -> Trainer:  # fmt: skip
    """The run of a last.pt, in its folder unless told otherwise, with its recipe, budget and state."""
    config = TrainConfig(**checkpoint["train_config"]).replace(**{"output": str(path.parent), **train_overrides})
    train_set = source.open("train", config.skip_bad_images)
    if list(checkpoint["category_ids"]) != train_set.category_ids:
        raise ValueError(f"{train_set.ann_file} has category ids {train_set.category_ids}, the checkpoint "
                         f"{checkpoint['category_ids']}: resume on the dataset it was trained on")  # fmt: skip
    val_set = source.open("val")
    network = RTDETRModel(ModelConfig(**checkpoint["config"]))
    budget = TimeBudget.from_state_dict(checkpoint["budget"]) if checkpoint.get("budget") else None
    seed_everything(config.seed + process.rank)
    trainer = Trainer(network, config, train_set, val_set, process, callbacks, budget, checkpoint.get("recipe"),
                      source.record())  # fmt: skip
    trainer.load_state(checkpoint)
    return trainer


def resolve_recipe(
    explicit: dict[str, Any], network: RTDETRModel, train_set: CocoDetection, val_set: CocoDetection,
    process: Rank, pretrained: bool,
) -> Resolution:  # fmt: skip
    """The run's TrainConfig from its recipe (`engine.recipe.resolve`) and what the run is; with a time budget
    the seconds per step are measured first on a few probe steps (`probe_seconds_per_step`)."""
    base = TrainConfig(**explicit)
    per_epoch = steps_per_epoch(len(train_set), base, process.world_size, train_set.ann_file)
    facts = RunFacts(
        official_variant(network.config), sum(p.numel() for p in network.parameters() if p.requires_grad),
        tuple(network.config.image_size), len(train_set), per_epoch, pretrained=pretrained,
        device_type=process.device.type, cpu_cores=os.cpu_count() or 1,
        discrete_sampling=network.config.cross_attn_method == "discrete", native_bf16=native_bf16(process.device),
    )  # fmt: skip
    if base.time_minutes > 0:
        probe_config = base.replace(amp=training_amp(explicit, facts))
        seconds = probe_seconds_per_step(network, probe_config, train_set, val_set, process)
        eval_seconds = guess_eval_seconds(len(val_set), base.batch_size, seconds)
        facts = dataclasses.replace(facts, seconds_per_step=seconds, eval_seconds=eval_seconds)
    return resolve(explicit, facts)


def probe_seconds_per_step(
    network: RTDETRModel, config: TrainConfig, train_set: CocoDetection, val_set: CocoDetection, process: Rank,
    steps: int = 3,
) -> float:  # fmt: skip
    """Wall seconds per optimizer step, the median of `steps` steps after a warm-up one (loader start-up), on
    a copy of the network with the run's batch, data pipeline (no strong augmentation: short runs have none)
    and device. The random streams are restored afterwards, so the run itself is unchanged by the probe."""
    saved = rng_state()
    probe_config = config.replace(stop_epoch=0, max_steps=0, time_minutes=0.0, recipe="official")
    probe = Trainer(copy.deepcopy(network), probe_config, copy.copy(train_set), copy.copy(val_set), process)
    probe.ddp.train()
    probe.set_epoch(0)
    batches = iter(probe.loader)
    times = []
    for _ in range(min(steps + 1, probe.steps_per_epoch)):
        tic = time.perf_counter()
        probe.train_step(batches)
        times.append(time.perf_counter() - tic)
    set_rng_state(saved)
    seconds = statistics.median(times[1:] or times)  # one batch per epoch: the warm-up step is all there is
    # The slowest process's: DDP steps go at its pace, and every process must derive the same schedule.
    seconds = max(all_gather_objects(seconds, process))
    logger.info("time budget: %.3f s per optimizer step measured on %d probe steps", seconds, steps)
    return seconds


def check_same_classes(train_set: CocoDetection, val_set: CocoDetection) -> None:
    """The validation split must have the training split's categories: the model predicts those."""
    train, val = dict(zip(train_set.category_ids, train_set.class_names)), dict(zip(val_set.category_ids, val_set.class_names))
    if train != val:
        raise ValueError(
            f"{val_set.ann_file} has the categories {val} but {train_set.ann_file} has {train}: the validation "
            "split must have the training split's categories (ids and names)"
        )
