"""OpenVINO IR export: our ONNX graph (post-processor inside) converted to `model.xml` + `model.bin`.

    export_openvino(model, "model_ov")                      # fp32, metadata, OpenVINO self-check
    export_openvino(model, "model_ov_bf16", precision="bf16")

The IR has the ONNX export's contract (inputs `images`, `orig_target_sizes`; outputs `labels`, `boxes`,
`scores`; dynamic batch axis, fixed H x W) and its metadata, stored in the IR's rt_info under "rtdetr".
`compile_ir` is the one place an OpenVINO model is compiled (the self-check here, the OpenVINO backend, the
benchmark and the quantiser).

Precision is explicit because OpenVINO changes it silently in two places: `save_model` compresses weights to
fp16 unless told not to, and the CPU plugin runs bf16 on any CPU with bf16 instructions (AVX512-BF16 or AMX)
unless `INFERENCE_PRECISION_HINT` says f32. Measured on random r18vd weights: 0/100 of the fp32 reference
detections reproduced until both were turned off. So the artifact stores its precision ("precision" in the
metadata) and `compile_ir` sets the hint from it:
  fp32  fp32 weights, f32 inference (the default; held to the ONNX export's tolerances)
  bf16  fp32 weights, bf16 inference (CPUs with AVX512-BF16 or AMX)
  fp16  fp16 weights (half the file), f16 inference where the CPU has it (AVX512-FP16 / AMX-FP16); elsewhere
        OpenVINO runs it in bf16 (or f32): `runtime_precision` says what ran
  int8  quantised by `export.quantize` (NNCF); the layers left in float run f32
Converting the PyTorch module directly (`ov.convert_model(module)`) gave the same graph speed (r18vd 640,
2 threads: 302 vs 313 ms) and outputs; the ONNX route keeps one traced graph for both runtimes.
"""

from __future__ import annotations

import collections
import functools
import json
import tempfile
from pathlib import Path
from typing import Sequence

import openvino as ov
import torch

from ..models.rtdetr import RTDETRModel
from .onnx import (
    INPUT_NAMES, OUTPUT_NAMES, ExportCheckError, OnnxCheck, compare_with_pytorch, export_onnx, read_metadata,
)  # fmt: skip

PRECISIONS = ("fp32", "bf16", "fp16")
INFERENCE_HINT = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
METADATA_KEY = "rtdetr"  # rt_info section of the metadata
IR_NAME = "model.xml"


def openvino_model(
    model: RTDETRModel,
    image_size: tuple[int, int] | None = None,
    class_names: Sequence[str] | None = None,
    category_ids: Sequence[int] | None = None,
) -> ov.Model:
    """The float OpenVINO model of `model` (not modified): our ONNX export converted, its metadata in rt_info."""
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx", image_size, check=False, class_names=class_names,
                           category_ids=category_ids)  # fmt: skip
        metadata = read_metadata(path)
        converted = ov.convert_model(str(path))
    for output, name in zip(converted.outputs, OUTPUT_NAMES):
        output.get_tensor().set_names({name})
    converted.inputs[1].get_tensor().set_names({INPUT_NAMES[1]})  # the converter adds an internal name
    for key, value in metadata.items():
        converted.set_rt_info(value, [METADATA_KEY, key])
    return converted


def save_ir(converted: ov.Model, folder: str | Path, precision: str, quantization: str | None = None) -> Path:
    """Write `folder/model.xml` + `model.bin` with `precision` recorded (fp16: weights stored in fp16)."""
    if precision not in (*PRECISIONS, "int8"):
        raise ValueError(f"precision must be one of {PRECISIONS} (or int8 through --int8), got {precision!r}")
    converted.set_rt_info(precision, [METADATA_KEY, "precision"])
    converted.set_rt_info(f"compile with INFERENCE_PRECISION_HINT={INFERENCE_HINT[precision]} (OpenVINO's CPU "
                          "default is bf16 on CPUs with bf16 instructions)", [METADATA_KEY, "inference"])  # fmt: skip
    if quantization:
        converted.set_rt_info(quantization, [METADATA_KEY, "quantization"])
    path = Path(folder) / IR_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(converted, str(path), compress_to_fp16=precision == "fp16")
    return path


