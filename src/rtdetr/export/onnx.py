"""ONNX export with the post-processor inside the graph (the official `tools/export_onnx.py` contract).

    export_onnx(model, "model.onnx")   # deploy-mode copy, legacy exporter, metadata, ONNX Runtime self-check

`onnx_session` is the one place an ONNX Runtime session is opened (the self-check here, the ONNX Runtime
backend and the benchmark in `inference`).

Graph inputs:  images float32 [N, 3, H, W] RGB in [0, 1] (resized to H x W ignoring aspect ratio, no
               mean/std), orig_target_sizes int64 [N, 2] as (width, height) of the original images.
Graph outputs: labels int64 [N, K] contiguous 0..C-1 (map them with the `category_ids` metadata),
               boxes float32 [N, K, 4] pixel x1,y1,x2,y2 in the original image, scores float32 [N, K],
               K = min(300, queries x classes), sorted by score. No threshold, no NMS.
The spatial size H x W is fixed at export (anchors and position embeddings are constants of the graph); the
batch axis N is dynamic. Class names, category ids, image size, preprocessing and the resolved model config
are stored in the model's `metadata_props`.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ..config import ModelConfig, config_dict
from ..data.images import model_input_batches
from ..models.rtdetr import RTDETRModel
from ..postprocess import topk_detections

logger = logging.getLogger(__name__)

INPUT_NAMES = ["images", "orig_target_sizes"]
OUTPUT_NAMES = ["labels", "boxes", "scores"]
# Self-check tolerances: scores absolute; boxes relative to the image size (1e-4 * max(W, H) pixels), the same
# float32 budget as the scores once boxes are expressed in normalised coordinates.
SCORE_TOLERANCE = 1e-4
BOX_TOLERANCE = 1e-4
DISCRETE_TOLERANCE, MIN_TWIN_SHARE = 1e-3, 0.95  # discrete sampling: see `twin_share`
REDUCED_TOLERANCE = 1e-2  # the twin share reported (not gated) for a bf16 / fp16 / int8 graph


class ExportCheckError(RuntimeError):
    """The exported model's runtime (ONNX Runtime, OpenVINO) disagrees with PyTorch."""


