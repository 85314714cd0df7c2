"""int8 post-training quantisation of an exported RT-DETR with NNCF: an OpenVINO IR or a QDQ ONNX graph.

    export_int8(model, "model_int8", calibration="datasets/mine")        # OpenVINO IR, the default split
    export_int8(model, "model_int8.onnx", calibration="photos/", fmt="onnx", split="decoder-float")

Naive int8 breaks DETRs: the decoder's sampling offsets and attention weights become sampling positions and
mixing weights, where a quantisation step moves the sampled point; the score heads and query selection rank
300 of thousands of tokens by small logit differences; the box refinement adds deltas in inverse-sigmoid space.
A `Split` says what stays in float; `SPLITS` are the ones measured (benchmarks/RESULTS.md). NNCF's
transformer mode (SmoothQuant, no quantised softmax / layer-norm inputs) is on for all but "all".

The calibration set is `calibration_images` of a folder of images or of a dataset folder (train split, else
val), preprocessed as at inference.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import openvino as ov
import torch

from ..data.datasets import detect_layout, open_split
from ..data.images import to_model_input
from ..data.transforms import eval_transforms
from ..data.yolo import IMAGE_SUFFIXES
from ..models.rtdetr import RTDETRModel
from .onnx import INPUT_NAMES, export_onnx, read_metadata
from .openvino import openvino_model, save_ir

CALIBRATION_IMAGES = 300

# Node-name patterns of the decoder's sensitive parts (the ONNX export's names, which OpenVINO keeps).
SAMPLING = r".*/decoder/decoder/layers\.\d+/cross_attn/(sampling_offsets|attention_weights)/.*"
HEADS = r".*/decoder/decoder/(dec_score_head|dec_bbox_head)\.\d+/.*"
QUERY_SELECTION = r".*/decoder/(enc_output|enc_score_head|enc_bbox_head)/.*"
DECODER = r".*/model/decoder/.*"


@dataclass(frozen=True)
class Split:
    """What is quantised: NNCF's transformer mode or not, and the node-name patterns kept in float."""

    description: str
    transformer: bool
    float_patterns: tuple[str, ...] = ()


SPLITS = {
    "all": Split("everything int8, NNCF's default mode", transformer=False),
    "transformer": Split("everything int8, NNCF's transformer mode", transformer=True),
    "decoder-heads-float": Split(
        "backbone, encoder and the decoder's projections / FFNs int8; sampling offsets, attention weights, "
        "score and box heads and query selection float", transformer=True,
        float_patterns=(SAMPLING, HEADS, QUERY_SELECTION),
    ),
    "decoder-float": Split("backbone and encoder int8, the whole decoder float", transformer=True,
                           float_patterns=(DECODER,)),
}  # fmt: skip
DEFAULT_SPLIT = "decoder-heads-float"


def nncf_module():
    """NNCF, or an error that says how to install it (it is the optional `int8` extra)."""
    try:
        import nncf
    except ImportError as error:
        raise ValueError("int8 export needs NNCF: pip install 'rtdetr[int8]' (or pip install nncf)") from error
    logging.getLogger("nncf").setLevel(logging.WARNING)  # NNCF logs one INFO line per layer kept in float
    return nncf


