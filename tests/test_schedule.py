"""The time budget (steps that fit, re-estimation, stopping on time, resuming), the positions derived from a
run length, and early stopping. Every expectation is computed by hand in the comments."""

import json

import pytest
import torch
from torch import nn

from rtdetr.config import TrainConfig
from rtdetr.engine.optim import LRSchedule
from rtdetr.engine.schedule import (
    EarlyStopping, TimeBudget, guess_eval_seconds, pending_evaluations, plan_run, steps_that_fit,
)  # fmt: skip


def test_pending_evaluations_counts_the_periodic_ones_still_due():
    assert pending_evaluations(0, 1750, 125) == 13  # 125 ... 1625; the one at 1750 is the final one
    assert pending_evaluations(125, 1750, 125) == 13  # asked after step 125, before its evaluation
    assert pending_evaluations(126, 1750, 125) == 12
    assert pending_evaluations(0, 1000, 100) == 9  # 100 ... 900
    assert pending_evaluations(0, 1001, 100) == 10
    assert pending_evaluations(500, 500, 100) == 0
    assert pending_evaluations(0, 1000, 0) == 0


def test_steps_that_fit_a_budget_with_its_evaluations():
    # 600 s, 0.5 s per step, 10 s per evaluation every 100 steps: 1000 steps (500 s) + 9 evaluations (90 s)
    # = 590 s; 1001 steps would make the evaluation at 1000 periodic: 500.5 + 100 = 600.5 > 600.
    assert steps_that_fit(600.0, 0, 0.5, 10.0, 100) == 1000
    assert steps_that_fit(600.0, 0, 0.5, 0.0, 100) == 1200
    assert steps_that_fit(600.0, 0, 0.5, 10.0, 100, max_total=800) == 800
    # From step 400 with 300 s left: up to 900 costs 500 * 0.5 + 5 evaluations (400 ... 800) = 300 s.
    assert steps_that_fit(300.0, 400, 0.5, 10.0, 100) == 900
    assert steps_that_fit(-5.0, 400, 0.5, 10.0, 100) == 400
    with pytest.raises(ValueError, match="seconds_per_step"):
        steps_that_fit(600.0, 0, 0.0, 10.0, 100)


def test_plan_run_positions():
    config = TrainConfig(warmup_steps=30, ema_warmups=40, lr_schedule="flat-cosine", flat_fraction=0.5, stop_epoch=-1,
                         eval_interval=2)  # fmt: skip
    plan = plan_run(config, total_steps=1050, steps_per_epoch=100)
    assert plan.epochs == 11  # the last one has 50 steps
    assert (plan.warmup_steps, plan.ema_warmups, plan.cosine_start) == (30, 40, 525)
    assert (plan.stop_epoch, plan.stop_step) == (10, 1000)
    assert plan.evaluation_steps == (200, 400, 600, 800, 1000, 1050)
    constant = plan_run(config.replace(lr_schedule="constant", stop_epoch=0), 1050, 100)
    assert constant.cosine_start is None and constant.stop_step == 0


def test_re_estimated_step_time_moves_the_total_and_keeps_the_lr_continuous():
    budget = TimeBudget(minutes=10, seconds_per_step=0.5, eval_seconds=10.0, eval_every=100)
    assert budget.planned_total(0.0, 0) == 1000
    # Steps really take 0.6 s: the estimate moves 10% of the way each step, 0.6 - 0.1 * 0.9**k after k.
    for _ in range(100):
        budget.observe_step(0.6)
    assert budget.seconds_per_step == pytest.approx(0.6 - 0.1 * 0.9**100, rel=1e-9)
    assert budget.train_seconds == pytest.approx(60.0)
    # After step 100 at 60 s (its evaluation pending): 766 more steps = 459.6 s and 8 evaluations
    # (100 ... 800) = 80 s fit the 540 s left, 767 would not (540.2 s).
    assert budget.planned_total(60.0, 100) == 866
    schedule = LRSchedule(
        torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3), 10, shape="flat-cosine", total_steps=1000
    )
    for _ in range(100):
        schedule.step()
    before = schedule.optimizer.param_groups[0]["lr"]
    schedule.set_total_steps(budget.planned_total(60.0, 100))
    assert schedule.optimizer.param_groups[0]["lr"] == before
    assert schedule.cosine_start == 433  # round(0.5 * 866)


def test_observations_clip_outliers_and_evaluations_average():
    budget = TimeBudget(minutes=1, seconds_per_step=0.5, eval_seconds=99.0, eval_every=10)
    budget.observe_step(10.0)  # a worker start-up: counted in full, the estimate moves as for 2 x 0.5
    assert budget.seconds_per_step == pytest.approx(0.55)
    assert budget.train_seconds == 10.0
    budget.observe_evaluation(4.0)  # the first measured evaluation replaces the guess
    assert budget.eval_seconds == 4.0
    budget.observe_evaluation(6.0)
    assert budget.eval_seconds == 5.0
    assert budget.spent_seconds == 20.0
    assert guess_eval_seconds(100, 16, 0.333) == pytest.approx(3.33)  # the demo measured 3.4 s


