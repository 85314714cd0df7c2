"""How long a run is: the optimizer steps that fit a time budget, the positions derived from a run length, and
early stopping on the validation AP.

    budget = TimeBudget(minutes=10, seconds_per_step=0.34, eval_seconds=3.4, eval_every=250)
    budget.planned_total(elapsed_seconds=0.0, step=0)  # 1704: 1704 * 0.34 + 6 evaluations * 3.4 = 599.76 s
    ... after every optimizer step: budget.observe_step(seconds); stop if budget.should_stop(elapsed, step)

Accounting: the budget covers training and the periodic evaluations; only the final evaluation (and writing
the last checkpoint) may follow it. `should_stop` and `planned_total` are asked right after optimizer step
`step`, before the evaluation that may be due at that step, so a periodic evaluation at `step` still counts
as pending. Every number in the state is a plain int or float (checkpoints, JSON).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import TrainConfig
from .optim import LRSchedule


def pending_evaluations(step: int, total_steps: int, eval_every: int) -> int:
    """Periodic evaluations still due in a run of `total_steps` after optimizer step `step`: those at the
    multiples of `eval_every` in [max(step, 1), total_steps). The one at `total_steps` is the final one."""
    if eval_every <= 0 or total_steps <= step:
        return 0
    return (total_steps - 1) // eval_every - (max(step, 1) - 1) // eval_every


def steps_that_fit(
    seconds_left: float, step: int, seconds_per_step: float, eval_seconds: float, eval_every: int, max_total: int = 0
) -> int:
    """The largest total N >= `step` whose remaining steps and pending periodic evaluations fit:
    (N - step) * seconds_per_step + pending_evaluations(step, N, eval_every) * eval_seconds <= seconds_left,
    capped at `max_total` (0: no cap). The cost grows with N, so a binary search over N is exact."""
    if seconds_per_step <= 0:
        raise ValueError(f"seconds_per_step must be > 0, got {seconds_per_step}")
    low, high = 0, max(int(seconds_left // seconds_per_step), 0)  # evaluations can only lower the count
    if max_total:
        high = max(min(high, max_total - step), 0)
    while low < high:
        n = (low + high + 1) // 2
        cost = n * seconds_per_step + pending_evaluations(step, step + n, eval_every) * eval_seconds
        low, high = (n, high) if cost <= seconds_left else (low, n - 1)
    return step + low


def guess_eval_seconds(val_images: int, batch_size: int, seconds_per_step: float) -> float:
    """A prior for one evaluation before any was timed: 1.6x the training seconds per image, times the
    validation images. From the demo's recorded times (2 CPU cores, 160 px): 7 evaluations of 100 images in
    0.4 min, 3.4 s each (forward, post-processing, COCO metrics, loader start-up), against 9.7 min for 1750
    training steps of 16 images, 0.333 s each."""
    return 1.6 * val_images * seconds_per_step / batch_size


class TimeBudget:
    """The steps of a run that must end within `minutes`, re-estimated from the measured step and
    evaluation times.

    seconds_per_step: the estimate before any step was observed (e.g. timed on a few probe steps); each
    observed step then moves it by `smoothing` of the difference, the observation clipped to [1/2, 2] x the
    estimate so that a slow outlier (worker start-up, a checkpoint write) moves it by at most `smoothing` x
    the estimate (the full seconds still count as spent).
    eval_seconds: the estimate of one evaluation (e.g. `guess_eval_seconds`) until one was observed; then the
    mean of the observed ones. eval_every: optimizer steps between periodic evaluations (0: none).
    max_steps: a cap on the total (the epochs the user asked for; 0: none).
    """

    def __init__(
        self,
        minutes: float,
        seconds_per_step: float,
        eval_seconds: float,
        eval_every: int,
        max_steps: int = 0,
        smoothing: float = 0.1,
    ) -> None:
        if minutes <= 0 or seconds_per_step <= 0 or eval_seconds < 0:
            raise ValueError(
                f"TimeBudget needs minutes > 0, seconds_per_step > 0 and eval_seconds >= 0; got {minutes}, "
                f"{seconds_per_step}, {eval_seconds}"
            )
        self.budget_seconds = 60.0 * minutes
        self.seconds_per_step, self.eval_seconds = float(seconds_per_step), float(eval_seconds)
        self.eval_every, self.max_steps, self.smoothing = eval_every, max_steps, smoothing
        self.train_seconds = self.evaluation_seconds = 0.0  # spent so far, over every session of the run
        self.steps_timed = self.evaluations_timed = 0

    @property
    def spent_seconds(self) -> float:
        """Seconds observed so far (steps and evaluations): the run's clock when every second is observed."""
        return self.train_seconds + self.evaluation_seconds

    def observe_step(self, seconds: float) -> None:
        """One optimizer step took `seconds` (wall clock since the previous step or evaluation ended)."""
        clipped = min(max(seconds, self.seconds_per_step / 2), 2 * self.seconds_per_step)
        self.seconds_per_step += self.smoothing * (clipped - self.seconds_per_step)
        self.train_seconds += seconds
        self.steps_timed += 1

    def observe_evaluation(self, seconds: float) -> None:
        """One evaluation took `seconds`."""
        self.evaluation_seconds += seconds
        self.evaluations_timed += 1
        self.eval_seconds = self.evaluation_seconds / self.evaluations_timed

    def planned_total(self, elapsed_seconds: float, step: int) -> int:
        """The optimizer steps the whole run will have at the current estimates (>= `step`)."""
        seconds_left = self.budget_seconds - elapsed_seconds
        return steps_that_fit(
            seconds_left, step, self.seconds_per_step, self.eval_seconds, self.eval_every, self.max_steps
        )

    def should_stop(self, elapsed_seconds: float, step: int) -> bool:
        """True once not even one more step (with the evaluation due before it) fits: the run ends at most
        one step early, and late only by the error of the estimates."""
        return self.planned_total(elapsed_seconds, step) <= step

    def state_dict(self) -> dict:
        return {"budget_seconds": self.budget_seconds, "seconds_per_step": self.seconds_per_step,
                "eval_seconds": self.eval_seconds, "eval_every": self.eval_every, "max_steps": self.max_steps,
                "smoothing": self.smoothing, "train_seconds": self.train_seconds,
                "evaluation_seconds": self.evaluation_seconds, "steps_timed": self.steps_timed,
                "evaluations_timed": self.evaluations_timed}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        for name in self.state_dict():
            setattr(self, name, state[name])

    @classmethod
    def from_state_dict(cls, state: dict) -> "TimeBudget":
        """The budget of a resumed run, with the time it has already spent."""
        budget = cls(state["budget_seconds"] / 60.0, state["seconds_per_step"], state["eval_seconds"],
                     state["eval_every"])  # fmt: skip
        budget.load_state_dict(state)
        return budget


