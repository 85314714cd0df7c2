"""Training RT-DETR: `train(model, data=..., **overrides) -> output folder`.

    from rtdetr.engine.trainer import train
    out = train("rtdetr_r18vd", data="datasets/my_data", epochs=12, batch_size=8)   # out/best.pt, out/last.pt
    out = train(data="datasets/my_data", weights="rtdetr_r18vd_dec3_6x_coco_from_paddle.pth")  # fine-tune
    out = train(resume="runs/train/last.pt")                                                  # continue

The official recipe (facts section 5): AdamW with regex parameter groups, linear lr warmup, EMA of the
weights, gradient clipping at 0.1, optional AMP, strong augmentation and multi-scale off from `stop_epoch`.
Per step: forward, loss (float32), backward, clip, optimizer step, EMA update, warmup step. Each epoch the
EMA weights are evaluated (COCO AP); `best.pt` keeps the best, `last.pt` everything needed to resume.

Determinism: the data order is a function of (seed, epoch) (`ResumableSampler`) and every random number
generator is checkpointed, so a run interrupted and resumed from `last.pt` ends with the same weights as an
uninterrupted one (exactly, with num_workers=0).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..api import RTDETR
from ..config import ModelConfig, TrainConfig, autocast, check_overrides, config_dict, preset
from ..data.coco import BatchCollator, CocoDetection, find_split
from ..data.transforms import eval_transforms, train_transforms
from .checkpoint import atomic_save, model_checkpoint, read_checkpoint, torch_load
from .distributed import (
    Process, ResumableSampler, all_gather_objects, all_reduce_mean, cleanup_distributed, init_distributed,
    unwrap, wrap_model,
)  # fmt: skip
from .ema import ModelEMA
from .evaluate import eval_loader, evaluate_model
from .evaluator import CocoEvaluator
from .optim import LRSchedule, build_optimizer

logger = logging.getLogger(__name__)

# The tensors whose shape depends on the number of classes: re-initialised when fine-tuning on new classes.
CLASS_HEAD = re.compile(r"^decoder\.(enc_score_head|dec_score_head\.\d+|denoising_class_embed)\.")
LOGGED_TERMS = ("loss", "loss_vfl", "loss_bbox", "loss_giou")


class Trainer:
    """One training run: the model, its EMA, optimizer, lr schedule, AMP scaler, data and the step counters.

    `epoch` is the current epoch (0-based), `step` the optimizer steps done, `step_in_epoch` those of
    the current epoch. `callbacks` are called with the trainer after every optimizer step.
    """

    def __init__(
        self,
        model: RTDETR,
        config: TrainConfig,
        train_set: CocoDetection,
        val_set: CocoDetection,
        process: Process,
        callbacks: Sequence[Callable[["Trainer"], None]] = (),
    ) -> None:
        if config.amp == "fp16" and process.device.type != "cuda":
            raise ValueError("amp='fp16' needs CUDA (it trains with a GradScaler); use amp='bf16' on CPU")
        self.config, self.process, self.callbacks = config, process, list(callbacks)
        self.train_set, self.val_set = train_set, val_set
        self.output = Path(config.output)
        self.model = model.to(process.device)
        self.ema = ModelEMA(self.model, config.ema_decay, config.ema_warmups)
        # Without denoising, denoising_class_embed gets no gradient: DDP must be told.
        unused = model.config.num_denoising == 0
        self.ddp = wrap_model(self.model, process, config.sync_bn, find_unused_parameters=unused)
        self.optimizer = build_optimizer(self.model, model.config, config)
        self.schedule = LRSchedule(self.optimizer, config.warmup_steps, config.lr_milestones, config.lr_gamma)
        self.scaler = torch.amp.GradScaler(process.device.type, enabled=config.amp == "fp16")
        self.step_batch, self.accumulation = batch_plan(config, process.world_size)
        self.sampler = ResumableSampler(len(train_set), process, config.seed)
        stop_epoch = config.resolved_stop_epoch  # the dataset is given its training transforms here
        self.train_set.transforms = train_transforms(tuple(model.config.image_size), stop_epoch)
        self.loader = DataLoader(
            train_set, batch_size=self.step_batch, sampler=self.sampler, drop_last=True,
            collate_fn=BatchCollator(config.multiscale_sizes or None, stop_epoch), num_workers=config.num_workers,
            pin_memory=process.device.type == "cuda", generator=torch.Generator(),
        )  # fmt: skip
        self.steps_per_epoch = self.sampler.num_samples // self.step_batch // self.accumulation
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{train_set.ann_file} has {len(train_set)} images: fewer than one batch of {config.batch_size}"
            )
        self.val_loader = eval_loader(val_set, config.eval_batch_size, config.num_workers, process)
        self.epoch = self.step = self.step_in_epoch = 0
        self.best_ap, self.train_seconds = -1.0, 0.0
        self.log = MetricsLog(self.output / "log.jsonl") if process.is_main else None

    def fit(self) -> None:
        """Train until `epochs` (or `max_steps`), evaluating, logging and checkpointing as configured."""
        cfg = self.config
        logger.info(
            "training %s on %d images (%d steps/epoch of %d images = %d x %d x %d accumulated) -> %s",
            self.model.describe(), len(self.train_set), self.steps_per_epoch, cfg.batch_size,
            self.process.world_size, self.step_batch, self.accumulation, self.output,
        )  # fmt: skip
        while self.epoch < cfg.epochs and not self.reached_max_steps():
            losses = self.train_one_epoch()
            if self.step_in_epoch < self.steps_per_epoch:  # stopped by max_steps
                self.save_last()
                return
            last_epoch = self.epoch == cfg.epochs - 1
            metrics = self.evaluate() if last_epoch or (self.epoch + 1) % cfg.eval_interval == 0 else None
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            if metrics is not None and metrics["AP"] > self.best_ap:
                self.best_ap = metrics["AP"]
                self.save_best(metrics)
            self.save_last()
            self.log_epoch(losses, metrics)

    def train_one_epoch(self) -> dict[str, float]:
        """The current epoch's remaining steps (all, unless resumed mid-epoch); the mean of each loss term."""
        cfg = self.config
        self.ddp.train()
        self.set_epoch(self.epoch, start=self.step_in_epoch * self.accumulation * self.step_batch)
        sums: dict[str, float] = defaultdict(float)
        interval: dict[str, float] = defaultdict(float)  # since the last log line
        done_before, tic = self.step_in_epoch, time.perf_counter()
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                   unit="step", disable=not self.process.is_main)  # fmt: skip
        batches = iter(self.loader)
        while self.step_in_epoch < self.steps_per_epoch and not self.reached_max_steps():
            losses = self.train_step(batches)
            for name, value in losses.items():
                sums[name] += value
                interval[name] += value
            interval["steps"] += 1
            bar.update()
            bar.set_postfix(loss=f"{losses['loss']:.3f}", lr=f"{self.lr():.2e}")
            if self.step % cfg.log_interval == 0:
                self.log_step({k: interval[k] / interval["steps"] for k in LOGGED_TERMS})
                interval.clear()
            if cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0:
                self.save_last(elapsed=time.perf_counter() - tic)
            for callback in self.callbacks:
                callback(self)
        bar.close()
        self.train_seconds += time.perf_counter() - tic
        steps = max(self.step_in_epoch - done_before, 1)
        return all_reduce_mean({k: v / steps for k, v in sums.items()}, self.process)

    def train_step(self, batches: Iterator) -> dict[str, float]:
        """One optimizer step on `accumulation` batches from `batches`; their mean loss terms."""
        losses: dict[str, float] = defaultdict(float)
        device = self.process.device
        for micro_step in range(self.accumulation):
            images, targets = next(batches)
            images = images.to(device, non_blocking=True)
            targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            # DDP all-reduces the gradients on the last pass of an accumulated batch only.
            synced = micro_step == self.accumulation - 1 or not self.process.distributed
            with nullcontext() if synced else self.ddp.no_sync():
                terms = compute_losses(self.ddp, images, targets, self.config.amp)
                values = dict(zip(terms, torch.stack([v.detach() for v in terms.values()]).tolist()))  # one sync
                check_finite(values, self.step)
                self.scaler.scale(terms["loss"] / self.accumulation).backward()
            for name, value in values.items():
                losses[name] += value / self.accumulation
        self.optimizer_step()
        return losses

    def optimizer_step(self) -> None:
        """Clip, step, EMA update, lr warmup (official order), then count the step."""
        if self.config.clip_max_norm > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        self.schedule.step()
        self.step += 1
        self.step_in_epoch += 1

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Point the lr schedule and the data pipeline at `epoch`: sample order (from this rank's `start`-th
        sample on), augmentation policy, multi-scale policy and worker seeds."""
        self.schedule.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start)
        self.train_set.set_epoch(epoch)
        self.loader.collate_fn.set_epoch(epoch)
        self.loader.generator.manual_seed(self.config.seed * 100_003 + epoch)

    def evaluate(self) -> dict | None:
        """COCO metrics of the EMA weights on the validation set (rank 0; None elsewhere)."""
        evaluator = CocoEvaluator(self.val_set.ann_file, self.val_set.class_names)
        metrics = evaluate_model(self.ema.module, self.val_loader, evaluator, self.process, self.config.amp)
        if metrics is not None:
            logger.info("epoch %d, EMA weights, %d val images:\n%s", self.epoch + 1, len(self.val_set),
                        evaluator.table())  # fmt: skip
        return metrics

    def reached_max_steps(self) -> bool:
        return 0 < self.config.max_steps <= self.step

    def lr(self) -> float:
        return self.optimizer.param_groups[-1]["lr"]  # the default group: the base lr

    # ---- checkpoints and logs -----------------------------------------------------------------------------

    def save_last(self, elapsed: float = 0.0) -> None:
        """last.pt: model, EMA (what `RTDETR.from_checkpoint` loads), optimizer, lr schedule, scaler, counters,
        every rank's RNG states, TrainConfig and data paths. Written atomically."""
        rng = all_gather_objects(rng_state(), self.process)  # collective: every rank takes part
        if not self.process.is_main:
            return
        model = self.model
        checkpoint = model_checkpoint(
            model.config, model.state_dict(), model.class_names, model.category_ids,
            ema=self.ema.module.state_dict(), ema_updates=self.ema.updates, optimizer=self.optimizer.state_dict(),
            schedule=self.schedule.state_dict(), scaler=self.scaler.state_dict(), epoch=self.epoch, step=self.step,
            step_in_epoch=self.step_in_epoch, best_ap=self.best_ap, train_seconds=self.train_seconds + elapsed,
            rng=rng, train_config=config_dict(self.config), data=self.data_paths(),
        )  # fmt: skip
        atomic_save(checkpoint, self.output / "last.pt")

    def save_best(self, metrics: dict) -> None:
        """best.pt: the EMA weights (as `model`) with the metrics that made them best."""
        if self.process.is_main:
            model, weights = self.model, self.ema.module.state_dict()
            checkpoint = model_checkpoint(model.config, weights, model.class_names, model.category_ids,
                                          epoch=self.epoch, step=self.step, metrics=metrics)  # fmt: skip
            atomic_save(checkpoint, self.output / "best.pt")

    def load_state(self, checkpoint: dict[str, Any]) -> None:
        """Continue from a `last.pt` dict: weights, optimizer, lr schedule, scaler, counters and RNG states."""
        self.model.load_state_dict(checkpoint["model"])
        self.ema.module.load_state_dict(checkpoint["ema"])
        self.ema.updates = checkpoint["ema_updates"]
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.schedule.load_state_dict(checkpoint["schedule"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.epoch, self.step, self.step_in_epoch = checkpoint["epoch"], checkpoint["step"], checkpoint["step_in_epoch"]
        self.best_ap, self.train_seconds = checkpoint["best_ap"], checkpoint["train_seconds"]
        if len(checkpoint["rng"]) == self.process.world_size:
            set_rng_state(checkpoint["rng"][self.process.rank])
        else:
            logger.warning("resuming on %d processes, saved on %d: random streams restart from the seed",
                           self.process.world_size, len(checkpoint["rng"]))  # fmt: skip
        if self.log is not None:
            self.log.truncate(self.step)
        logger.info("resumed at epoch %d, step %d", self.epoch + 1, self.step)

    def data_paths(self) -> dict[str, str]:
        paths = {"train_ann": self.train_set.ann_file, "train_images": self.train_set.image_dir,
                 "val_ann": self.val_set.ann_file, "val_images": self.val_set.image_dir}  # fmt: skip
        return {k: str(v.resolve()) for k, v in paths.items()}

    def log_step(self, losses: dict[str, float]) -> None:
        if self.log is not None:
            self.log.write(kind="step", epoch=self.epoch, step=self.step, lr=self.lr(), **losses)

    def log_epoch(self, losses: dict[str, float], metrics: dict | None) -> None:
        """One line per epoch (the epoch just finished) with its mean losses and the metrics; redraw the curves."""
        if self.log is None:
            return
        record = {"kind": "epoch", "epoch": self.epoch - 1, "step": self.step, "lr": self.lr(),
                  "train_seconds": round(self.train_seconds, 1),
                  **{k: losses.get(k) for k in LOGGED_TERMS}}  # fmt: skip
        if metrics is not None:
            record["metrics"] = metrics
        self.log.write(**record)
        plot_curves(self.log.records(), self.output / "curves.png")


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


def compute_losses(model: nn.Module, images: Tensor, targets: list[dict[str, Tensor]], amp: str) -> dict[str, Tensor]:
    """Forward (under autocast unless amp is 'off') and the criterion (always float32) -> every loss term
    and their sum "loss". `model` is an RTDETR, possibly wrapped in DistributedDataParallel."""
    with autocast(images.device, amp):
        outputs = model(images, targets)
    return unwrap(model).criterion(outputs, targets)


def check_finite(losses: dict[str, float], step: int) -> None:
    if not math.isfinite(losses["loss"]):
        bad = [k for k, v in losses.items() if not math.isfinite(v)]
        raise FloatingPointError(
            f"loss is {losses['loss']} at step {step} ({', '.join(bad)}): training diverged; "
            "lower lr, keep clip_max_norm > 0, or use amp='bf16' instead of 'fp16'"
        )


# ---- random number generators ---------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch and CUDA generator states, in types `torch.load(weights_only=True)` reads."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(), "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }  # fmt: skip


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- building the model ---------------------------------------------------------------------------------


def build_model(
    model: RTDETR | str | None,
    weights: str | Path | None,
    class_names: list[str],
    category_ids: list[int],
    overrides: dict[str, Any],
) -> RTDETR:
    """The model to train on a dataset with these classes.

    model: a preset name, an RTDETR (its weights are the starting point) or None (the architecture of
    `weights`, else rtdetr_r18vd). weights: any checkpoint `read_checkpoint` reads, loaded into the
    model; with a different number of classes the class heads are re-initialised (`load_pretrained`).
    """
    if isinstance(model, RTDETR) and (weights or overrides):
        raise ValueError("pass either an RTDETR model or a preset name with weights/config overrides, not both")
    loaded = read_checkpoint(weights) if weights else None
    if isinstance(model, RTDETR):
        config, state, source = model.config, model.state_dict(), "the given model"
    else:
        config = preset(model) if isinstance(model, str) else (loaded.config if loaded else preset("rtdetr_r18vd"))
        state, source = (loaded.state_dict, str(weights)) if loaded else (None, "")
    new = RTDETR(config.replace(**{"num_classes": len(class_names), **overrides}), class_names, category_ids)
    if state is not None:
        load_pretrained(new, state, source)
    return new


def load_pretrained(model: RTDETR, state_dict: dict[str, Tensor], source: str) -> list[str]:
    """Load every tensor of `state_dict` into `model`; the class heads only if their shapes fit (same number
    of classes). Returns (and logs) the names of the re-initialised class-head tensors. Any other missing,
    unexpected or mis-shaped tensor raises."""
    own = model.state_dict()
    reinitialised = [k for k in own if CLASS_HEAD.match(k) and k in state_dict and state_dict[k].shape != own[k].shape]
    state_dict = {k: v for k, v in state_dict.items() if k not in reinitialised}
    unexpected = [k for k in state_dict if k not in own]
    missing = [k for k in model.load_weights(state_dict, source=source, strict=False) if k not in reinitialised]
    if missing or unexpected:
        raise ValueError(
            f"weights from {source} do not fit {model.describe()}: {len(missing)} missing ({', '.join(missing[:10])}), "
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:10])})"
        )
    if reinitialised:
        logger.info("loaded %s; re-initialised %d class-head tensors for %d classes: %s",
                    source, len(reinitialised), model.config.num_classes, ", ".join(reinitialised))  # fmt: skip
    else:
        logger.info("loaded %s (all %d tensors, class heads included)", source, len(own))
    return reinitialised


