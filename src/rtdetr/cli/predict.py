"""`rtdetr predict`: detect in images, folders, globs and videos; annotated copies and JSON."""

from __future__ import annotations

import argparse

from ..api import load_detector
from ..inference.sources import PredictOptions, predict_sources
from ..inference.tiling import MERGE_METHODS, TileOptions
from .arguments import add_amp, add_device, add_image_size, add_model_arguments, resolve_device


def run(args: argparse.Namespace) -> int:
    detector = load_detector(args.weights, args.preset, args.decoder_layers, resolve_device(args.device),
                             cross_attn_method=args.cross_attn_method)
    tiles = TileOptions(args.tile, args.overlap, args.full_frame, args.merge) if args.tile else None
    options = PredictOptions(args.score_threshold, args.img_size, args.batch_size, args.max_detections, args.amp,
                             tiles)  # fmt: skip
    summary = predict_sources(detector, args.source, args.output, options)
    print(f"{len(summary.images)} images, {len(summary.videos)} videos -> {args.output} "
          f"({len(summary.failed)} skipped, listed in predictions.json)")  # fmt: skip
    return 1 if summary.failed and not (summary.images or summary.videos) else 0


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="detect objects in images and videos; writes annotated files and JSON",
                       description="Detect objects in image files, folders, glob patterns and videos. Writes "
                       "<stem>_pred.jpg|.mp4, predictions.json (with every skipped file and why) and "
                       "predictions_coco.json to --output.")  # fmt: skip
    p.add_argument("source", nargs="+", help="image or video files, folders, glob patterns")
    add_model_arguments(p, onnx=True)
    add_device(p)
    add_amp(p)
    add_image_size(p)
    p.add_argument("--score-threshold", type=float, default=0.5, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=8, help="images (or video frames) per forward pass")
    p.add_argument("--max-detections", type=int, default=300, help="per image, before the score threshold")
    p.add_argument("--output", default="runs/predict", help="default: %(default)s")
    tiling = p.add_argument_group("tiled inference (large images, small objects)")
    tiling.add_argument("--tile", type=int, metavar="SIZE",
                        help="cut each image into SIZE x SIZE tiles (original pixels), each run at the model's input "
                        "size, the boxes merged across tile borders")  # fmt: skip
    tiling.add_argument("--overlap", type=float, default=TileOptions.overlap,
                        help="fraction of a tile shared with its neighbour (default: %(default)s)")  # fmt: skip
    tiling.add_argument("--full-frame", action="store_true",
                        help="also run the whole image, for objects larger than a tile")  # fmt: skip
    tiling.add_argument("--merge", choices=MERGE_METHODS, default=TileOptions.merge,
                        help="across tile borders: keep the best box (nms) or merge the group (nmm); default: "
                        "%(default)s")  # fmt: skip
    p.set_defaults(func=run)
