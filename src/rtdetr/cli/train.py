"""`rtdetr train` and `rtdetr eval`: thin argparse over `engine.run.train` and `engine.evaluation.evaluate`.

    rtdetr train --preset rtdetr_r18vd --data datasets/my_data --epochs 12 --batch-size 8 --output runs/a
    rtdetr train --data datasets/my_data --weights rtdetr_r18vd_dec3_6x_coco_from_paddle.pth --set lr=5e-5
    rtdetr train --resume runs/a/last.pt
    rtdetr eval --weights runs/a/best.pt --data datasets/my_data --output runs/a/eval
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..api import load_detector
from ..config import PRESETS, TrainConfig
from ..engine.evaluation import evaluate
from ..engine.run import train
from ..export.openvino import is_openvino
from ..weights.checkpoint import torch_load
from .arguments import add_amp, add_device, add_image_size, add_processes, add_settings, parse_settings
from . import demo


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config overrides from the named flags and --set (the flags win)."""
    overrides = parse_settings(args.set)
    named = {"epochs": args.epochs, "time_minutes": args.time, "batch_size": args.batch_size, "device": args.device,
             "output": args.output, "image_size": args.img_size, "recipe": args.recipe, "patience": args.patience,
             "processes": args.processes}  # fmt: skip
    overrides.update({k: v for k, v in named.items() if v is not None})
    overrides.setdefault("processes", 0)  # the command line chooses them for the device (`engine.launch`)
    return overrides


def run_train(args: argparse.Namespace) -> int:
    output = train(
        args.preset, args.data, weights=args.weights, resume=args.resume, train_ann=args.train_ann,
        train_images=args.train_images, val_ann=args.val_ann, val_images=args.val_images, **train_overrides(args),
    )  # fmt: skip
    print(final_line(output))
    return 0


def final_line(output: Path) -> str:
    """'best AP 0.412 (AP50 0.633) at epoch 9: runs/a/best.pt; also last.pt, log.jsonl, curves.png'."""
    best = output / "best.pt"
    if not best.exists():
        return f"done, nothing evaluated yet: {output / 'last.pt'} (resume it with --resume)"
    saved = torch_load(best)
    metrics = saved.get("metrics") or {}
    return (f"best AP {metrics.get('AP', float('nan')):.3f} (AP50 {metrics.get('AP50', float('nan')):.3f}) at epoch "
            f"{saved.get('epoch')}: {best} (EMA weights); also {output / 'last.pt'}, log.jsonl, curves.png")  # fmt: skip


def run_eval(args: argparse.Namespace) -> int:
    weights = args.weights
    if Path(weights).suffix.lower() == ".onnx" or is_openvino(weights):
        weights = load_detector(weights)  # the exported artifact itself, on the CPU
    evaluate(
        weights, args.data, args.split, args.output, ann_file=args.ann, image_dir=args.images,
        image_size=args.img_size, batch_size=args.batch_size, device=args.device, amp=args.amp,
    )  # fmt: skip
    print(f"wrote {Path(args.output) / 'metrics.json'} and {Path(args.output) / 'predictions.json'}")
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    """Add `train`, `eval` and `demo` to the `rtdetr` command's verbs."""
    t = sub.add_parser("train", help="train or fine-tune on a dataset (COCO, Roboflow or YOLO layout)",
                       description="Train from scratch (--preset) or fine-tune (--weights) on a dataset folder, "
                       "or continue a run (--resume). Writes best.pt, last.pt, log.jsonl and curves.png.")  # fmt: skip
    t.add_argument("--preset", choices=sorted(PRESETS),
                   help="architecture (default: that of --weights, else rtdetr_r18vd)")  # fmt: skip
    t.add_argument("--data", help="dataset folder: COCO (annotations/instances_<split>.json), Roboflow or YOLO "
                   "(data.yaml) layout, checked before training")  # fmt: skip
    t.add_argument("--train-ann", help="train annotation file (instead of / overriding --data)")
    t.add_argument("--train-images", help="train image folder")
    t.add_argument("--val-ann", help="val annotation file")
    t.add_argument("--val-images", help="val image folder")
    t.add_argument("--weights", help="start from these weights (official, Hugging Face or ours); new classes "
                   "re-initialise the class heads")  # fmt: skip
    t.add_argument("--resume", help="continue a run from its last.pt")
    t.add_argument("--epochs", type=int, help="run length in epochs (default: what the recipe chooses)")
    t.add_argument("--time", type=float, metavar="MINUTES",
                   help="a time budget: the schedule fits it and the run ends on time (only the final evaluation "
                   "follows it); with --epochs too, the epochs are a cap")  # fmt: skip
    t.add_argument("--recipe", choices=TrainConfig.RECIPES,
                   help="auto (default: fitted to the run, printed with its reasons), official (the paper's COCO "
                   "numbers), official-v2")  # fmt: skip
    t.add_argument("--patience", type=int, metavar="N", help="early stopping: stop after N evaluations without "
                   "a better validation AP (default: off)")  # fmt: skip
    t.add_argument("--batch-size", type=int, help="images per optimizer step, all processes together")
    add_image_size(t, "training and evaluation size")
    add_device(t)
    add_processes(t)
    t.add_argument("--output", help="run folder (default runs/train; resume: the folder of last.pt)")
    add_settings(t, "any TrainConfig or ModelConfig field, e.g. lr=2e-4 amp=bf16")
    t.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="COCO metrics of a checkpoint or an exported model on a dataset split",
                       description="COCO box metrics (pycocotools) of a checkpoint or an exported model (.onnx, "
                       "OpenVINO IR) on a dataset split; writes metrics.json and predictions.json (COCO results) to "
                       "--output.")  # fmt: skip
    e.add_argument("--weights", required=True, help="checkpoint: ours, official .pth, or a Hugging Face folder; or an "
                   "exported .onnx / OpenVINO IR folder (model.xml), run on the CPU as exported")  # fmt: skip
    e.add_argument("--data", help="dataset folder (COCO, Roboflow or YOLO layout)")
    e.add_argument("--split", default="val", help="default: %(default)s")
    e.add_argument("--ann", help="annotation file (instead of --data)")
    e.add_argument("--images", help="image folder (with --ann)")
    add_image_size(e)
    e.add_argument("--batch-size", type=int, default=32)
    add_device(e)
    add_amp(e)
    e.add_argument("--output", default="runs/eval", help="default: %(default)s")
    e.set_defaults(func=run_eval)
    demo.add(sub)