# ---- the entry point ------------------------------------------------------------------------------------


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


def resolve_data(data: str | Path | None, paths: dict[str, Any]) -> dict[str, Path]:
    """train_ann, train_images, val_ann, val_images: explicit ones win over those found in `data`."""
    found: dict[str, Any] = {}
    if data is not None:
        found["train_ann"], found["train_images"] = find_split(data, "train")
        found["val_ann"], found["val_images"] = find_split(data, "val")
    found.update({k: v for k, v in paths.items() if v is not None})
    missing = [k for k in ("train_ann", "train_images", "val_ann", "val_images") if found.get(k) is None]
    if missing:
        raise ValueError(f"no dataset: pass data=<folder> (COCO or Roboflow layout) or {', '.join(missing)}")
    return {k: Path(v) for k, v in found.items()}


def train(
    model: RTDETR | str | None = None,
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

    model: preset name (e.g. 'rtdetr_r18vd'), an RTDETR, or None (the architecture of `weights`).
    data: a dataset folder in COCO or Roboflow layout (`find_split`), or explicit train/val paths.
    weights: start from these weights (official or ours; class heads re-initialised for new classes).
    resume: continue a run from its last.pt (config, data paths and state come from it; TrainConfig
    overrides such as epochs still apply). overrides: TrainConfig and ModelConfig fields by name.
    """
    train_overrides, model_overrides = split_overrides(overrides)
    paths = {"train_ann": train_ann, "train_images": train_images, "val_ann": val_ann, "val_images": val_images}
    checkpoint = torch_load(resume) if resume else None
    if checkpoint is not None:
        if model is not None or weights is not None or model_overrides:
            raise ValueError("resume continues the saved model: do not pass a model, weights or ModelConfig fields")
        # The run continues in the folder of its last.pt unless told otherwise.
        saved = TrainConfig(**checkpoint["train_config"])
        config = saved.replace(**{"output": str(Path(resume).parent), **train_overrides})
        data_paths = resolve_data(data, {**checkpoint["data"], **{k: v for k, v in paths.items() if v}})
    else:
        data_paths = resolve_data(data, paths)
    process = init_distributed(config.device if checkpoint else train_overrides.get("device", TrainConfig.device))
    try:
        skip_bad = config.skip_bad_images if checkpoint else train_overrides.get("skip_bad_images", False)
        train_set = CocoDetection(data_paths["train_ann"], data_paths["train_images"], skip_bad_images=skip_bad)
        if checkpoint is not None:
            net = RTDETR(ModelConfig(**checkpoint["config"]), checkpoint["class_names"], checkpoint["category_ids"])
            if net.category_ids != train_set.category_ids:
                raise ValueError(f"{data_paths['train_ann']} has category ids {train_set.category_ids}, the "
                                 f"checkpoint {net.category_ids}: resume on the dataset it was trained on")  # fmt: skip
        else:
            seed_everything(train_overrides.get("seed", TrainConfig.seed))  # the same initial weights on every rank
            net = build_model(model, weights, train_set.class_names, train_set.category_ids, model_overrides)
            config = TrainConfig.for_model(net.config, **train_overrides)
        size = tuple(net.config.image_size)
        val_set = CocoDetection(data_paths["val_ann"], data_paths["val_images"], eval_transforms(size))
        seed_everything(config.seed + process.rank)  # augmentation and denoising noise differ per rank
        trainer = Trainer(net, config, train_set, val_set, process, callbacks)
        if checkpoint is not None:
            trainer.load_state(checkpoint)
        trainer.fit()
        return trainer.output
    finally:
        cleanup_distributed()


# ---- the metrics log and its curves ---------------------------------------------------------------------


class MetricsLog:
    """JSON lines: {"kind": "step", ...} every `log_interval` steps and {"kind": "epoch", ...} per epoch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def truncate(self, step: int) -> None:
        """Drop the records written after optimizer step `step` (a resumed run writes them again)."""
        kept = [r for r in self.records() if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def plot_curves(records: list[dict], path: Path) -> None:
    """Loss per logged step and per epoch, and validation AP / AP50 per epoch, to a PNG (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch" and r["loss"] is not None]
    evaluated = [r for r in records if r["kind"] == "epoch" and "metrics" in r]
    figure = Figure(figsize=(11, 4))
    FigureCanvasAgg(figure)
    loss_ax, ap_ax = figure.subplots(1, 2)
    loss_ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, alpha=0.6, label="loss (steps)")
    loss_ax.plot([r["step"] for r in epochs], [r["loss"] for r in epochs], "o-", label="loss (epoch mean)")
    loss_ax.set(xlabel="optimizer step", ylabel="training loss", yscale="log", title="loss")
    for key in ("AP", "AP50"):
        ap_ax.plot([r["epoch"] + 1 for r in evaluated], [r["metrics"][key] for r in evaluated], "o-", label=key)
    ap_ax.set(xlabel="epoch", ylabel="COCO metric (EMA weights)", ylim=(0, 1), title="validation")
    for ax in (loss_ax, ap_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
