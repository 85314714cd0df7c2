"""`rtdetr export`: an ONNX graph or an OpenVINO IR (post-processor inside, checked against PyTorch; fp32, bf16,
fp16 or int8, optionally held to an AP gate on a validation split) or a Hugging Face folder."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ..api import RTDETR, load_detector
from ..engine.evaluation import evaluate
from ..export.onnx import (
    OUTPUT_NAMES, ExportCheckError, OnnxCheck, check_onnx, compare_with_pytorch, export_onnx, onnx_session,
)  # fmt: skip
from ..export.openvino import PRECISIONS, check_openvino, export_openvino
from ..export.quantize import CALIBRATION_IMAGES, DEFAULT_SPLIT, SPLITS, export_int8
from .arguments import add_image_size, add_model_arguments

DEFAULT_OUTPUT = {"onnx": "model.onnx", "openvino": "model_openvino", "hf": "hf_model"}


def pytorch_model(args: argparse.Namespace, device: str) -> RTDETR:
    """The PyTorch model of --weights / --preset in eval mode (not deployed: export and bench deploy copies)."""
    model = load_detector(args.weights, args.preset, args.decoder_layers, device, deploy=False,
                          cross_attn_method=args.cross_attn_method)  # fmt: skip
    if not isinstance(model, RTDETR):
        raise ValueError(f"{args.weights}: `rtdetr {args.command}` needs PyTorch weights, not an exported model")
    return model


def run(args: argparse.Namespace) -> int:
    model = pytorch_model(args, device="cpu")
    output = Path(args.output or DEFAULT_OUTPUT[args.format])
    if args.format == "hf":
        model.save_pretrained(output)
        print(f"wrote the Hugging Face folder {output} (config.json + model.safetensors)")
        return 0
    precision = "int8" if args.int8 else args.precision
    path = export_artifact(model, args, output, precision)
    print(f"exported {path} ({artifact_bytes(path) / 1e6:.1f} MB, {args.format} {precision})")
    try:
        print(self_check(path, model, args.format, precision))
    except ExportCheckError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.verify and not verify(path if args.format == "onnx" else output, model, args):
        return 1
    return 0


def export_artifact(model: RTDETR, args: argparse.Namespace, output: Path, precision: str) -> Path:
    """Write the ONNX file or IR folder; returns the path of the graph file."""
    if args.format == "onnx" and precision not in ("fp32", "int8"):
        raise ValueError(f"--precision {precision}: an ONNX export is fp32 (or --int8); use --format openvino")
    if precision == "int8":
        calibration = args.calibration or args.verify
        if calibration is None:
            raise ValueError("--int8 needs --calibration DIR (a folder of images or a dataset folder) or --verify DATA")
        return export_int8(model, output, calibration, args.format, args.int8_split, args.img_size,
                           args.calibration_images)  # fmt: skip
    if args.format == "openvino":
        return export_openvino(model, output, args.img_size, precision, check=False)
    return export_onnx(model, output, args.img_size, args.opset, batch_size_dynamic=not args.static_batch,
                       check=False)  # fmt: skip


def self_check(path: Path, model: RTDETR, fmt: str, precision: str) -> OnnxCheck:
    """The artifact against PyTorch on the sample image: fp32 within the tolerances, else reported."""
    if fmt == "openvino":
        return check_openvino(path, model)
    if precision == "fp32":
        return check_onnx(path, model)
    session = onnx_session(path)
    size = tuple(session.get_inputs()[0].shape[2:])
    return compare_with_pytorch(lambda feeds: session.run(OUTPUT_NAMES, feeds), size, model,
                                runtime=f"ONNX Runtime {precision}", gated=False)  # fmt: skip


def verify(artifact: Path, model: RTDETR, args: argparse.Namespace) -> bool:
    """COCO AP of the artifact and of the PyTorch model on --verify's split; over --max-ap-drop the artifact is
    renamed `<name>.rejected` and False returned."""
    detector = load_detector(artifact)
    reference = evaluate(model, args.verify, args.verify_split, image_size=detector.image_size, device="cpu",
                         verbose=False, class_names=model.class_names, category_ids=model.category_ids)  # fmt: skip
    got = evaluate(detector, args.verify, args.verify_split, verbose=False)
    change = (got["AP"] - reference["AP"]) * 100  # in AP points (AP x 100)
    drop = -change
    print(f"AP on {args.verify} ({args.verify_split}): PyTorch fp32 {reference['AP']:.4f}, {artifact} "
          f"{got['AP']:.4f}, change {change:+.2f} AP points (AP50 {reference['AP50']:.4f} -> {got['AP50']:.4f})")  # fmt: skip
    if drop <= args.max_ap_drop:
        return True
    rejected = artifact.with_name(artifact.name + ".rejected")
    if rejected.is_dir():
        shutil.rmtree(rejected)
    elif rejected.exists():
        rejected.unlink()
    artifact.rename(rejected)
    print(f"error: {artifact} loses {drop:.2f} AP points, more than --max-ap-drop {args.max_ap_drop:g}: rejected and "
          f"kept as {rejected}. Try another --int8-split or --precision, or more --calibration images.",
          file=sys.stderr)  # fmt: skip
    return False


def artifact_bytes(path: Path) -> int:
    """The graph file's size, with an IR's weights file."""
    weights = path.with_suffix(".bin")
    return path.stat().st_size + (weights.stat().st_size if path.suffix == ".xml" and weights.exists() else 0)


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export to ONNX or OpenVINO (checked against PyTorch, optionally int8 and "
                       "AP-gated) or a Hugging Face folder",
                       description="onnx / openvino: the network and its top-K post-processor in one graph (inputs "
                       "images, orig_target_sizes; outputs labels, boxes, scores), run in ONNX Runtime / OpenVINO and "
                       "compared with PyTorch before success. --verify DATA measures the artifact's COCO AP against "
                       "PyTorch's and rejects it beyond --max-ap-drop. hf: config.json + model.safetensors for "
                       "transformers' RTDetrForObjectDetection.")  # fmt: skip
    add_model_arguments(p)
    p.add_argument("--format", default="onnx", choices=["onnx", "openvino", "hf"], help="default: %(default)s")
    p.add_argument("--output", help="file (onnx) or folder (openvino, hf); default: model.onnx, model_openvino/, "
                   "hf_model/")  # fmt: skip
    add_image_size(p, "the graph's fixed input size")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="openvino: fp32 (default; f32 weights and inference), bf16 (bf16 inference), fp16 (fp16 "
                   "weights; f16 inference where the CPU has it)")  # fmt: skip
    p.add_argument("--int8", action="store_true", help="int8 post-training quantisation (NNCF; the rtdetr[int8] extra)")
    p.add_argument("--calibration", metavar="DIR",
                   help="int8 calibration images: a folder of images or a dataset folder (its train split, else val); "
                   "default: the --verify dataset")  # fmt: skip
    p.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES, metavar="N",
                   help="calibration images used, evenly spaced (default: %(default)s)")  # fmt: skip
    p.add_argument("--int8-split", default=DEFAULT_SPLIT, choices=sorted(SPLITS),
                   help="what is quantised (default: %(default)s): " + "; ".join(f"{k}: {v.description}"
                   for k, v in SPLITS.items()))  # fmt: skip
    p.add_argument("--verify", metavar="DATA", help="dataset folder: COCO AP of the artifact vs PyTorch on its split")
    p.add_argument("--verify-split", default="val", help="default: %(default)s")
    p.add_argument("--max-ap-drop", type=float, default=1.0, metavar="POINTS",
                   help="with --verify: reject (non-zero exit, artifact renamed .rejected) beyond this AP drop in "
                   "AP points (default: %(default)s)")  # fmt: skip
    p.add_argument("--opset", type=int, default=17, help="default: %(default)s")
    p.add_argument("--static-batch", action="store_true", help="fix the ONNX batch axis at 1 (default: dynamic)")
    p.set_defaults(func=run)
