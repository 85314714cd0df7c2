"""Reading images into model inputs: any file PIL reads (EXIF orientation applied), PIL images, arrays, tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

ImageInput = str | Path | Image.Image | np.ndarray | Tensor


def as_image_list(images: "ImageInput | Sequence[ImageInput]") -> list[ImageInput]:
    """One image or a sequence of images -> a list of images."""
    if isinstance(images, (str, Path, Image.Image, np.ndarray, Tensor)):
        return [images]
    return list(images)


def load_image(path: str | Path) -> Image.Image:
    """An RGB PIL image with its EXIF orientation applied; errors name the file."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for unreadable/truncated files
        raise ValueError(f"cannot read image {path}: {error}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB of any PIL mode: 16-bit grayscale scaled to 8 bits, alpha composited on black."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray((array / scale * 255).round().clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def to_model_input(image: ImageInput, size: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
    """(float tensor [3, H, W] RGB in [0, 1] resized to `size`, original (width, height))."""
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"a tensor image must be [3, H, W] RGB in [0, 1], got shape {tuple(image.shape)}")
        h, w = image.shape[1:]
        resized = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        return resized[0], (w, h)
    if isinstance(image, (str, Path)):
        image = load_image(image)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"an array image must be uint8 [H, W] or [H, W, 3|4], got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    image = to_rgb(image)
    # PIL bilinear (antialiased) resize, as the official eval transform `Resize([640, 640])` on PIL images.
    resized = image.resize((size[1], size[0]), Image.BILINEAR)
    array = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return array, image.size


def model_input_batches(
    images: "ImageInput | Sequence[ImageInput]", size: tuple[int, int], batch_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """One image or a sequence, `batch_size` at a time, as (images float [N, 3, H, W] resized to `size`,
    original sizes int64 [N, 2] as (width, height)): the input side of every `predict`."""
    images = as_image_list(images)
    for start in range(0, len(images), batch_size):
        tensors, orig_sizes = zip(*(to_model_input(image, size) for image in images[start : start + batch_size]))
        yield torch.stack(tensors), torch.tensor(orig_sizes)
