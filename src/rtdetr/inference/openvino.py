"""Running an exported OpenVINO IR with the same `predict` as `RTDETR`.

    detector = OpenVinoDetector("model_ov")          # a folder with model.xml, or the .xml file
    dets = detector.predict(["a.jpg", pil_image], score_threshold=0.5)   # list[Detections], pixel xyxy

Class names, category ids, the input size and the precision are read from the IR's metadata (written by
`export_openvino` / `export.quantize`); the inference precision is set from it, never OpenVINO's default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import openvino as ov
import torch
from torch import Tensor

from ..data.images import ImageInput
from ..export.openvino import compile_ir, ir_path, openvino_core, read_ir_metadata, run_compiled
from ..postprocess import Detections
from .detector import predict_exported


class OpenVinoDetector:
    """An exported RT-DETR IR (graph with the top-K post-processor inside) behind `RTDETR.predict`'s interface.
    The IR is compiled once per batch size it is given (a static shape)."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None) -> None:
        self.path = ir_path(path)
        self.metadata = read_ir_metadata(self.path)
        self.class_names: list[str] = json.loads(self.metadata["class_names"])
        self.category_ids: list[int] = json.loads(self.metadata["category_ids"])
        self.image_size: tuple[int, int] = tuple(json.loads(self.metadata["image_size"]))  # type: ignore[assignment]
        self.precision = self.metadata["precision"]
        self.device, self.threads = device, threads
        self.model = openvino_core().read_model(str(self.path))
        self.compiled: dict[int, ov.CompiledModel] = {}

    def compiled_for(self, batch_size: int) -> ov.CompiledModel:
        if batch_size not in self.compiled:
            self.compiled[batch_size] = compile_ir(self.model, self.precision, batch_size, self.threads, self.device)
        return self.compiled[batch_size]

    def run(self, images: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The raw graph: images [N, 3, H, W] float, orig_sizes [N, 2] (width, height) -> labels, boxes, scores."""
        feeds = {"images": images.float().numpy(), "orig_target_sizes": orig_sizes.to(torch.int64).numpy()}
        labels, boxes, scores = run_compiled(self.compiled_for(len(images)), feeds)
        return torch.from_numpy(labels.copy()), torch.from_numpy(boxes.copy()), torch.from_numpy(scores.copy())

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        score_threshold: float = 0.5,
        image_size: tuple[int, int] | None = None,
        batch_size: int = 8,
        max_detections: int = 300,
        amp: str = "off",
    ) -> list[Detections]:
        """As `RTDETR.predict`. `image_size` can only be the exported size, `amp` only 'off' (the IR's
        precision is fixed at export: export again with --precision bf16)."""
        if amp != "off":
            raise ValueError(f"{self.path}: amp={amp!r} applies to PyTorch weights; this IR runs {self.precision} "
                             "(export again with --precision to change it)")  # fmt: skip
        return predict_exported(self.run, self.path, self.image_size, images, image_size, batch_size,
                                self.category_ids, self.class_names, score_threshold, max_detections)  # fmt: skip
