"""Running an exported `.onnx` model in ONNX Runtime with the same `predict` as `RTDETR`.

    detector = OnnxDetector("model.onnx")
    dets = detector.predict(["a.jpg", pil_image], score_threshold=0.5)   # list[Detections], pixel xyxy

Class names, category ids and the input size are read from the model's metadata (written by `export_onnx`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..data.images import ImageInput
from ..export.onnx import INPUT_NAMES, OUTPUT_NAMES, onnx_session
from ..postprocess import Detections
from .detector import predict_exported


class OnnxDetector:
    """An exported RT-DETR (graph with the top-K post-processor inside) behind `RTDETR.predict`'s interface."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None) -> None:
        self.path = Path(path)
        self.session = onnx_session(self.path, device, threads)
        names = [i.name for i in self.session.get_inputs()]
        if names != INPUT_NAMES:
            raise ValueError(f"{self.path} has inputs {names}; an rtdetr export has {INPUT_NAMES}")
        metadata = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in ("class_names", "category_ids", "image_size") if k not in metadata]
        if missing:
            raise ValueError(f"{self.path} lacks the metadata {missing}: export it with `rtdetr export`")
        self.class_names: list[str] = json.loads(metadata["class_names"])
        self.category_ids: list[int] = json.loads(metadata["category_ids"])
        self.image_size: tuple[int, int] = tuple(json.loads(metadata["image_size"]))  # type: ignore[assignment]
        self.metadata = dict(metadata)
        batch = self.session.get_inputs()[0].shape[0]
        self.max_batch = batch if isinstance(batch, int) else None  # None: dynamic batch axis

    def run(self, images: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The raw graph: images [N, 3, H, W] float, orig_sizes [N, 2] (width, height) -> labels, boxes, scores."""
        feeds = {"images": images.float().numpy(), "orig_target_sizes": orig_sizes.to(torch.int64).numpy()}
        labels, boxes, scores = self.session.run(OUTPUT_NAMES, feeds)
        return torch.from_numpy(labels), torch.from_numpy(boxes), torch.from_numpy(scores)

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        score_threshold: float = 0.5,
        image_size: tuple[int, int] | None = None,
        batch_size: int = 8,
        max_detections: int = 300,
        amp: str = "off",
    ) -> list[Detections]:
        """As `RTDETR.predict`: per image, boxes [N, 4] pixel xyxy in the original image, scores, labels
        (dataset category ids) and class names, sorted by score. `image_size` can only be the exported size,
        `amp` only 'off' (the graph's precision is fixed at export)."""
        if amp != "off":
            raise ValueError(f"{self.path}: amp={amp!r} applies to PyTorch weights; an ONNX graph runs as exported")
        step = min(batch_size, self.max_batch or batch_size)
        return predict_exported(self.run, self.path, self.image_size, images, image_size, step,
                                self.category_ids, self.class_names, score_threshold, max_detections)  # fmt: skip