class EndToEndDetector(nn.Module):
    """forward(images, orig_target_sizes) -> (labels, boxes, scores): the network and the top-K
    post-processor (`topk_detections`) in one module, what is exported (the official deploy wrapper)."""

    def __init__(self, model: nn.Module, num_top: int = 300) -> None:
        super().__init__()
        self.model = model
        self.num_top = num_top

    def forward(self, images: Tensor, orig_target_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model(images)
        return topk_detections(out["pred_logits"], out["pred_boxes"], orig_target_sizes, self.num_top)


@dataclass
class OnnxCheck:
    """An exported graph's runtime (ONNX Runtime, OpenVINO) vs PyTorch on one image: matched max abs differences and their tolerances."""

    image: str
    compared: int  # detections compared (those safely inside the top-K on both sides)
    max_score_diff: float
    max_box_diff_px: float
    score_tolerance: float
    box_tolerance_px: float
    twin_share: float | None = None  # discrete sampling: the share of detections with a twin (`twin_share`)
    twin_tolerance: float = DISCRETE_TOLERANCE
    runtime: str = "ONNX Runtime"
    gated: bool = True  # False for reduced precision (bf16, fp16, int8): reported here, judged by AP (--verify)

    @property
    def passed(self) -> bool:
        if not self.gated:
            return True
        if self.twin_share is not None:
            return self.twin_share >= MIN_TWIN_SHARE
        return self.max_score_diff <= self.score_tolerance and self.max_box_diff_px <= self.box_tolerance_px

    def __str__(self) -> str:
        verdict = ("passed" if self.passed else "FAILED") if self.gated else "reported, not held to the fp32 tolerances"
        text = (
            f"{self.runtime} vs PyTorch on {self.image}: {verdict} ({self.compared} matched detections; "
            f"max |score diff| {self.max_score_diff:.2e} (tol {self.score_tolerance:.0e}), "
            f"max |box diff| {self.max_box_diff_px:.2e} px (tol {self.box_tolerance_px:.2e} px))"
        )
        if self.twin_share is not None:
            what = "discrete sampling" if self.gated else "reduced precision"
            text += f"; {what}: {self.twin_share:.1%} of the detections within {self.twin_tolerance:.0e}"
            text += f" (needs {MIN_TWIN_SHARE:.0%})" if self.gated else "; judge its accuracy by AP (--verify)"
        return text


def twin_share(expected: list[Tensor], got: list[Tensor], box_scale: float, tolerance: float) -> float:
    """The share of the detections in `got` (labels [K], boxes [K, 4], scores [K]) that have a twin in `expected`:
    the same label, and score and box (divided by box_scale) within `tolerance`.

    Discrete (nearest-cell) sampling is discontinuous: a sampling location within float noise of a cell border
    can land in the other cell in another runtime, which moves that query's outputs and, through self-attention,
    the others' slightly. A discrete model's export is therefore judged by this share, not by the largest
    difference (measured on random r18vd weights: 79-100% of an image's detections within 1e-4, >= 99% within
    1e-3)."""
    (labels_a, boxes_a, scores_a), (labels_b, boxes_b, scores_b) = (
        [t.detach().double().cpu() for t in detections] for detections in (expected, got)
    )
    twin = (
        (labels_b[:, None] == labels_a[None, :])
        & ((scores_b[:, None] - scores_a[None, :]).abs() <= tolerance)
        & ((boxes_b[:, None] - boxes_a[None, :]).abs().amax(-1) <= tolerance * box_scale)
    )
    return twin.any(1).double().mean().item()


def deployed_copy(model: nn.Module) -> nn.Module:
    """A CPU copy of `model` in deploy mode (RepVGG fused, BatchNorm folded); `model` itself is untouched."""
    return copy.deepcopy(model).cpu().deploy()


def export_onnx(
    model: RTDETRModel,
    path: str | Path,
    image_size: tuple[int, int] | None = None,
    opset: int = 17,
    batch_size_dynamic: bool = True,
    check: bool = True,
    class_names: Sequence[str] | None = None,
    category_ids: Sequence[int] | None = None,
) -> Path:
    """Export `model` (any mode; it is not modified) to `path`; returns the path.

    image_size (H, W), multiples of 32, defaults to the model's. With `check`, ONNX Runtime is run on the
    bundled sample image and compared with PyTorch (`check_onnx`): an `ExportCheckError` is raised if they differ.
    class_names / category_ids go into the metadata (default: the model's own attributes, as an RTDETR has).
    """
    path = Path(path)
    size = tuple(image_size or model.config.image_size)
    if size[0] % 32 or size[1] % 32:
        raise ValueError(f"image_size must be multiples of 32, got {size}")
    detector = EndToEndDetector(deployed_copy(model)).eval()
    example = (torch.rand(1, 3, *size), torch.tensor([[size[1], size[0]]], dtype=torch.int64))
    dynamic_axes = {name: {0: "N"} for name in INPUT_NAMES + OUTPUT_NAMES} if batch_size_dynamic else None
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing turns the spatial sizes into constants (the graph is for one H x W, as the official export):
        # the tracer's warnings about it are expected.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The legacy TorchScript exporter, on purpose (it warns that it is deprecated): torch 2.14 defaults to the
        # dynamo one, which needs onnxscript and which the official code never targeted.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            detector, example, str(path), input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
            dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True, dynamo=False,
        )  # fmt: skip
    proto = onnx.load(str(path))
    class_names = list(class_names or getattr(model, "class_names", None) or range(model.config.num_classes))
    category_ids = list(category_ids or getattr(model, "category_ids", None) or range(model.config.num_classes))
    onnx.helper.set_model_props(proto, export_metadata(model.config, class_names, category_ids, size))
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))
    if check:
        logger.info("%s", check_onnx(path, model))
    return path


