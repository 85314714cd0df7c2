"""`rtdetr bench`: parameters, GFLOPs and latency in PyTorch eager, deploy mode and ONNX Runtime."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..inference.benchmark import benchmark_model, format_table
from .arguments import add_amp, add_device, add_image_size, add_model_arguments, resolve_device
from .export import pytorch_model


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model = pytorch_model(args, device=device)
    size = args.img_size or tuple(model.config.image_size)
    result = benchmark_model(model, size, args.batch_size, device, args.runs, args.warmup, amp=args.amp)
    print(format_table(result))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1))
        print(f"written {args.output}")
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="params, GFLOPs and latency: PyTorch eager, deploy mode, ONNX Runtime")
    add_model_arguments(p)
    add_device(p)
    add_amp(p)
    add_image_size(p)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--runs", type=int, default=10, help="timed runs per backend (interleaved)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, help="CPU threads for torch and ONNX Runtime (default: all)")
    p.add_argument("--output", help="write the results as JSON here")
    p.set_defaults(func=run)
