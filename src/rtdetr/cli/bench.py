"""`rtdetr bench`: parameters, GFLOPs, latency (and AP with --data) of every backend and precision in one table:
PyTorch eager / deploy mode / bf16 autocast, ONNX Runtime, OpenVINO fp32 / bf16 / int8, or one exported artifact."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..api import load_detector
from ..config import AMP_MODES, ModelConfig, native_bf16
from ..engine.evaluation import evaluate
from ..export.openvino import is_openvino
from ..export.quantize import DEFAULT_SPLIT, SPLITS
from ..inference.benchmark import (
    FLOPS_NOTE, benchmark_model, count_flops, count_parameters, format_table, time_interleaved,
)  # fmt: skip
from ..models.rtdetr import RTDETRModel
from .arguments import add_device, add_image_size, add_model_arguments, resolve_device
from .export import pytorch_model


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.weights and (Path(args.weights).suffix.lower() == ".onnx" or is_openvino(args.weights)):
        result = benchmark_artifact(args)
    else:
        model = pytorch_model(args, device=device)
        size = args.img_size or tuple(model.config.image_size)
        amp = ("bf16" if native_bf16(device) else "off") if args.amp == "auto" else args.amp
        calibration = (args.calibration or args.data or random_images(size)) if args.int8 else None
        result = benchmark_model(model, size, args.batch_size, device, args.runs, args.warmup, amp=amp,
                                 int8_calibration=calibration, int8_split=args.int8_split, data=args.data)  # fmt: skip
    print(format_table(result))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1))
        print(f"written {args.output}")
    return 0


def random_images(size: tuple[int, int], count: int = 16) -> list[torch.Tensor]:
    """int8 calibration images for a latency-only run (no --calibration, no --data): int8 kernels' speed does not
    depend on the calibrated ranges, their accuracy does (give --data to measure it)."""
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(3, *size, generator=generator) for _ in range(count)]


def benchmark_artifact(args: argparse.Namespace) -> dict:
    """One exported artifact (.onnx or OpenVINO IR) as it was exported: its latency, and AP with --data."""
    detector = load_detector(args.weights)
    network = RTDETRModel(ModelConfig(**json.loads(detector.metadata["model_config"])))
    size = detector.image_size
    images = torch.rand(args.batch_size, 3, *size, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[size[1], size[0]]] * args.batch_size)
    name = f"{args.weights} ({detector.metadata.get('precision', 'fp32')})"
    timing = time_interleaved({name: lambda: detector.run(images, sizes)}, args.runs, args.warmup)[name]
    ap = {name: evaluate(detector, args.data, "val", verbose=False)["AP"]} if args.data else {}
    return {
        "model": network.describe(), "image_size": list(size), "batch_size": args.batch_size, "device": "cpu",
        "torch_threads": torch.get_num_threads(), "params": count_parameters(network),
        "gflops": count_flops(network, images[:1]) / 1e9, "flops_note": FLOPS_NOTE + ", batch 1",
        "latency": {name: timing.summary()}, "max_diff_vs_eager": {}, "kernels": {}, "ap": ap,
    }  # fmt: skip


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="params, GFLOPs, latency (and AP) of every backend and precision",
                       description="One table: PyTorch eager, deploy mode and bf16 autocast, ONNX Runtime, OpenVINO "
                       "fp32 / bf16 / int8, the same random batch, runs interleaved; with --data the AP of each on "
                       "the val split. --weights model.onnx or an OpenVINO IR benchmarks that artifact alone.")  # fmt: skip
    add_model_arguments(p, onnx=True)
    add_device(p)
    p.add_argument("--amp", default="auto", choices=("auto", *AMP_MODES),
                   help="bf16 rows (PyTorch autocast, OpenVINO bf16): auto (default) adds them where bf16 runs "
                   "natively (CPUs with AVX512-BF16 or AMX, CUDA), not where it is emulated")  # fmt: skip
    add_image_size(p)
    p.add_argument("--int8", action="store_true", help="add an OpenVINO int8 row (NNCF; the rtdetr[int8] extra)")
    p.add_argument("--calibration", metavar="DIR", help="int8 calibration images (default: --data, else random)")
    p.add_argument("--int8-split", default=DEFAULT_SPLIT, choices=sorted(SPLITS), help="default: %(default)s")
    p.add_argument("--data", help="dataset folder: add each row's COCO AP on its val split")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--runs", type=int, default=10, help="timed runs per backend (interleaved)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, help="CPU threads for torch, ONNX Runtime and OpenVINO (default: all)")
    p.add_argument("--output", help="write the results as JSON here")
    p.set_defaults(func=run)
