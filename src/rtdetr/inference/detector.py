"""The interface every inference backend offers: `predict` as `RTDETR.predict` defines it.

Backends: `rtdetr.RTDETR` (PyTorch, any device), `inference.onnxruntime.OnnxDetector` (an exported .onnx graph)
and `inference.openvino.OpenVinoDetector` (an exported OpenVINO IR).
`rtdetr.load_detector(weights)` picks one from the weights file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, Sequence

from torch import Tensor

from ..data.images import ImageInput, model_input_batches
from ..postprocess import Detections, select_detections


class Detector(Protocol):
    """Images in (paths, PIL, uint8 arrays, float tensors), per image `Detections` out: boxes [N, 4] pixel xyxy
    in the original image, scores, labels (dataset category ids) and class names, sorted by score."""

    class_names: list[str]
    category_ids: list[int]

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        score_threshold: float = 0.5,
        image_size: tuple[int, int] | None = None,
        batch_size: int = 8,
        max_detections: int = 300,
        amp: str = "off",
    ) -> list[Detections]: ...


def predict_exported(
    run: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]], path: Path, exported_size: tuple[int, int],
    images: ImageInput | Sequence[ImageInput], image_size: tuple[int, int] | None, batch_size: int,
    category_ids: list[int], class_names: list[str], score_threshold: float, max_detections: int,
) -> list[Detections]:  # fmt: skip
    """`Detector.predict` of an exported graph (ONNX Runtime, OpenVINO): `run(images, orig_sizes) -> labels,
    boxes, scores` on batches of at most `batch_size` images at the one size the graph was exported for."""
    if image_size is not None and tuple(image_size) != exported_size:
        raise ValueError(
            f"{path} was exported for {exported_size[0]}x{exported_size[1]} inputs, not "
            f"{image_size[0]}x{image_size[1]}: export again with that --img-size"
        )
    results: list[Detections] = []
    for batch, orig_sizes in model_input_batches(images, exported_size, batch_size):
        labels, boxes, scores = run(batch, orig_sizes)
        results += select_detections(labels, boxes, scores, category_ids, class_names, score_threshold, max_detections)
    return results