def export_metadata(
    config: ModelConfig, class_names: list, category_ids: list, image_size: tuple[int, int]
) -> dict[str, str]:
    """The `metadata_props` of an exported model: everything needed to use it without this package."""
    height, width = image_size
    return {
        "class_names": json.dumps([str(n) for n in class_names]),
        "category_ids": json.dumps([int(i) for i in category_ids]),
        "image_size": json.dumps([height, width]),
        "preprocessing": f"RGB, resize to {height}x{width} (HxW) ignoring aspect ratio, /255, no mean/std",
        "inputs": "images float32 [N,3,H,W]; orig_target_sizes int64 [N,2] as (width, height)",
        "outputs": "labels int64 [N,K] 0..C-1 (index into class_names/category_ids); "
        "boxes float32 [N,K,4] pixel xyxy in the original image; scores float32 [N,K], sorted",
        "model_config": json.dumps(config_dict(config)),
        "producer": "rtdetr",
    }


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `metadata_props` of an ONNX file as a dict (without loading the weights)."""
    proto = onnx.load(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in proto.metadata_props}


def sample_image() -> Path:
    """The synthetic sample image shipped with the package (the self-check input)."""
    return Path(str(resources.files("rtdetr") / "assets" / "sample.jpg"))


def check_onnx(path: str | Path, model: RTDETRModel, image: str | Path | None = None) -> OnnxCheck:
    """Run the exported model in ONNX Runtime on `image` (default: the bundled sample) and compare with
    `model` in deploy mode, detection by detection. Raises `ExportCheckError` beyond the tolerances."""
    session = onnx_session(path)
    size = tuple(session.get_inputs()[0].shape[2:])
    result = compare_with_pytorch(lambda feeds: session.run(OUTPUT_NAMES, feeds), size, model, image)
    if not result.passed:
        raise ExportCheckError(f"{path}: {result}")
    return result


def compare_with_pytorch(
    run: Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]],
    image_size: tuple[int, int],
    model: RTDETRModel,
    image: str | Path | None = None,
    runtime: str = "ONNX Runtime",
    gated: bool = True,
) -> OnnxCheck:
    """An exported graph's `run` (feeds by input name -> labels, boxes, scores arrays) against `model` in deploy
    mode on `image` (default: the bundled sample) at `image_size`, detection by detection (`matched_max_diff`)."""
    image = Path(image or sample_image())
    images, sizes = next(model_input_batches(image, image_size, 1))
    with torch.no_grad():
        expected = EndToEndDetector(deployed_copy(model)).eval()(images, sizes)
    got = run({"images": images.numpy(), "orig_target_sizes": sizes.numpy()})
    scale = float(sizes.max())
    compared, score_diff, box_diff = matched_max_diff(
        [t[0] for t in expected], [torch.from_numpy(a[0]) for a in got], box_scale=scale
    )
    share, tolerance = None, DISCRETE_TOLERANCE if gated else REDUCED_TOLERANCE
    if model.config.cross_attn_method == "discrete" or not gated:
        share = twin_share([t[0] for t in expected], [torch.from_numpy(a[0]) for a in got], scale, tolerance)
    return OnnxCheck(str(image), compared, score_diff, box_diff * scale, SCORE_TOLERANCE, BOX_TOLERANCE * scale,
                     share, tolerance, runtime, gated)  # fmt: skip


def matched_max_diff(
    expected: list[Tensor],
    got: list[Tensor],
    box_scale: float = 1.0,
    score_tolerance: float = SCORE_TOLERANCE,
    box_tolerance: float = BOX_TOLERANCE,
) -> tuple[int, float, float]:
    """Max |score diff| and max |box diff| / box_scale between two top-K detection lists of one image,
    each (labels [K], boxes [K, 4], scores [K]), after matching detections one to one.

    Near-tied scores may come out in another order, so detections are paired by an optimal assignment on
    label-consistent (score, box) distance. At the top-K cut-off a near-tie can also swap a detection for one
    just outside the top-K: pairs that disagree while both scores are within 2 * score_tolerance of their
    list's lowest score (and of each other) are left out. Returns (pairs compared, max score diff, max
    normalised box diff); a label mismatch elsewhere, or fewer detections in `got`, counts as inf.
    """
    (labels_a, boxes_a, scores_a), (labels_b, boxes_b, scores_b) = (
        [t.detach().double().cpu() for t in detections] for detections in (expected, got)
    )
    score_cost = (scores_a[:, None] - scores_b[None, :]).abs()
    box_cost = (boxes_a[:, None, :] - boxes_b[None, :, :]).abs().amax(-1) / box_scale
    label_mismatch = labels_a[:, None] != labels_b[None, :]
    rows, cols = linear_sum_assignment((score_cost + box_cost + label_mismatch.double() * 1e6).numpy())
    if len(rows) < len(scores_a):
        return len(rows), float("inf"), float("inf")
    score_diff, box_diff, mismatch = score_cost[rows, cols], box_cost[rows, cols], label_mismatch[rows, cols]
    agree = ~mismatch & (score_diff <= score_tolerance) & (box_diff <= box_tolerance)
    at_cut = (
        (scores_a[rows] <= scores_a.min() + 2 * score_tolerance)
        & (scores_b[cols] <= scores_b.min() + 2 * score_tolerance)
        & (score_diff <= 3 * score_tolerance)  # both near-tied with the cut-off, whose scores differ by <= tol
    )
    keep = agree | ~at_cut
    if not keep.any():
        return 0, 0.0, 0.0
    if mismatch[keep].any():
        return int(keep.sum()), float("inf"), float("inf")
    return int(keep.sum()), score_diff[keep].max().item(), box_diff[keep].max().item()


def onnx_session(path: str | Path, device: str = "cpu", threads: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session of `path` with its default options (thread spinning on, as users run it) and
    `threads` intra-op threads (default: as many as torch uses). Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    try:
        return ort.InferenceSession(str(path), options, providers=providers_for(device))
    except Exception as error:  # ORT raises its own exception types for unreadable graphs
        raise ValueError(f"cannot load ONNX model {path}: {error}") from error


def providers_for(device: str) -> list[str | tuple[str, dict]]:
    """ONNX Runtime execution providers for a torch-style device string ('cpu', 'cuda', 'cuda:0')."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError(
                f"device {device}: this onnxruntime has no CUDA provider (available: {ort.get_available_providers()}); "
                "install onnxruntime-gpu or use --device cpu"
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    raise ValueError(f"device {device}: ONNX Runtime runs on 'cpu' or 'cuda[:i]'")
