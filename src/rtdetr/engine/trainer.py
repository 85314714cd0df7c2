"""The training loop: `Trainer(network, config, train_set, val_set, process).fit()`.

The official recipe: AdamW with regex parameter groups, linear lr warmup, EMA of the weights, gradient
clipping at 0.1, optional AMP, strong augmentation and multi-scale off from `stop_epoch`. Per step: forward,
loss (float32), backward, clip, optimizer step, EMA update, warmup step. Each epoch the EMA weights are
evaluated (COCO AP); `best.pt` keeps the best, `last.pt` everything needed to resume.

Determinism: the data order is a function of (seed, epoch) (`ResumableSampler`) and every random number
generator is checkpointed, so a run interrupted and resumed from `last.pt` ends with the same weights as an
uninterrupted one (exactly, with num_workers=0). Runs start from `engine.run.train`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import TrainConfig, autocast, config_dict
from ..data.coco import BatchCollator, CocoDetection
from ..data.transforms import eval_transforms, train_transforms
from ..loss.criterion import RTDETRCriterion
from ..models.rtdetr import RTDETRModel
from ..weights.checkpoint import atomic_save, model_checkpoint
from .distributed import Rank, ResumableSampler, all_gather_objects, all_reduce_mean, wrap_model
from .ema import ModelEMA
from .evaluation import eval_loader, evaluate_model
from .evaluator import CocoEvaluator
from .metrics_log import MetricsLog, plot_curves
from .loaders import batch_plan, loader_workers, steps_per_epoch
from .optim import LRSchedule, build_optimizer
from .rng import rng_state, set_rng_state
from .schedule import EarlyStopping, TimeBudget

logger = logging.getLogger(__name__)

LOGGED_TERMS = ("loss", "loss_vfl", "loss_bbox", "loss_giou")


class Trainer:
    """One training run: the network, its criterion and EMA, optimizer, lr schedule, AMP scaler, data and the
    step counters. The network predicts the train set's classes (label i is `train_set.category_ids[i]`);
    the trainer gives both datasets their transforms.

    `epoch` is the current epoch (0-based), `step` the optimizer steps done, `step_in_epoch` those of
    the current epoch. `callbacks` are called with the trainer after every optimizer step.
    """

    def __init__(
        self,
        model: RTDETRModel,
        config: TrainConfig,
        train_set: CocoDetection,
        val_set: CocoDetection,
        process: Rank,
        callbacks: Sequence[Callable[["Trainer"], None]] = (),
        budget: TimeBudget | None = None,
        recipe: dict[str, Any] | None = None,
        data_record: dict[str, Any] | None = None,
    ) -> None:
        if config.amp == "fp16" and process.device.type != "cuda":
            raise ValueError("amp='fp16' needs CUDA (it trains with a GradScaler); use amp='bf16' on CPU")
        self.config, self.process, self.callbacks = config, process, list(callbacks)
        self.train_set, self.val_set = train_set, val_set
        self.output = Path(config.output)
        self.model = model.to(process.device)
        # Channels-last on CPU: oneDNN's convolutions (backward too) run faster NHWC. rtdetr_tiny, batch 16, AMD EPYC
        # Zen 3 (AVX2): 0.913 -> 0.798 s per step at 320 px, 0.310 -> 0.292 s at 160 px (medians, interleaved).
        self.memory_format = torch.channels_last if process.device.type == "cpu" else torch.preserve_format
        self.model.to(memory_format=self.memory_format)
        self.criterion = RTDETRCriterion(model.config.num_classes, boxes_weight_format=config.boxes_weight_format,
                                         share_matched_indices=config.share_matched_indices)
        self.class_names, self.category_ids = train_set.class_names, train_set.category_ids
        self.ema = ModelEMA(self.model, config.ema_decay, config.ema_warmups)
        # Without denoising, denoising_class_embed gets no gradient: DDP must be told.
        unused = model.config.num_denoising == 0
        self.ddp = wrap_model(self.model, process, config.sync_bn, find_unused_parameters=unused)
        self.step_batch, self.accumulation = batch_plan(config, process.world_size)
        self.loader = self.train_loader()
        self.steps_per_epoch = steps_per_epoch(len(train_set), config, process.world_size, train_set.ann_file)
        self.budget, self.recipe, self.data_record = budget, recipe or {}, data_record or {}
        self.epoch = self.step = self.step_in_epoch = 0
        self.optimizer = build_optimizer(self.model, model.config, config)
        self.schedule = LRSchedule(
            self.optimizer, config.warmup_steps, config.lr_milestones, config.lr_gamma, shape=config.lr_schedule,
            total_steps=self.planned_steps(), flat_fraction=config.flat_fraction, min_lr_ratio=config.min_lr_ratio,
        )  # fmt: skip
        self.scaler = torch.amp.GradScaler(process.device.type, enabled=config.amp == "fp16")
        self.early_stopping = EarlyStopping(config.patience, config.min_delta)
        self.val_set.transforms = eval_transforms(tuple(model.config.image_size))
        self.val_loader = eval_loader(val_set, config.eval_batch_size, self.num_workers(), process)
        self.best_ap, self.best_epoch, self.train_seconds = -1.0, 0, 0.0  # best_epoch: 1-based
        self.stop_reason = ""
        self.clock = time.perf_counter()  # when the last step or evaluation ended (the budget's clock)
        self.log = MetricsLog(self.output / "log.jsonl") if process.is_main else None

    def train_loader(self) -> DataLoader:
        """The training loader; the dataset is given its training transforms here (strong augmentation and
        multi-scale until the stop epoch)."""
        cfg, stop_epoch = self.config, self.config.resolved_stop_epoch
        self.train_set.transforms = train_transforms(tuple(self.model.config.image_size), stop_epoch)
        return DataLoader(
            self.train_set, batch_size=self.step_batch, sampler=ResumableSampler(len(self.train_set), self.process,
            cfg.seed), drop_last=True, collate_fn=BatchCollator(cfg.multiscale_sizes or None, stop_epoch),
            num_workers=self.num_workers(), pin_memory=self.process.device.type == "cuda", generator=torch.Generator(),
        )  # fmt: skip

    def num_workers(self) -> int:
        if self.config.num_workers >= 0:
            return self.config.num_workers
        augmenting = self.config.resolved_stop_epoch > 0 or bool(self.config.multiscale_sizes)
        return loader_workers(self.process.device.type, os.cpu_count() or 1, augmenting)[0]

    @property
    def sampler(self) -> ResumableSampler:
        return self.loader.sampler

    @property
    def epochs(self) -> int:
        """The run's epochs: the config's, or with a time budget those its planned steps need (the last may be
        cut short when the time is up)."""
        return math.ceil(self.planned_steps() / self.steps_per_epoch) if self.budget else self.config.epochs

    def planned_steps(self) -> int:
        """The optimizer steps the run will have: epochs x steps per epoch (capped by max_steps), or with a
        time budget its current estimate."""
        if self.budget is not None:
            return max(self.budget.planned_total(self.budget.spent_seconds, self.step), 1)
        total = self.config.epochs * self.steps_per_epoch
        return min(total, self.config.max_steps) if self.config.max_steps else total

    def fit(self) -> None:
        """Train until the epochs, the time budget, max_steps or early stopping end the run; evaluate, log and
        checkpoint as configured. A run ended by time or early stopping gets its final evaluation."""
        logger.info(
            "training %s on %d images (%d steps/epoch of %d images = %d x %d x %d accumulated) -> %s",
            self.model.describe(), len(self.train_set), self.steps_per_epoch, self.config.batch_size,
            self.process.world_size, self.step_batch, self.accumulation, self.output,
        )  # fmt: skip
        self.clock = time.perf_counter()
        # With a time budget only the budget ends the run (its epochs are an estimate, which may differ per rank).
        while (self.budget is not None or self.epoch < self.epochs) and not self.reached_max_steps():
            losses = self.train_one_epoch()
            out_of_time = self.out_of_time()
            if self.step_in_epoch < self.steps_per_epoch and not out_of_time:  # stopped by max_steps
                self.save_last()
                return
            last = out_of_time or (self.budget is None and self.epoch == self.epochs - 1)
            metrics = self.evaluate() if last or (self.epoch + 1) % self.config.eval_interval == 0 else None
            if self.step_in_epoch == self.steps_per_epoch:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
            if metrics is not None and self.early_stopping.update(metrics["AP"]):
                self.best_ap, self.best_epoch = metrics["AP"], self.epoch + (self.step_in_epoch > 0)
                self.save_best(metrics)
            self.save_last()
            self.log_epoch(losses, metrics)
            if out_of_time:
                return self.report_end("time budget spent")
            if self.any_rank(self.early_stopping.should_stop):  # only rank 0 has the metrics
                return self.report_end(f"early stop: no AP gain in {self.config.patience} evaluations")
            self.replan()
        self.report_end("all epochs done")

    def replan(self) -> None:
        """With a time budget, after each epoch: move the end of the lr decay to the re-estimated total, and
        the strong-augmentation stop epoch with the epochs (only while it is still ahead)."""
        if self.budget is None:
            return
        total = all_gather_objects(self.planned_steps(), self.process)[0]  # rank 0's: one schedule for all ranks
        self.schedule.set_total_steps(total)
        if self.config.stop_epoch < 0:
            stop_epoch = max(math.ceil(total / self.steps_per_epoch) + self.config.stop_epoch, 0)
            if stop_epoch > self.epoch and stop_epoch != self.loader.collate_fn.stop_epoch:
                self.train_set.transforms.stop_epoch = self.loader.collate_fn.stop_epoch = stop_epoch

    def out_of_time(self) -> bool:
        """The time budget allows no further step (the same answer on every rank: each measures its own time)."""
        return self.budget is not None and self.any_rank(self.budget.should_stop(self.budget.spent_seconds, self.step))

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any."""
        if not self.process.distributed:
            return flag
        return all_reduce_mean({"flag": float(flag)}, self.process)["flag"] > 0

    def report_end(self, why: str) -> None:
        """The final line: why the run ended, the best AP, at which epoch, where the weights are."""
        self.stop_reason = why
        if self.process.is_main:
            logger.info("finished (%s) after %d steps, %.1f min of training: best AP %.4f at epoch %d -> %s",
                        why, self.step, self.train_seconds / 60, self.best_ap, self.best_epoch, self.output / "best.pt")  # fmt: skip

    def train_one_epoch(self) -> dict[str, float]:
        """The current epoch's remaining steps (all, unless resumed mid-epoch); the mean of each loss term."""
        cfg = self.config
        self.ddp.train()
        self.set_epoch(self.epoch, start=self.step_in_epoch * self.accumulation * self.step_batch)
        sums: dict[str, float] = defaultdict(float)
        interval: dict[str, float] = defaultdict(float)  # since the last log line
        done_before, tic = self.step_in_epoch, time.perf_counter()
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{self.epochs}",
                   unit="step", disable=not self.process.is_main)  # fmt: skip
        batches = iter(self.loader)
        while self.step_in_epoch < self.steps_per_epoch and not self.reached_max_steps() and not self.out_of_time():
            losses = self.train_step(batches)
            self.observe_step()
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
            images = images.to(device, non_blocking=True, memory_format=self.memory_format)
            targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            # DDP all-reduces the gradients on the last pass of an accumulated batch only.
            synced = micro_step == self.accumulation - 1 or not self.process.distributed
            with nullcontext() if synced else self.ddp.no_sync():
                terms = compute_losses(self.ddp, self.criterion, images, targets, self.config.amp)
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

    def observe_step(self) -> None:
        """Charge the wall time since the last step or evaluation ended (checkpoint writes and loader start-up
        included) to the time budget."""
        now = time.perf_counter()
        if self.budget is not None:
            self.budget.observe_step(now - self.clock)
        self.clock = now

    def evaluate(self) -> dict | None:
        """COCO metrics of the EMA weights on the validation set (rank 0; None elsewhere)."""
        tic = time.perf_counter()
        evaluator = CocoEvaluator(self.val_set.coco, self.val_set.class_names)
        metrics = evaluate_model(self.ema.module, self.val_loader, evaluator, self.category_ids, self.class_names,
                                 self.process, self.config.amp)  # fmt: skip
        if metrics is not None:
            logger.info("epoch %d, EMA weights, %d val images:\n%s", self.epoch + 1, len(self.val_set),
                        evaluator.table())  # fmt: skip
        self.clock = time.perf_counter()
        if self.budget is not None:
            self.budget.observe_evaluation(self.clock - tic)
        return metrics

    def reached_max_steps(self) -> bool:
        return 0 < self.config.max_steps <= self.step

    def lr(self) -> float:
        return self.optimizer.param_groups[-1]["lr"]  # the default group: the base lr

    def save_last(self, elapsed: float = 0.0) -> None:
        """last.pt: model, EMA (what `RTDETR.from_checkpoint` loads), optimizer, lr schedule, scaler, counters,
        every rank's RNG states, TrainConfig, the recipe's reasons, the time budget's accounting, early stopping
        and where the data is. Written atomically."""
        rng = all_gather_objects(rng_state(), self.process)  # collective: every rank takes part
        if not self.process.is_main:
            return
        model = self.model
        checkpoint = model_checkpoint(
            model.config, model.state_dict(), self.class_names, self.category_ids,
            ema=self.ema.module.state_dict(), ema_updates=self.ema.updates, optimizer=self.optimizer.state_dict(),
            schedule=self.schedule.state_dict(), scaler=self.scaler.state_dict(), epoch=self.epoch, step=self.step,
            step_in_epoch=self.step_in_epoch, best_ap=self.best_ap, best_epoch=self.best_epoch,
            train_seconds=self.train_seconds + elapsed, rng=rng, train_config=config_dict(self.config),
            recipe=self.recipe, budget=self.budget.state_dict() if self.budget else None,
            early_stopping=self.early_stopping.state_dict(), data=self.data_record,
        )  # fmt: skip
        atomic_save(checkpoint, self.output / "last.pt")

    def save_best(self, metrics: dict) -> None:
        """best.pt: the EMA weights (as `model`) with the metrics that made them best."""
        if self.process.is_main:
            model, weights = self.model, self.ema.module.state_dict()
            checkpoint = model_checkpoint(model.config, weights, self.class_names, self.category_ids,
                                          epoch=self.best_epoch, step=self.step, metrics=metrics,
                                          train_config=config_dict(self.config), recipe=self.recipe)  # fmt: skip
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
        self.best_epoch = checkpoint.get("best_epoch", self.epoch)
        if checkpoint.get("early_stopping"):
            self.early_stopping.load_state_dict(checkpoint["early_stopping"])
        if len(checkpoint["rng"]) == self.process.world_size:
            set_rng_state(checkpoint["rng"][self.process.rank])
        else:
            logger.warning("resuming on %d processes, saved on %d: random streams restart from the seed",
                           self.process.world_size, len(checkpoint["rng"]))  # fmt: skip
        if self.log is not None:
            self.log.truncate(self.step)
        logger.info("resumed at epoch %d, step %d", self.epoch + 1, self.step)

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


def compute_losses(
    model: nn.Module, criterion: RTDETRCriterion, images: Tensor, targets: list[dict[str, Tensor]], amp: str
) -> dict[str, Tensor]:
    """Forward (under autocast unless amp is 'off') and the criterion (always float32) -> every loss term
    and their sum "loss". `model` is the network, possibly wrapped in DistributedDataParallel."""
    with autocast(images.device, amp):
        outputs = model(images, targets)
    return criterion(outputs, targets)


def check_finite(losses: dict[str, float], step: int) -> None:
    if not math.isfinite(losses["loss"]):
        bad = [k for k, v in losses.items() if not math.isfinite(v)]
        raise FloatingPointError(
            f"loss is {losses['loss']} at step {step} ({', '.join(bad)}): training diverged; "
            "lower lr, keep clip_max_norm > 0, or use amp='bf16' instead of 'fp16'"
        )
