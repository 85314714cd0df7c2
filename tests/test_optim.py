"""LRSchedule: the flat-cosine decay by optimizer step, its re-estimated total and resuming."""

import json
import math

import pytest
import torch
from torch import nn

from rtdetr.engine.optim import LRSchedule

BASE_LRS = (1e-3, 1e-4)


def adamw() -> torch.optim.AdamW:
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    return torch.optim.AdamW([{"params": params[:1], "lr": BASE_LRS[0]}, {"params": params[1:], "lr": BASE_LRS[1]}])


def factors(schedule: LRSchedule, steps: int) -> list[float]:
    """The lr factor of the next `steps` optimizer steps (read from the groups, then stepped)."""
    seen = []
    for _ in range(steps):
        lrs = [g["lr"] for g in schedule.optimizer.param_groups]
        assert lrs[1] / BASE_LRS[1] == pytest.approx(lrs[0] / BASE_LRS[0], rel=1e-12)  # every group alike
        seen.append(lrs[0] / BASE_LRS[0])
        schedule.step()
    return seen


def test_flat_cosine_on_hand_computed_steps():
    # warmup 4, 20 steps, flat for round(0.5 * 20) = 10, then cosine down to 0.05 at step 20 (1-based).
    schedule = LRSchedule(adamw(), warmup_steps=4, shape="flat-cosine", total_steps=20, flat_fraction=0.5,
                          min_lr_ratio=0.05)  # fmt: skip
    seen = factors(schedule, 25)
    step = dict(enumerate(seen, start=1))
    assert [step[n] for n in (1, 2, 3, 4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert [step[n] for n in (5, 10)] == pytest.approx([1.0, 1.0])
    # step 12: progress 2/10, (1 + cos(pi/5)) / 2 = (5 + sqrt 5) / 8
    assert step[12] == pytest.approx(0.05 + 0.95 * (5 + math.sqrt(5)) / 8)
    assert step[15] == pytest.approx(0.05 + 0.95 * 0.5)  # progress 1/2: cos = 0
    assert [step[n] for n in (20, 21, 25)] == pytest.approx([0.05] * 3)  # the last step and after: the floor
    assert all(a >= b for a, b in zip(seen[4:], seen[5:]))  # never rises after warmup


def test_constant_shape_keeps_the_lr_after_warmup_and_milestones():
    schedule = LRSchedule(adamw(), warmup_steps=2, milestones=(1,), gamma=0.1, total_steps=10)
    seen = factors(schedule, 2)
    schedule.set_epoch(1)
    seen += factors(schedule, 12)
    assert seen == pytest.approx([0.5, 1.0] + [0.1] * 12)  # the total does not matter


def test_new_total_while_flat_moves_the_cosine_start():
    schedule = LRSchedule(adamw(), 0, shape="flat-cosine", total_steps=20, flat_fraction=0.5, min_lr_ratio=0.05)
    factors(schedule, 5)  # the next step is step 6
    schedule.set_total_steps(40)  # the cosine now starts after round(0.5 * 40) = 20
    assert schedule.cosine_start == 20
    step = dict(enumerate(factors(schedule, 40), start=6))
    assert step[6] == step[20] == 1.0
    assert step[30] == pytest.approx(0.525)  # halfway through the moved cosine
    assert step[40] == pytest.approx(0.05)


def test_shorter_total_while_flat_starts_the_decay_now_without_a_jump():
    schedule = LRSchedule(adamw(), 0, shape="flat-cosine", total_steps=20, flat_fraction=0.5, min_lr_ratio=0.05)
    factors(schedule, 7)  # next: step 8, still flat (cosine after step 10)
    schedule.set_total_steps(10)  # round(0.5 * 10) = 5 is already past: the decay starts at step 8
    step = dict(enumerate(factors(schedule, 3), start=8))
    assert step[8] == 1.0
    assert step[9] == pytest.approx(0.525)  # phase pi/2: one of the two steps left
    assert step[10] == pytest.approx(0.05)


def test_new_total_inside_the_cosine_keeps_the_lr_continuous():
    schedule = LRSchedule(adamw(), 0, shape="flat-cosine", total_steps=20, flat_fraction=0.5, min_lr_ratio=0.05)
    factors(schedule, 14)  # the next step is step 15: phase pi/2, factor 0.525
    before = [g["lr"] for g in schedule.optimizer.param_groups]
    schedule.set_total_steps(30)
    assert [g["lr"] for g in schedule.optimizer.param_groups] == before
    # The phase now rises from pi/2 at step 15 to pi at step 30: at step 20 it is pi/2 + pi/2 * 5/15 = 2 pi/3.
    step = dict(enumerate(factors(schedule, 16), start=15))
    assert step[15] == pytest.approx(0.525)
    assert step[20] == pytest.approx(0.05 + 0.95 * (1 + math.cos(2 * math.pi / 3)) / 2)  # 0.2875
    assert step[30] == pytest.approx(0.05)
    assert all(a > b for a, b in zip(list(step.values())[:-1], list(step.values())[1:]))


def test_state_round_trip_resumes_with_identical_lrs():
    def run() -> LRSchedule:
        return LRSchedule(adamw(), 3, milestones=(3,), gamma=0.5, shape="flat-cosine", total_steps=24,
                          flat_fraction=0.25, min_lr_ratio=0.1)  # fmt: skip

    full = run()
    full.set_epoch(0)
    factors(full, 8)
    full.set_total_steps(30)  # a re-estimated total: the anchor of the cosine is state too
    factors(full, 2)
    state = json.loads(json.dumps(full.state_dict()))  # plain types
    full.set_epoch(3)
    expected = factors(full, 15)

    resumed = LRSchedule(adamw(), 2000)  # whatever it was built with, the state decides
    resumed.load_state_dict(state)
    resumed.set_epoch(3)
    assert factors(resumed, 15) == expected  # exactly


def test_checkpoints_from_before_the_flat_cosine_shape_resume_constant():
    old = {"warmup_steps": 4, "milestones": [], "gamma": 0.1, "base_lrs": list(BASE_LRS), "last_step": 1, "epoch": 0}
    schedule = LRSchedule(adamw(), 4, shape="flat-cosine", total_steps=5)
    schedule.load_state_dict(old)
    assert factors(schedule, 4) == pytest.approx([0.5, 0.75, 1.0, 1.0])


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="total_steps"):
        LRSchedule(adamw(), 0, shape="flat-cosine")
    with pytest.raises(ValueError, match="shape"):
        LRSchedule(adamw(), 0, shape="cosine")
