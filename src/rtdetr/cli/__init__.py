"""The `rtdetr` command: one verb per module (train / eval, demo, check, predict, track, serve, export, bench), thin
argparse over the Python API, with the flags of `cli.arguments` meaning the same everywhere."""

from __future__ import annotations

import argparse
import logging
import sys

from . import bench, check, export, predict, serve, track, train

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtdetr",
        description="RT-DETR real-time object detection: train, evaluate, predict, track, serve, export, benchmark.",
        epilog="Run `rtdetr VERB --help` for the flags of each verb.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="VERB")
    for verb in (train, check, predict, track, serve, export, bench):
        verb.add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
