"""Argument builders every `rtdetr` verb shares, so a flag means one thing everywhere:
`--img-size 640` or `--img-size 480x640` (H x W), `--device auto|cpu|cuda[:i]`, `--weights`, `--preset`,
`--amp off|bf16|fp16`, `--set FIELD=VALUE`."""

from __future__ import annotations

import argparse
import ast
from typing import Any

import torch

from ..config import AMP_MODES, PRESETS
from ..engine.distributed import requested_device


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


def add_image_size(p: argparse.ArgumentParser, what: str = "input size") -> None:
    p.add_argument("--img-size", type=image_size_arg, metavar="N|HxW",
                   help=f"{what}: N or HxW, multiples of 32 (default: the model's)")  # fmt: skip


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:i")


def add_processes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--processes", type=int, metavar="N",
                   help="training processes on this machine (DDP): 0 (default) chooses for the device, on a CPU one "
                   "per core while each gets 8+ images of the batch (faster than one process with every thread); "
                   "1: one process")  # fmt: skip


def add_amp(p: argparse.ArgumentParser) -> None:
    p.add_argument("--amp", default="off", choices=AMP_MODES,
                   help="run the network under autocast: bf16 (CPUs with AMX/AVX512-BF16, CUDA) or fp16 (CUDA)")  # fmt: skip


def add_model_arguments(p: argparse.ArgumentParser, onnx: bool = False) -> None:
    """--weights, --preset and --decoder-layers: the model a verb runs."""
    p.add_argument("--weights", help="our checkpoint, an official .pth or a Hugging Face folder"
                   + (", or an exported .onnx / OpenVINO IR (a folder with model.xml)" if onnx else ""))  # fmt: skip
    p.add_argument("--preset", default="rtdetr_r18vd", choices=sorted(PRESETS),
                   help="with RANDOM weights, when no --weights (default: %(default)s)")  # fmt: skip
    p.add_argument("--decoder-layers", type=int, metavar="K",
                   help="decoder layers used at inference (the speed knob, no retraining)")  # fmt: skip
    p.add_argument("--cross-attn-method", choices=("default", "discrete"),
                   help="RT-DETRv2 sampling: discrete for the dsp checkpoints (default: discrete when the file name "
                   "contains 'dsp', else bilinear)")  # fmt: skip


def add_settings(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help=f"{what}; repeatable")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; a CUDA device without CUDA is an error."""
    device = requested_device(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but CUDA is not available (use --device cpu or auto)")
    return device


def parse_settings(items: list[str] | None) -> dict[str, Any]:
    """['lr=2e-4', 'amp=bf16', 'multiscale_sizes=[576,608,640]', 'sync_bn=false'] -> typed values (Python
    literals, true/false, else the string); the trainer checks names and types against the dataclasses."""
    settings = {}
    for item in items or []:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set expects FIELD=VALUE, got '{item}'")
        if text.lower() in ("true", "false"):
            value: Any = text.lower() == "true"
        else:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
        settings[name.strip()] = value
    return settings
