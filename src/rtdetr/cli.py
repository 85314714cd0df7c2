"""Command line: `rtdetr predict`, `rtdetr demo`. Thin argparse over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm

from .api import RTDETR, load_image
from .config import PRESETS
from .viz import draw_detections

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def sample_image_path() -> Path:
    """The synthetic sample image shipped with the package."""
    return Path(str(resources.files("rtdetr") / "assets" / "sample.jpg"))


def load_model(args: argparse.Namespace) -> RTDETR:
    overrides = {"num_decoder_layers": args.decoder_layers} if args.decoder_layers else {}
    if args.weights:
        model = RTDETR.from_checkpoint(args.weights, **overrides)
    else:
        logging.warning("no --weights given: %s with RANDOM weights (boxes are meaningless)", args.preset)
        model = RTDETR.from_preset(args.preset, **overrides)
    return model.to(args.device).eval()


def expand_sources(sources: list[str]) -> list[Path]:
    """Files, folders (their images, sorted) and glob patterns -> image paths."""
    paths: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif any(ch in source for ch in "*?["):
            paths += sorted(p for p in Path().glob(source) if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(path)
    return paths


def predict(args: argparse.Namespace) -> int:
    model = load_model(args)
    size = (args.img_size, args.img_size) if args.img_size else None
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    coco_results, per_image, failures = [], [], []
    for image_id, path in enumerate(tqdm(expand_sources(args.source), desc="predict", unit="img"), start=1):
        try:
            image = load_image(path)
        except (FileNotFoundError, ValueError) as error:
            failures.append(str(error))
            tqdm.write(f"skipped: {error}")
            continue
        dets = model.predict(image, args.score_threshold, size, max_detections=args.max_detections)[0]
        draw_detections(image, dets).save(output / f"{path.stem}_pred.jpg", quality=92)
        coco_results += dets.to_coco_results(image_id)
        per_image.append({
            "file": str(path), "image_id": image_id, "width": image.width, "height": image.height,
            "detections": [
                {"box_xyxy": [round(v, 2) for v in b], "score": round(s, 4), "category_id": c, "class_name": n}
                for b, s, c, n in zip(dets.boxes.tolist(), dets.scores.tolist(), dets.labels.tolist(), dets.class_names)
            ],
        })  # fmt: skip
    (output / "predictions_coco.json").write_text(json.dumps(coco_results))
    (output / "predictions.json").write_text(json.dumps({"images": per_image, "failed": failures}, indent=1))
    print(f"{len(per_image)} images -> {output} ({len(failures)} skipped)")
    return 1 if failures and not per_image else 0


def demo(args: argparse.Namespace) -> int:
    print(
        "rtdetr demo: training is not built yet, so this runs `predict` with a RANDOMLY INITIALISED "
        f"{args.preset} on the bundled synthetic sample image; the drawn boxes are meaningless."
    )
    args.source = [str(sample_image_path())]
    args.weights, args.decoder_layers, args.img_size = None, None, None
    args.score_threshold, args.max_detections = 0.0, 10  # random weights score ~0.01: draw the top 10
    code = predict(args)
    print(f"annotated image: {Path(args.output) / 'sample_pred.jpg'}")
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtdetr", description="RT-DETR object detection")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="detect objects in images; writes annotated images and JSON")
    p.add_argument("source", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--weights", help="checkpoint: ours, official .pth, or a Hugging Face folder")
    p.add_argument("--preset", default="rtdetr_r18vd", choices=sorted(PRESETS), help="used without --weights")
    p.add_argument("--score-threshold", type=float, default=0.5)
    p.add_argument("--img-size", type=int, help="square input size (multiple of 32); default: the model's")
    p.add_argument("--max-detections", type=int, default=300, help="per image, before the score threshold")
    p.add_argument("--decoder-layers", type=int, help="decoder layers used at inference (speed knob)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default="runs/predict")
    p.set_defaults(func=predict)

    d = sub.add_parser("demo", help="the built-in demo (see its message)")
    d.add_argument("--preset", default="rtdetr_tiny", choices=sorted(PRESETS))
    d.add_argument("--device", default="cpu")
    d.add_argument("--output", default="runs/demo")
    d.set_defaults(func=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda requested but CUDA is not available", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