def calibration_images(
    source: str | Path, image_size: tuple[int, int], count: int = CALIBRATION_IMAGES
) -> list[torch.Tensor]:
    """Up to `count` images [3, H, W] in [0, 1], resized to `image_size` as at inference, evenly spaced over a
    dataset folder's train split (val if it has none) or over a folder of images (recursively, sorted)."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"calibration folder not found: {source} (give a folder of images or a dataset)")
    try:
        detect_layout(source)
    except FileNotFoundError:
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise FileNotFoundError(f"{source} holds no images ({', '.join(IMAGE_SUFFIXES)}) and is no dataset")
        return [to_model_input(files[i], image_size)[0] for i in _spread(len(files), count)]
    try:
        dataset = open_split(source, "train", eval_transforms(image_size))
    except FileNotFoundError:
        dataset = open_split(source, "val", eval_transforms(image_size))
    return [dataset[i][0] for i in _spread(len(dataset), count)]


def _spread(total: int, count: int) -> list[int]:
    return sorted({int(i) for i in np.linspace(0, total - 1, min(count, total))}) if total else []


def quantize_graph(graph, images: Sequence[torch.Tensor], split: str):
    """The int8 twin of `graph` (an `ov.Model` or an `onnx.ModelProto`; NNCF picks the backend), calibrated on
    `images` one at a time."""
    if split not in SPLITS:
        raise ValueError(f"unknown int8 split {split!r}; available: {', '.join(SPLITS)}")
    if not images:
        raise ValueError("int8 calibration needs at least one image")
    nncf = nncf_module()
    chosen = SPLITS[split]
    height, width = images[0].shape[1:]

    def feeds(image: torch.Tensor) -> dict[str, np.ndarray]:
        return {INPUT_NAMES[0]: image[None].numpy(), INPUT_NAMES[1]: np.array([[width, height]], dtype=np.int64)}

    advanced = None
    if isinstance(graph, onnx.ModelProto):
        # NNCF's ONNX SmoothQuant fails on the decoder's MatMuls with computed weights (NNCF 3.4): off there.
        advanced = nncf.AdvancedQuantizationParameters(smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1))
    return nncf.quantize(
        graph, nncf.Dataset(list(images), feeds), subset_size=len(images),
        model_type=nncf.ModelType.TRANSFORMER if chosen.transformer else None,
        ignored_scope=nncf.IgnoredScope(patterns=list(chosen.float_patterns), validate=False),
        advanced_parameters=advanced,
    )  # fmt: skip


def export_int8(
    model: RTDETRModel,
    output: str | Path,
    calibration: str | Path | Sequence[torch.Tensor],
    fmt: str = "openvino",
    split: str = DEFAULT_SPLIT,
    image_size: tuple[int, int] | None = None,
    count: int = CALIBRATION_IMAGES,
    class_names: Sequence[str] | None = None,
    category_ids: Sequence[int] | None = None,
) -> Path:
    """Quantise `model` (not modified) to int8 and write it: fmt 'openvino' -> `output/model.xml` (+ .bin),
    'onnx' -> the QDQ graph `output` (ONNX Runtime). calibration: a folder (`calibration_images`) or the
    preprocessed images themselves. Returns the artifact's path; its metadata says the split."""
    size = tuple(image_size or model.config.image_size)
    images = calibration if not isinstance(calibration, (str, Path)) else calibration_images(calibration, size, count)
    class_names = class_names or getattr(model, "class_names", None)
    category_ids = category_ids or getattr(model, "category_ids", None)
    if fmt == "openvino":
        converted = openvino_model(model, size, class_names, category_ids)
        return save_ir(quantize_graph(converted, images, split), output, "int8", split)
    if fmt != "onnx":
        raise ValueError(f"int8 export writes 'openvino' or 'onnx', not {fmt!r}")
    output = Path(output)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx", size, check=False, class_names=class_names,
                           category_ids=category_ids)  # fmt: skip
        metadata = read_metadata(path)
        quantized = quantize_graph(onnx.load(str(path)), images, split)
    onnx.helper.set_model_props(quantized, {**metadata, "precision": "int8", "quantization": split})
    output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(quantized, str(output))
    return output


def quantized_layers(converted: ov.Model) -> dict[str, bool]:
    """Every Convolution / MatMul of an IR by name -> whether it computes in int8 (an input comes, through
    dequantisation and layout ops, from a FakeQuantize or an int8 constant)."""
    passthrough = {"Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze", "Squeeze"}

    def int8_source(node, depth: int = 0) -> bool:
        kind = node.get_type_name()
        if kind == "FakeQuantize" or (kind == "Constant" and node.get_element_type() in (ov.Type.i8, ov.Type.u8)):
            return True
        if kind not in passthrough or depth > 4:
            return False
        return any(int8_source(i.get_source_output().get_node(), depth + 1) for i in node.inputs())

    return {
        op.get_friendly_name(): any(int8_source(i.get_source_output().get_node()) for i in op.inputs())
        for op in converted.get_ordered_ops()
        if op.get_type_name() in ("Convolution", "MatMul", "GroupConvolution")
    }