def run_clock(budget: TimeBudget, step_seconds, eval_seconds: float, step: int = 0, clock: float = 0.0, until: int = 0):
    """Train on a scripted clock (ask after each step, evaluate every `eval_every` steps) until the budget
    says stop, or until step `until` (an interruption); returns (the last step, the clock then)."""
    durations = iter(step_seconds)
    while True:
        seconds = next(durations)
        step, clock = step + 1, clock + seconds
        budget.observe_step(seconds)
        if budget.should_stop(clock, step):
            return step, clock
        if budget.eval_every and step % budget.eval_every == 0:
            clock += eval_seconds
            budget.observe_evaluation(eval_seconds)
        if step == until:
            return step, clock


def test_should_stop_ends_the_run_on_time():
    # 60 s, 2 s steps, 5 s evaluations every 10 steps: 25 steps (50 s) + evaluations at 10 and 20 (10 s).
    budget = TimeBudget(minutes=1, seconds_per_step=2.0, eval_seconds=5.0, eval_every=10)
    assert budget.planned_total(0.0, 0) == 25
    assert run_clock(budget, [2.0] * 100, 5.0) == (25, 60.0)
    # After step 24 (58 s) one more step fits; after step 20 (45 s) the evaluation at 20 still does.
    fresh = TimeBudget(minutes=1, seconds_per_step=2.0, eval_seconds=5.0, eval_every=10)
    assert not fresh.should_stop(58.0, 24) and not fresh.should_stop(45.0, 20)
    assert fresh.should_stop(59.0, 24)  # 2 s do not fit in 1


def test_should_stop_on_a_noisy_clock_overruns_by_at_most_one_step():
    budget = TimeBudget(minutes=1, seconds_per_step=1.0, eval_seconds=0.0, eval_every=0)
    step, clock = run_clock(budget, [1.5, 2.5] * 100, 0.0)
    assert 60.0 - 2.5 <= clock <= 60.0 + 2.5
    assert budget.planned_total(clock, step) == step


def test_budget_state_round_trip_resumes_the_accounting():
    def budget() -> TimeBudget:
        return TimeBudget(minutes=1, seconds_per_step=2.0, eval_seconds=5.0, eval_every=10)

    assert run_clock(budget(), [2.0] * 100, 5.0) == (25, 60.0)
    interrupted = budget()
    step, clock = run_clock(interrupted, [2.0] * 100, 5.0, until=12)
    assert (step, clock) == (12, 29.0)  # 12 steps and the evaluation at 10
    state = json.loads(json.dumps(interrupted.state_dict()))  # plain types
    resumed = TimeBudget.from_state_dict(state)
    assert resumed.state_dict() == interrupted.state_dict()
    assert resumed.spent_seconds == 29.0  # the resumed run's clock starts here
    assert run_clock(resumed, [2.0] * 100, 5.0, step=step, clock=resumed.spent_seconds) == (25, 60.0)


def early_stopping_run(stopper: EarlyStopping, metrics: list[float]) -> tuple[int | None, list[bool]]:
    """(the 0-based evaluation after which it stops, or None; which evaluations were new bests)."""
    bests = []
    for index, metric in enumerate(metrics):
        bests.append(stopper.update(metric))
        if stopper.should_stop:
            return index, bests
    return None, bests


def test_early_stopping_with_ties():
    # 0.35 at evaluation 1, then a tie and a drop: two evaluations without improvement -> stop after 3.
    stopper = EarlyStopping(patience=2)
    stop, bests = early_stopping_run(stopper, [0.30, 0.35, 0.35, 0.34, 0.40])
    assert stop == 3
    assert bests == [True, True, False, False]  # a tie is not a new best: best.pt keeps the first
    assert (stopper.best, stopper.best_evaluation) == (0.35, 1)


def test_early_stopping_min_delta_measures_gains_from_the_last_improvement():
    # min_delta 0.02: 0.31 is no improvement on 0.30, 0.325 is (0.025 above the reference); then 0.33,
    # 0.335 and 0.34 stay within 0.02 of 0.325: the third of them stops the run. Each is still a new best.
    stopper = EarlyStopping(patience=3, min_delta=0.02)
    stop, bests = early_stopping_run(stopper, [0.30, 0.31, 0.325, 0.33, 0.335, 0.34, 0.5])
    assert stop == 5
    assert bests == [True] * 6
    assert (stopper.best_evaluation, stopper.last_improvement, stopper.reference) == (5, 2, 0.325)


def test_early_stopping_off_and_state_round_trip():
    assert early_stopping_run(EarlyStopping(patience=0), [0.5, 0.4, 0.3, 0.2, 0.1])[0] is None
    metrics = [0.2, 0.25, 0.24, 0.255, 0.259, 0.2]
    full = EarlyStopping(patience=3, min_delta=0.01)
    expected = early_stopping_run(full, metrics)
    assert expected == (4, [True, True, False, True, True])  # 0.24, 0.255, 0.259: within 0.01 of 0.25
    interrupted = EarlyStopping(patience=3, min_delta=0.01)
    early_stopping_run(interrupted, metrics[:3])
    resumed = EarlyStopping(patience=5)  # whatever it was built with, the state decides
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    stop, bests = early_stopping_run(resumed, metrics[3:])
    assert (stop + 3, [True, True, False] + bests) == expected
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=-1)
