"""`engine.launch`: how many processes a run starts, the processes themselves (errors come back to the parent as
the user's mistake or with the process's traceback), and a time-budgeted run in two CPU processes, whose ranks
must apply the same update at every step (one schedule for all ranks, DDP's averaged gradients)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from rtdetr.data.synthetic import generate_coco_dataset
from rtdetr.engine.distributed import all_gather_objects
from rtdetr.engine.launch import launch, local_processes
from rtdetr.engine import run as run_module
from rtdetr.engine.run import train
from rtdetr.engine.schedule import TimeBudget
from rtdetr.weights.checkpoint import torch_load


@pytest.mark.parametrize("requested, device, cores, batch, expected", [
    (0, "cpu", 2, 16, 2),   # the measured case: two single-thread processes of 8 images
    (0, "cpu", 2, 8, 1),    # 4 images per process would be too few for BatchNorm
    (0, "cpu", 1, 16, 1),
    (0, "cpu", 8, 16, 2),   # at most batch / 8 processes
    (0, "cpu", 8, 48, 6),   # the most that split 48 evenly into 8+ (6 x 8; 7 does not divide 48)
    (0, "cpu", 3, 16, 2),   # 3 does not divide 16
    (0, "cuda", 8, 64, 1),  # GPUs: torchrun
    (3, "cpu", 2, 16, 3),   # set by the user
])  # fmt: skip
def test_processes_chosen_for_the_device(requested, device, cores, batch, expected):
    processes, why = local_processes(requested, device, cores, batch)
    assert processes == expected and why


def rank_and_world(value: int) -> tuple[int, int, int]:
    torch.distributed.init_process_group("gloo")
    try:
        gathered = [None, None]
        torch.distributed.all_gather_object(gathered, value)
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), sum(gathered)
    finally:
        torch.distributed.destroy_process_group()


def fail(kind: str) -> None:
    if kind == "user" and os.environ["RANK"] == "1":
        raise FileNotFoundError("datasets/x/train/0001.jpg: no such image (fix the file name in the annotations)")
    if kind == "bug":
        raise KeyError("boom")


def test_launch_joins_the_processes_and_returns_rank_0s_result():
    rank, world, total = launch(rank_and_world, {"value": 5}, processes=2)
    assert (rank, world, total) == (0, 2, 10)  # both ranks took part in one collective


def test_a_processs_error_comes_back_as_the_users_mistake_or_with_its_traceback():
    with pytest.raises(FileNotFoundError, match="0001.jpg: no such image"):
        launch(fail, {"kind": "user"}, processes=2)  # only rank 1 fails; rank 0 ends with it
    with pytest.raises(RuntimeError, match="(?s)training process . failed.*KeyError: 'boom'"):
        launch(fail, {"kind": "bug"}, processes=2)


def record_steps(trainer) -> None:
    """Per step, on every rank: the lr and a checksum of the weights, gathered to rank 0 into steps.jsonl."""
    checksum = sum(float(p.detach().double().sum()) for p in trainer.model.parameters())
    rows = all_gather_objects((trainer.step, trainer.lr(), checksum), trainer.process)
    if trainer.process.is_main:
        with open(trainer.output / "steps.jsonl", "a") as f:
            f.write(json.dumps(rows) + "\n")


def budgeted_run(data: str, output: str) -> str:
    """A 2-process run with a time budget, a decaying lr (it depends on the planned total) and a callback (possible
    inside the processes themselves). Rank 1 alone times a 1.5x slower probe and re-estimates 3 more steps: left to
    themselves the ranks would plan different decays."""
    if os.environ["RANK"] == "1":
        median = run_module.statistics.median
        run_module.statistics = SimpleNamespace(median=lambda values: 1.5 * median(values))
        planned_total = TimeBudget.planned_total
        TimeBudget.planned_total = lambda self, *args: planned_total(self, *args) + 3
    return str(train("rtdetr_tiny", data, output=output, callbacks=[record_steps], time_minutes=0.3,
                     lr_schedule="flat-cosine", flat_fraction=0.2, batch_size=4, image_size=(64, 64), num_queries=20,
                     num_denoising=10, eval_batch_size=8, device="cpu"))  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_coco_dataset(tmp_path_factory.mktemp("data"), {"train": 16, "val": 4}, image_size=(64, 64), seed=1)


def test_train_starts_its_processes(data, tmp_path):
    out = train("rtdetr_tiny", data, output=str(tmp_path), processes=2, check_data=False, epochs=1, batch_size=4,
                image_size=(64, 64), num_queries=20, num_denoising=10, eval_batch_size=8, device="cpu")  # fmt: skip
    assert "WORLD_SIZE" not in os.environ  # this process is not one of them
    checkpoint = torch_load(out / "last.pt")
    assert len(checkpoint["rng"]) == 2 and checkpoint["step"] == 4  # 16 images / batch 4, split over 2 ranks
    assert (out / "best.pt").exists()


def test_a_two_process_time_budget_run_keeps_every_rank_on_one_schedule(data, tmp_path):
    out = launch(budgeted_run, {"data": str(data), "output": str(tmp_path / "run")}, processes=2)
    rows = [json.loads(line) for line in open(os.path.join(out, "steps.jsonl"))]
    assert len(rows) >= 4
    assert len({lr for (_, lr, _), _ in rows}) > 2, "the lr decays during the run"
    for (step0, lr0, sum0), (step1, lr1, sum1) in rows:
        assert step0 == step1 and lr0 == lr1, "one lr schedule on every rank"
        assert sum0 == sum1, f"the ranks' weights differ after step {step0}"
    checkpoint = torch_load(os.path.join(out, "last.pt"))
    assert len(checkpoint["rng"]) == 2  # both ranks' random streams, for an exact resume
    assert os.path.exists(os.path.join(out, "best.pt"))


def test_callbacks_need_one_process(tmp_path):
    with pytest.raises(ValueError, match="processes=1"):
        train("rtdetr_tiny", tmp_path, callbacks=[record_steps], processes=2, check_data=False, device="cpu")
