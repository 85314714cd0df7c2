"""Shared test helpers (the tests folder is on sys.path: `from helpers import ...`)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import torch
from PIL import Image
from torch import nn

from rtdetr.data.images import as_image_list
from rtdetr.models.layers import FrozenBatchNorm2d
from rtdetr.postprocess import Detections


def randomize_batch_norms(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial statistics and affine values in every BatchNorm (also frozen ones) below `module`, so that
    a wrong formula or a lost tensor shows: weight U(0.5, 1.5), bias N(0, 0.2), running mean N(0, 0.2),
    running var U(0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            n = m.running_mean.numel()
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR header claims `width` x `height` (CRC fixed): a decompression bomb for a reader."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature (8), length and type (8)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # the CRC covers type and data
    return bytes(data)


class ColorDetector:
    """A scripted `Detector` for hand-made images and videos: per colour, one box around its pixels (within
    `tolerance` per channel), in the pixels of the image it is given. Score 0.9 for a blob clear of the image
    border, 0.6 for one touching it (a cut object, as a tile edge makes it). `calls` counts the images seen."""

    def __init__(self, classes: dict[tuple[int, int, int], tuple[int, str]], tolerance: int = 60) -> None:
        self.classes, self.tolerance = classes, tolerance
        self.category_ids = sorted({c for c, _ in classes.values()})
        self.class_names = [next(n for c, n in classes.values() if c == i) for i in self.category_ids]
        self.calls = 0

    def predict(self, images, score_threshold=0.5, image_size=None, batch_size=8, max_detections=300, amp="off"):
        results = []
        for image in as_image_list(images):
            self.calls += 1
            if isinstance(image, torch.Tensor):
                image = (image.permute(1, 2, 0) * 255).round().byte().numpy()
            pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image).astype(int)
            height, width = pixels.shape[:2]
            found = []
            for color, (category_id, name) in self.classes.items():
                ys, xs = np.nonzero((np.abs(pixels - np.array(color)) <= self.tolerance).all(axis=2))
                if len(xs) < 4:
                    continue
                box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                cut = box[0] == 0 or box[1] == 0 or box[2] == width or box[3] == height
                found.append((0.6 if cut else 0.9, box, category_id, name))
            found = [f for f in sorted(found, key=lambda f: -f[0]) if f[0] > score_threshold][:max_detections]
            results.append(Detections(
                torch.tensor([f[1] for f in found], dtype=torch.float32).reshape(-1, 4),
                torch.tensor([f[0] for f in found]), torch.tensor([f[2] for f in found], dtype=torch.int64),
                [f[3] for f in found],
            ))  # fmt: skip
        return results