def export_openvino(
    model: RTDETRModel,
    folder: str | Path,
    image_size: tuple[int, int] | None = None,
    precision: str = "fp32",
    check: bool = True,
    class_names: Sequence[str] | None = None,
    category_ids: Sequence[int] | None = None,
) -> Path:
    """Export `model` to an IR folder; returns the path of its model.xml. With `check`, the IR runs in OpenVINO
    on the bundled sample image against PyTorch (`check_openvino`; fp32 raises `ExportCheckError` beyond the
    ONNX export's tolerances)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    class_names = class_names or getattr(model, "class_names", None)
    category_ids = category_ids or getattr(model, "category_ids", None)
    path = save_ir(openvino_model(model, image_size, class_names, category_ids), folder, precision)
    if check:
        check_openvino(path, model)
    return path


@functools.cache
def openvino_core() -> ov.Core:
    """The one OpenVINO Core of the process: each Core loads its own CPU plugin with its own thread pools, and
    many of them in one process (one per exported model) crashed it (SIGSEGV) in later, unrelated work."""
    return ov.Core()


def ir_path(path: str | Path) -> Path:
    """The model.xml of an IR folder, or `path` itself if it is an .xml file. Errors name the path."""
    path = Path(path)
    xml = path / IR_NAME if path.is_dir() else path
    if xml.suffix.lower() != ".xml" or not xml.is_file():
        raise FileNotFoundError(f"OpenVINO IR not found: {xml} (give a folder with {IR_NAME} or an .xml file)")
    if not xml.with_suffix(".bin").is_file():
        raise FileNotFoundError(f"{xml} has no weights file {xml.with_suffix('.bin').name} next to it")
    return xml


def is_openvino(path: str | Path) -> bool:
    """An .xml file or a folder holding model.xml: what `ir_path` reads."""
    path = Path(path)
    return path.suffix.lower() == ".xml" or (path / IR_NAME).is_file()


def read_ir_metadata(path: str | Path) -> dict[str, str]:
    """The rtdetr metadata of an IR (as `export_metadata` plus precision, inference and quantization)."""
    xml = ir_path(path)
    converted = openvino_core().read_model(str(xml))
    if not converted.has_rt_info([METADATA_KEY, "precision"]):
        raise ValueError(f"{xml} has no rtdetr metadata: export it with `rtdetr export --format openvino`")
    section = converted.get_rt_info()[METADATA_KEY]
    return {key: converted.get_rt_info([METADATA_KEY, key]).astype(str) for key in section}


def compile_ir(
    source: str | Path | ov.Model,
    precision: str,
    batch_size: int = 1,
    threads: int | None = None,
    device: str = "cpu",
) -> ov.CompiledModel:
    """An IR (path or model) compiled for one batch size (a static shape: faster than a dynamic batch axis) with
    the inference precision of `precision` (`INFERENCE_HINT`) and `threads` (default: as many as torch uses)."""
    if device != "cpu":
        raise ValueError(f"device {device}: the OpenVINO backend runs on 'cpu' (export ONNX for CUDA)")
    core = openvino_core()
    converted = core.read_model(str(ir_path(source))) if isinstance(source, (str, Path)) else source.clone()
    height, width = converted.inputs[0].get_partial_shape()[2:].to_shape()
    converted.reshape({INPUT_NAMES[0]: [batch_size, 3, height, width], INPUT_NAMES[1]: [batch_size, 2]})
    config = {
        "INFERENCE_PRECISION_HINT": INFERENCE_HINT[precision],
        "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
        "PERFORMANCE_HINT": "LATENCY",
    }
    return core.compile_model(converted, "CPU", config)


def run_compiled(compiled: ov.CompiledModel, feeds: dict) -> list:
    """labels, boxes, scores arrays of one inference (feeds by input name)."""
    result = compiled(feeds)
    return [result[compiled.output(name)] for name in OUTPUT_NAMES]


def runtime_precision(compiled: ov.CompiledModel) -> str:
    """The inference precision the plugin chose (e.g. 'f32', 'bf16'; fp16 requested on a CPU without f16 units
    comes back as bf16)."""
    return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


def kernel_summary(compiled: ov.CompiledModel) -> str:
    """Which kernels ran for the compute-heavy layers: 'Convolution u8 brgconv_avx512_1x1 x30, ...' (layer
    type, runtime precision, primitive), from the compiled model's runtime graph."""
    counts: collections.Counter = collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str)
        if layer in ("Convolution", "FullyConnected", "MatMul"):
            counts[(layer, info["runtimePrecision"].astype(str), info["primitiveType"].astype(str))] += 1
    return ", ".join(f"{layer} {precision} {kernel} x{n}" for (layer, precision, kernel), n in counts.most_common())


def check_openvino(path: str | Path, model: RTDETRModel, image: str | Path | None = None) -> OnnxCheck:
    """Run the IR in OpenVINO on `image` (default: the bundled sample) and compare with `model` in deploy mode,
    detection by detection. fp32 is held to the ONNX export's tolerances (`ExportCheckError` beyond them);
    reduced precisions are reported (their accuracy is measured as AP: `rtdetr export --verify`)."""
    metadata = read_ir_metadata(path)
    precision = metadata["precision"]
    compiled = compile_ir(path, precision)
    size = tuple(json.loads(metadata["image_size"]))
    result = compare_with_pytorch(lambda feeds: run_compiled(compiled, feeds), size, model, image,
                                  runtime=f"OpenVINO {precision}", gated=precision == "fp32")  # fmt: skip
    if not result.passed:
        raise ExportCheckError(f"{path}: {result}")
    return result