@dataclass(frozen=True)
class RunPlan:
    """Where things happen in a run of `total_steps` optimizer steps (all positions are optimizer steps
    except the epochs): the lr warmup and EMA warmup lengths, the first step of the cosine decay (None for
    a constant lr), the first epoch (and its first step) without strong augmentation and multi-scale, and
    the steps after which the EMA weights are evaluated (the last one is the final evaluation)."""

    total_steps: int
    epochs: int
    warmup_steps: int
    ema_warmups: int
    cosine_start: int | None
    stop_epoch: int
    stop_step: int
    evaluation_steps: tuple[int, ...]


def plan_run(config: TrainConfig, total_steps: int, steps_per_epoch: int) -> RunPlan:
    """The positions of a run of `total_steps` steps (the last epoch may be partial) under `config`.
    A negative `stop_epoch` counts from the end of the `ceil(total_steps / steps_per_epoch)` epochs."""
    epochs = math.ceil(total_steps / steps_per_epoch)
    stop_epoch = config.stop_epoch if config.stop_epoch >= 0 else max(epochs + config.stop_epoch, 0)
    cosine_start = None
    if config.lr_schedule == "flat-cosine":
        cosine_start = LRSchedule.flat_steps(total_steps, config.flat_fraction)
    eval_every = config.eval_interval * steps_per_epoch
    periodic = tuple(range(eval_every, total_steps, eval_every))
    return RunPlan(
        total_steps, epochs, config.warmup_steps, config.ema_warmups, cosine_start, stop_epoch,
        stop_epoch * steps_per_epoch, (*periodic, total_steps),
    )  # fmt: skip


class EarlyStopping:
    """Stop after `patience` evaluations in a row without an improvement (0: never).

    An evaluation improves when its metric exceeds the reference (the metric of the last improvement) by
    more than `min_delta`; the first evaluation always does. Gains are measured against the reference, not
    the previous evaluation, so gains creeping up by less than `min_delta` each still reset the patience
    once they add up to more. `best_evaluation` (0-based) is the evaluation with the highest metric, the
    first of equal ones: the one `best.pt` keeps (a rise of at most `min_delta` is a new best, though not an
    improvement).
    """

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        if patience < 0 or min_delta < 0:
            raise ValueError(f"EarlyStopping needs patience >= 0 and min_delta >= 0, got {patience}, {min_delta}")
        self.patience, self.min_delta = patience, min_delta
        self.evaluations = 0
        self.best: float | None = None
        self.best_evaluation = -1
        self.reference: float | None = None
        self.last_improvement = -1

    def update(self, metric: float) -> bool:
        """Record the next evaluation's metric; True when it is the best so far (save it)."""
        index = self.evaluations
        self.evaluations += 1
        if self.reference is None or metric > self.reference + self.min_delta:
            self.reference, self.last_improvement = metric, index
        if self.best is None or metric > self.best:
            self.best, self.best_evaluation = metric, index
            return True
        return False

    @property
    def should_stop(self) -> bool:
        """True once the last `patience` evaluations brought no improvement."""
        return self.patience > 0 and self.evaluations - 1 - self.last_improvement >= self.patience

    def state_dict(self) -> dict:
        return {"patience": self.patience, "min_delta": self.min_delta, "evaluations": self.evaluations,
                "best": self.best, "best_evaluation": self.best_evaluation, "reference": self.reference,
                "last_improvement": self.last_improvement}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        for name in self.state_dict():
            setattr(self, name, state[name])
