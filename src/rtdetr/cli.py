"""Command line: `rtdetr predict | export | bench | demo`. Thin argparse over the Python API.

Each subcommand is added by one `add_*_command(subparsers)` function listed in `COMMANDS`; a new subcommand
is one more such function.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .api import RTDETR, load_image
from .config import AMP_MODES, PRESETS
from .export.benchmark import benchmark_model, format_table
from .export.onnx import ExportCheckError, check_onnx, export_onnx
from .export.onnxruntime_backend import OnnxDetector
from .inference import load_detector
from .train_cli import add_subcommands
from .postprocess import Detections
from .viz import draw_detections

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}
DEFAULT_VIDEO_FPS = 30.0  # when a video file does not say its frame rate

__all__ = ["build_parser", "main"]


def image_size_arg(text: str) -> tuple[int, int]:
    """'640' -> (640, 640); '320x448' -> (320, 448) as height x width."""
    try:
        sides = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        sides = ()
    if len(sides) == 1:
        sides = sides * 2
    if len(sides) != 2 or any(v <= 0 or v % 32 for v in sides):
        raise argparse.ArgumentTypeError(f"'{text}': give N or HxW, multiples of 32 (e.g. 640 or 480x640)")
    return sides  # type: ignore[return-value]


def add_model_arguments(p: argparse.ArgumentParser, device: bool = True) -> None:
    p.add_argument(
        "--weights", help="our checkpoint, an official .pth, a Hugging Face folder, or (predict) an exported .onnx"
    )
    p.add_argument(
        "--preset", default="rtdetr_r18vd", choices=sorted(PRESETS), help="with RANDOM weights, when no --weights"
    )
    p.add_argument("--decoder-layers", type=int, help="decoder layers used at inference (speed knob, no retraining)")
    if device:
        p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:i")
        p.add_argument("--amp", default="off", choices=AMP_MODES,
                       help="run the PyTorch network under autocast: bf16 (CPUs with AMX/AVX512-BF16, CUDA) or fp16 (CUDA)")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- predict


def expand_sources(sources: list[str]) -> tuple[list[Path], list[dict[str, str]]]:
    """Files, folders (their images and videos, sorted) and glob patterns -> (paths, failures).

    Explicitly named files are kept even if missing or of an unknown type: reading them reports the problem.
    """
    known = IMAGE_SUFFIXES | VIDEO_SUFFIXES
    paths: list[Path] = []
    failures: list[dict[str, str]] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.suffix.lower() in known)
        elif any(ch in source for ch in "*?[") and not path.exists():
            matches = sorted(p for p in map(Path, glob.glob(source, recursive=True)) if p.suffix.lower() in known)
            paths += matches
            if not matches:
                failures.append({"file": source, "error": f"no image or video matches the pattern {source}"})
        else:
            paths.append(path)
    return paths, failures


def unique_output(output: Path, source: Path, suffix: str, used: set[Path]) -> Path:
    """output/<stem>_pred<suffix>, numbered when two sources share a stem."""
    candidate, n = output / f"{source.stem}_pred{suffix}", 1
    while candidate in used:
        candidate, n = output / f"{source.stem}_{n}_pred{suffix}", n + 1
    used.add(candidate)
    return candidate


def detection_records(dets: Detections) -> list[dict[str, Any]]:
    """Detections as JSON records with class names."""
    columns = zip(dets.boxes.tolist(), dets.scores.tolist(), dets.labels.tolist(), dets.class_names)
    return [
        {"box_xyxy": [round(v, 2) for v in box], "score": round(score, 4), "category_id": cat, "class_name": name}
        for box, score, cat, name in columns
    ]


def predict_images(
    detector: RTDETR | OnnxDetector, paths: list[Path], args: argparse.Namespace, used: set[Path]
) -> tuple[list[dict], list[dict], list[dict[str, str]]]:
    """Detect in `paths` a batch at a time -> (per-image records, COCO results, failures)."""
    records, coco, failures = [], [], []
    progress = tqdm(total=len(paths), desc="images", unit="img")
    for start in range(0, len(paths), args.batch_size):
        batch: list[tuple[Path, Image.Image]] = []
        for path in paths[start : start + args.batch_size]:
            try:
                batch.append((path, load_image(path)))
            except (FileNotFoundError, ValueError) as error:
                failures.append({"file": str(path), "error": str(error)})
                tqdm.write(f"skipped: {error}")
        images = [image for _, image in batch]
        batch_size = max(1, len(images))  # a batch of unreadable files leaves nothing to predict
        dets = detector.predict(
            images, args.score_threshold, args.img_size, batch_size, args.max_detections, amp=args.amp
        )
        for (path, image), det in zip(batch, dets):
            image_id = len(records) + 1
            annotated = unique_output(Path(args.output), path, ".jpg", used)
            draw_detections(image, det).save(annotated, quality=92)
            coco += det.to_coco_results(image_id)
            records.append({
                "file": str(path), "image_id": image_id, "width": image.width, "height": image.height,
                "annotated": str(annotated), "detections": detection_records(det),
            })  # fmt: skip
        progress.update(len(paths[start : start + args.batch_size]))
    progress.close()
    return records, coco, failures


def predict_video(detector: RTDETR | OnnxDetector, path: Path, args: argparse.Namespace, used: set[Path]) -> dict:
    """Annotate every frame of a video into `<stem>_pred.mp4` at the same frame rate; per-frame detections."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise ValueError(f"cannot read video {path}")
    fps = capture.get(cv2.CAP_PROP_FPS)
    fps = fps if fps and fps > 0 else DEFAULT_VIDEO_FPS
    width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    annotated = unique_output(Path(args.output), path, ".mp4", used)
    writer = cv2.VideoWriter(str(annotated), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    per_frame: list[list[dict]] = []
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    try:
        if not writer.isOpened():
            raise ValueError(f"cannot write {annotated} ({width}x{height} mp4v): is OpenCV built with FFmpeg?")
        with tqdm(total=total, desc=path.name, unit="frame") as progress:
            while frames := read_frames(capture, args.batch_size):
                dets = detector.predict(
                    frames, args.score_threshold, args.img_size, len(frames), args.max_detections, amp=args.amp
                )
                for frame, det in zip(frames, dets):
                    drawn = np.asarray(draw_detections(Image.fromarray(frame), det))
                    writer.write(cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
                    per_frame.append(detection_records(det))
                progress.update(len(frames))
    finally:
        capture.release()
        writer.release()
    if not per_frame:
        annotated.unlink(missing_ok=True)
        raise ValueError(f"cannot read video {path}: no frames decoded")
    return {
        "file": str(path), "annotated": str(annotated), "fps": fps, "frames": len(per_frame),
        "width": width, "height": height, "detections_per_frame": per_frame,
    }  # fmt: skip


def read_frames(capture: cv2.VideoCapture, count: int) -> list[np.ndarray]:
    """Up to `count` next frames as RGB uint8 arrays (fewer at the end of the video)."""
    frames = []
    while len(frames) < count:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    return frames


def predict(args: argparse.Namespace) -> int:
    detector = load_detector(args.weights, args.preset, args.decoder_layers, args.device)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    paths, failures = expand_sources(args.source)
    used: set[Path] = set()
    images = [p for p in paths if p.suffix.lower() not in VIDEO_SUFFIXES]
    records, coco, image_failures = predict_images(detector, images, args, used)
    failures += image_failures
    videos = []
    for path in (p for p in paths if p.suffix.lower() in VIDEO_SUFFIXES):
        try:
            videos.append(predict_video(detector, path, args, used))
        except ValueError as error:
            failures.append({"file": str(path), "error": str(error)})
            tqdm.write(f"skipped: {error}")
    (output / "predictions_coco.json").write_text(json.dumps(coco))
    summary = {"images": records, "videos": videos, "failed": failures}
    (output / "predictions.json").write_text(json.dumps(summary, indent=1))
    print(f"{len(records)} images, {len(videos)} videos -> {output} ({len(failures)} skipped)")
    return 1 if failures and not (records or videos) else 0


def add_predict_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="detect objects in images and videos; writes annotated files and JSON")
    p.add_argument("source", nargs="+", help="image or video files, folders, glob patterns")
    add_model_arguments(p)
    p.add_argument("--score-threshold", type=float, default=0.5)
    p.add_argument("--img-size", type=image_size_arg, help="N or HxW (multiples of 32); default: the model's")
    p.add_argument("--batch-size", type=int, default=8, help="images (or video frames) per forward pass")
    p.add_argument("--max-detections", type=int, default=300, help="per image, before the score threshold")
    p.add_argument("--output", default="runs/predict")
    p.set_defaults(func=predict)


# ---------------------------------------------------------------------------------------------------- export


def export(args: argparse.Namespace) -> int:
    model = pytorch_model(args, device="cpu")
    dynamic = not args.static_batch
    path = export_onnx(model, args.output, args.img_size, args.opset, batch_size_dynamic=dynamic, check=False)
    print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB, opset {args.opset})")
    try:
        print(check_onnx(path, model))
    except ExportCheckError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def add_export_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export to ONNX (post-processor inside) and check it against PyTorch")
    add_model_arguments(p, device=False)
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--output", default="model.onnx")
    p.add_argument("--img-size", type=image_size_arg, help="N or HxW (multiples of 32); default: the model's")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--static-batch", action="store_true", help="fix the batch axis at 1 (default: dynamic)")
    p.set_defaults(func=export)


