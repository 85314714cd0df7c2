"""`rtdetr export`: an ONNX graph (post-processor inside, checked against PyTorch) or a Hugging Face folder."""

from __future__ import annotations

import argparse
import sys

from ..api import RTDETR, load_detector
from ..export.onnx import ExportCheckError, check_onnx, export_onnx
from .arguments import add_image_size, add_model_arguments


def pytorch_model(args: argparse.Namespace, device: str) -> RTDETR:
    """The PyTorch model of --weights / --preset in eval mode (not deployed: export and bench deploy copies)."""
    model = load_detector(args.weights, args.preset, args.decoder_layers, device, deploy=False,
                          cross_attn_method=args.cross_attn_method)
    if not isinstance(model, RTDETR):
        raise ValueError(f"{args.weights}: `rtdetr {args.command}` needs PyTorch weights, not an .onnx file")
    return model


def run(args: argparse.Namespace) -> int:
    model = pytorch_model(args, device="cpu")
    if args.format == "hf":
        model.save_pretrained(args.output)
        print(f"wrote the Hugging Face folder {args.output} (config.json + model.safetensors)")
        return 0
    path = export_onnx(model, args.output, args.img_size, args.opset, batch_size_dynamic=not args.static_batch,
                       check=False)  # fmt: skip
    print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB, opset {args.opset})")
    try:
        print(check_onnx(path, model))
    except ExportCheckError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export to ONNX (checked against PyTorch) or a Hugging Face folder",
                       description="onnx: the network and its top-K post-processor in one graph (inputs images, "
                       "orig_target_sizes; outputs labels, boxes, scores), run in ONNX Runtime and compared with "
                       "PyTorch before success. hf: config.json + model.safetensors for transformers' "
                       "RTDetrForObjectDetection.")  # fmt: skip
    add_model_arguments(p)
    p.add_argument("--format", default="onnx", choices=["onnx", "hf"], help="default: %(default)s")
    p.add_argument("--output", default="model.onnx", help="file (onnx) or folder (hf); default: %(default)s")
    add_image_size(p, "the graph's fixed input size")
    p.add_argument("--opset", type=int, default=17, help="default: %(default)s")
    p.add_argument("--static-batch", action="store_true", help="fix the batch axis at 1 (default: dynamic)")
    p.set_defaults(func=run)
