"""Training that fits the run, through `train()` and the CLI: a time budget that ends on time with both
checkpoints, the recipe stored and overridable, early stopping on a scripted AP sequence, YOLO-layout data,
and a dataset (or an input size) the model cannot take refused before the first step with every problem."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from test_dataset_check import write_defective_coco, write_defective_yolo

from rtdetr.cli import main
from rtdetr.config import TrainConfig, preset
from rtdetr.data.synthetic import generate_coco_dataset
from rtdetr.engine.run import DatasetError, train
from rtdetr.engine.trainer import Trainer
from rtdetr.weights.checkpoint import torch_load

FAST = dict(image_size=(64, 64), num_queries=20, num_denoising=10, num_workers=0, device="cpu", eval_batch_size=8,
            batch_size=4)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return generate_coco_dataset(tmp_path_factory.mktemp("shapes"), {"train": 16, "val": 4}, image_size=(64, 64))


def test_a_time_budget_ends_the_run_on_time_with_both_checkpoints(shapes, tmp_path):
    budget_s = 4.0
    ends: list[float] = []
    start = time.perf_counter()
    out = train("rtdetr_tiny", shapes, output=str(tmp_path), time_minutes=budget_s / 60,
                callbacks=[lambda trainer: ends.append(time.perf_counter())], **FAST)  # fmt: skip
    last, best = torch_load(out / "last.pt"), torch_load(out / "best.pt")
    steps = [b - a for a, b in zip(ends, ends[1:])]
    # Training and its periodic evaluations end within the budget (counted from the first step's start,
    # after the probe), give or take one step; only the final evaluation follows.
    first_step_start = ends[0] - steps[0]
    assert ends[-1] - first_step_start <= budget_s + 2 * max(steps)
    assert ends[-1] - first_step_start >= budget_s - 3 * max(steps) - last["budget"]["eval_seconds"], "ended early"
    assert last["budget"]["train_seconds"] + last["budget"]["evaluation_seconds"] >= budget_s - 3 * max(steps)
    assert best["metrics"] is not None and last["step"] == len(ends) and best["step"] <= last["step"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["kind"] == "epoch" and "metrics" in log[-1] and log[-1]["step"] == len(ends)  # final evaluation
    assert time.perf_counter() - start < budget_s + 30  # probe, check and final evaluation are short here


def test_the_resolved_recipe_is_stored_and_explicit_settings_win(shapes, tmp_path):
    out = train("rtdetr_tiny", shapes, output=str(tmp_path), epochs=1, lr=3e-4, **FAST)
    last = torch_load(out / "last.pt")
    saved = TrainConfig(**last["train_config"])
    assert saved.recipe == "auto" and saved.lr == 3e-4 and last["recipe"]["reasons"]["lr"] == "set by you"
    assert saved.backbone_lr == 3e-4  # from scratch: the backbone learns at the (user's) lr
    assert saved.warmup_steps == 1 and saved.lr_schedule == "constant"  # 4 steps: a fifth of the run, no decay


def test_recipe_official_gives_the_official_numbers(shapes, tmp_path):
    out = train("rtdetr_tiny", shapes, output=str(tmp_path), epochs=1, recipe="official", **FAST)
    saved = TrainConfig(**torch_load(out / "last.pt")["train_config"])
    official = TrainConfig.for_model(preset("rtdetr_tiny"), epochs=1, recipe="official", param_groups="r18vd", **{
        k: v for k, v in FAST.items() if k in TrainConfig.__dataclass_fields__})  # fmt: skip
    assert saved.replace(output=official.output) == official
    assert (saved.lr, saved.backbone_lr, saved.warmup_steps, saved.ema_decay) == (1e-4, 1e-5, 2000, 0.9999)


def test_early_stopping_stops_at_the_right_evaluation_and_keeps_the_best(shapes, tmp_path, monkeypatch):
    aps = iter([0.10, 0.30, 0.25, 0.30, 0.20, 0.50])  # best at evaluation 2; patience 3 stops after evaluation 5

    def scripted(self):
        self.clock = time.perf_counter()
        return {"AP": next(aps), "AP50": 0.0}

    monkeypatch.setattr(Trainer, "evaluate", scripted)
    out = train("rtdetr_tiny", shapes, output=str(tmp_path), epochs=10, patience=3, eval_interval=1, **FAST)
    last, best = torch_load(out / "last.pt"), torch_load(out / "best.pt")
    assert last["epoch"] == 5 and best["epoch"] == 2 and best["metrics"]["AP"] == 0.30
    assert last["early_stopping"]["best_evaluation"] == 1


def test_a_yolo_dataset_trains_and_is_scored_by_the_coco_evaluator(shapes, tmp_path):
    yolo = coco_to_yolo(shapes, tmp_path / "yolo")
    out = train("rtdetr_tiny", yolo, output=str(tmp_path / "run"), epochs=1, **FAST)
    best = torch_load(out / "best.pt")
    coco_names = sorted(json.loads((shapes / "annotations" / "instances_train.json").read_text())["categories"],
                        key=lambda c: c["id"])  # fmt: skip
    assert best["class_names"] == [c["name"] for c in coco_names]  # names from data.yaml, in its order
    assert 0.0 <= best["metrics"]["AP"] <= 1.0 and best["category_ids"] == list(range(5))
    assert main(["eval", "--weights", str(out / "best.pt"), "--data", str(yolo), "--device", "cpu",
                 "--output", str(tmp_path / "eval")]) == 0  # fmt: skip


def coco_to_yolo(coco: Path, root: Path) -> Path:
    """The YOLO twin of a synthetic COCO dataset: data.yaml, images/<split>, labels/<split> (cx cy w h)."""
    names = None
    for split in ("train", "val"):
        data = json.loads((coco / "annotations" / f"instances_{split}.json").read_text())
        categories = sorted(data["categories"], key=lambda c: c["id"])
        names, index = [c["name"] for c in categories], {c["id"]: i for i, c in enumerate(categories)}
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for image in data["images"]:
            (root / "images" / split / image["file_name"]).write_bytes((coco / split / image["file_name"]).read_bytes())
            lines = [
                f"{index[a['category_id']]} {(a['bbox'][0] + a['bbox'][2] / 2) / image['width']:.6f} "
                f"{(a['bbox'][1] + a['bbox'][3] / 2) / image['height']:.6f} {a['bbox'][2] / image['width']:.6f} "
                f"{a['bbox'][3] / image['height']:.6f}"
                for a in data["annotations"] if a["image_id"] == image["id"]
            ]  # fmt: skip
            (root / "labels" / split / f"{Path(image['file_name']).stem}.txt").write_text("\n".join(lines))
    (root / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/val\nnames: {json.dumps(names)}\n")
    return root


@pytest.mark.parametrize("layout", ["coco", "yolo"])
def test_check_and_train_name_every_defect_and_train_refuses_before_the_first_step(layout, tmp_path, capsys):
    data = (write_defective_coco if layout == "coco" else write_defective_yolo)(tmp_path / "data")
    assert main(["check", "--data", str(data)]) == 1
    checked = capsys.readouterr().out
    assert main(["train", "--preset", "rtdetr_tiny", "--data", str(data), "--output", str(tmp_path / "run")]) == 2
    refused = capsys.readouterr().err
    problems = [line.strip() for line in checked.splitlines() if line.strip().startswith("error:")]
    assert len(problems) >= 6, checked
    for problem in problems:  # train lists the very same problems
        assert problem in refused
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
    with pytest.raises(DatasetError):
        train("rtdetr_tiny", data, output=str(tmp_path / "run2"), **FAST)


def test_too_small_an_input_is_refused_with_the_smallest_size_that_works(shapes, tmp_path, capsys):
    assert main(["train", "--preset", "rtdetr_r18vd", "--data", str(shapes), "--img-size", "64",
                 "--output", str(tmp_path / "run")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "84 encoder tokens, fewer than the 300 queries" in err and "128x128" in err
    assert not (tmp_path / "run").exists()


class Interrupt(Exception):
    pass


def test_a_resumed_budget_run_keeps_its_accounting(shapes, tmp_path):
    """Killed halfway through a 4 s budget and resumed: the resumed run spends only what was left."""
    budget_s = 4.0

    def interrupt(trainer: Trainer) -> None:
        if trainer.budget.spent_seconds > budget_s / 2:
            trainer.save_last()
            raise Interrupt

    with pytest.raises(Interrupt):
        train("rtdetr_tiny", shapes, output=str(tmp_path), time_minutes=budget_s / 60, callbacks=[interrupt], **FAST)
    cut = torch_load(tmp_path / "last.pt")["budget"]
    spent_before = cut["train_seconds"] + cut["evaluation_seconds"]
    assert spent_before > budget_s / 2
    ends: list[float] = []
    train(resume=tmp_path / "last.pt", callbacks=[lambda trainer: ends.append(time.perf_counter())])
    done = torch_load(tmp_path / "last.pt")
    steps = [b - a for a, b in zip(ends, ends[1:])] or [0.0]
    resumed_seconds = ends[-1] - (ends[0] - steps[0])
    assert resumed_seconds <= budget_s - spent_before + 2 * max(steps) + done["budget"]["eval_seconds"]
    assert done["budget"]["budget_seconds"] == budget_s and (tmp_path / "best.pt").exists()
