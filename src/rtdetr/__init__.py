"""RT-DETR: real-time end-to-end object detection (Lv et al., CVPR 2024), weight-compatible with the
official checkpoints."""

from .api import RTDETR, load_detector
from .config import PRESETS, ModelConfig, preset
from .postprocess import Detections

__all__ = ["RTDETR", "load_detector", "ModelConfig", "PRESETS", "preset", "Detections"]
__version__ = "0.1.0"