# ---------------------------------------------------------------------------------------------------- bench


def bench(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = pytorch_model(args, device=args.device)
    size = args.img_size or tuple(model.config.image_size)
    result = benchmark_model(model, size, args.batch_size, args.device, args.runs, args.warmup, amp=args.amp)
    print(format_table(result))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1))
        print(f"written {args.output}")
    return 0


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="params, GFLOPs and latency: PyTorch eager, deploy mode, ONNX Runtime")
    add_model_arguments(p)
    p.add_argument("--img-size", type=image_size_arg, help="N or HxW (multiples of 32); default: the model's")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--runs", type=int, default=10, help="timed runs per backend (interleaved)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--threads", type=int, help="CPU threads for torch and ONNX Runtime; 1 on a shared machine (default: all)"
    )
    p.add_argument("--output", help="write the results as JSON here")
    p.set_defaults(func=bench)


def pytorch_model(args: argparse.Namespace, device: str) -> RTDETR:
    """The PyTorch model of --weights / --preset in eval mode (not deployed: export and bench deploy copies)."""
    model = load_detector(args.weights, args.preset, args.decoder_layers, device, deploy=False)
    if isinstance(model, OnnxDetector):
        raise ValueError(f"{args.weights}: `rtdetr {args.command}` needs PyTorch weights, not an .onnx file")
    return model


COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_predict_command,
    add_export_command,
    add_bench_command,
    add_subcommands,  # train, eval, demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtdetr", description="RT-DETR object detection")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if getattr(args, "device", "cpu").startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda requested but CUDA is not available", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
