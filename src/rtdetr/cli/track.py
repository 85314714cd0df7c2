"""`rtdetr track`: detect and track objects through videos (ByteTrack); annotated video, JSON and MOT text."""

from __future__ import annotations

import argparse

from ..api import load_detector
from ..inference.sources import PredictOptions
from ..inference.tracking import TrackerOptions, track_video
from .arguments import add_amp, add_device, add_image_size, add_model_arguments, resolve_device


def run(args: argparse.Namespace) -> int:
    detector = load_detector(args.weights, args.preset, args.decoder_layers, resolve_device(args.device),
                             cross_attn_method=args.cross_attn_method)  # fmt: skip
    options = PredictOptions(image_size=args.img_size, batch_size=args.batch_size, amp=args.amp)
    tracker = TrackerOptions(args.detection_threshold, args.track_threshold, args.match_threshold, args.lost_frames,
                             args.min_frames, args.trail)  # fmt: skip
    for video in args.video:
        result = track_video(detector, video, args.output, options, tracker)
        print(f"{video}: {len(result.frames)} frames, {len(result.track_ids)} tracks -> {result.annotated}, "
              f"{result.json}, {result.mot}")  # fmt: skip
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    defaults = TrackerOptions()
    p = sub.add_parser("track", help="track objects through videos (ByteTrack); annotated video, JSON, MOT text",
                       description="Detect objects in every frame and associate them into tracks with ByteTrack "
                       "(supervision), at thresholds set for RT-DETR's scores. Writes <stem>_track.mp4 (boxes with "
                       "track ids and trails), <stem>_tracks.json (per frame) and <stem>_mot.txt (MOT challenge "
                       "format) to --output.")  # fmt: skip
    p.add_argument("video", nargs="+", help="video files")
    add_model_arguments(p, onnx=True)
    add_device(p)
    add_amp(p)
    add_image_size(p)
    p.add_argument("--batch-size", type=int, default=8, help="frames per forward pass (default: %(default)s)")
    p.add_argument("--output", default="runs/track", help="default: %(default)s")
    t = p.add_argument_group("tracker (ByteTrack)")
    t.add_argument("--detection-threshold", type=float, default=defaults.detection_threshold,
                   help="the lowest score the tracker sees (default: %(default)s)")  # fmt: skip
    t.add_argument("--track-threshold", type=float, default=defaults.track_threshold,
                   help="scores that take part in the first association; new tracks need 0.1 more "
                   "(default: %(default)s)")  # fmt: skip
    t.add_argument("--match-threshold", type=float, default=defaults.match_threshold,
                   help="the largest accepted association cost, 1 - IoU x score (default: %(default)s)")  # fmt: skip
    t.add_argument("--lost-frames", type=int, default=defaults.lost_frames,
                   help="frames (at 30 fps) a lost track waits to be found again (default: %(default)s)")  # fmt: skip
    t.add_argument("--min-frames", type=int, default=defaults.min_frames,
                   help="consecutive frames before a track is reported (default: %(default)s)")  # fmt: skip
    t.add_argument("--trail", type=int, default=defaults.trail,
                   help="frames of trail drawn per track (default: %(default)s)")  # fmt: skip
    p.set_defaults(func=run)
