"""Shared test helpers (the tests folder is on sys.path: `from helpers import ...`)."""

from __future__ import annotations

import io
import struct
import zlib

import torch
from PIL import Image
from torch import nn

from rtdetr.models.layers import FrozenBatchNorm2d


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
