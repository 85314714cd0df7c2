"""The interface every inference backend offers: `predict` as `RTDETR.predict` defines it.

Backends: `rtdetr.RTDETR` (PyTorch, any device), `inference.onnxruntime.OnnxDetector` (an exported .onnx graph)
and `inference.openvino.OpenVinoDetector` (an exported OpenVINO IR).
`rtdetr.load_detector(weights)` picks one from the weights file.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from ..data.images import ImageInput
from ..postprocess import Detections


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
