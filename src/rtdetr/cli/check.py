"""`rtdetr check`: every problem of every split of a dataset folder (any layout), in one run."""

from __future__ import annotations

import argparse

from ..data.validate import check_data, format_reports


def run(args: argparse.Namespace) -> int:
    reports = check_data(args.data, args.splits, check_images=not args.no_images)
    print(format_reports(reports, max_lines=args.max_lines or None))
    return 0 if all(report.ok for report in reports) else 1


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="check a dataset (COCO, Roboflow or YOLO layout) before training",
                       description="Reads every annotation and decodes every image of each split; prints every "
                       "error (what loses or corrupts training signal: fix it) and warning (what the loader "
                       "repairs: boxes clamped or dropped), each naming the file and the image, annotation or "
                       "line. Exits 1 when there are errors. `rtdetr train` runs the same check first.")  # fmt: skip
    p.add_argument("--data", required=True, help="dataset folder (or a YOLO data.yaml)")
    p.add_argument("--splits", nargs="+", default=["train", "val"], help="default: %(default)s")
    p.add_argument("--no-images", action="store_true", help="check the annotations only (no image decoding)")
    p.add_argument("--max-lines", type=int, default=0, metavar="N",
                   help="at most N errors and N warnings per split (default: all)")  # fmt: skip
    p.set_defaults(func=run)
