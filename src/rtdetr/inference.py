"""Choosing the inference backend from the weights file: PyTorch checkpoints or an exported `.onnx`.

Both backends offer the same `predict(images, score_threshold, image_size, batch_size, max_detections)`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .api import RTDETR
from .export.onnxruntime_backend import OnnxDetector, providers_for

logger = logging.getLogger(__name__)


def load_detector(
    weights: str | Path | None,
    preset: str | None = None,
    num_decoder_layers: int | None = None,
    device: str = "cpu",
    deploy: bool = True,
) -> RTDETR | OnnxDetector:
    """A ready-to-predict detector.

    weights: an `.onnx` export (run in ONNX Runtime), or any checkpoint `RTDETR.from_checkpoint` reads (ours,
    official `.pth`, a Hugging Face folder). Without weights, `preset` with random weights (a warning says so).
    num_decoder_layers: keep the first k decoder layers and use the k-th layer's head (PyTorch weights only).
    deploy: re-parameterise the PyTorch model for inference (same outputs up to float rounding, faster).
    """
    if weights is not None and Path(weights).suffix.lower() == ".onnx":
        if num_decoder_layers:
            raise ValueError(
                f"{weights}: an ONNX graph's decoder depth is fixed at export; export it again with --decoder-layers"
            )
        return OnnxDetector(weights, providers=providers_for(device))
    overrides = {"num_decoder_layers": num_decoder_layers} if num_decoder_layers else {}
    if weights is not None:
        model = RTDETR.from_checkpoint(weights, **overrides)
    elif preset is not None:
        logger.warning("no weights given: %s with RANDOM weights (boxes are meaningless)", preset)
        # The k-th layer's head: eval_idx is relative to the kept layers (the preset's may point past them).
        model = RTDETR.from_preset(preset, **overrides, **({"eval_idx": -1} if overrides else {}))
    else:
        raise ValueError("give weights (a checkpoint, a Hugging Face folder or an .onnx file) or a preset")
    model = model.to(device).eval()
    return model.deploy() if deploy else model
