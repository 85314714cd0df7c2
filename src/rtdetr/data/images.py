"""Reading images into model inputs: any file PIL reads (EXIF orientation applied), PIL images, arrays, tensors."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

ImageInput = str | Path | Image.Image | np.ndarray | Tensor

# Images declaring more pixels are refused before decoding (10000x10000 is 300 MB as RGB). PIL warns above
# PIL.Image.MAX_IMAGE_PIXELS (89.5 M) and refuses above twice that (179 M) whatever is passed here.
MAX_IMAGE_PIXELS = 10_000 * 10_000
_LIMIT_FIX = (
    "Downscale the image (the model sees it at its input size, e.g. 640x640); if it is genuine and must be read "
    "at full size, pass a larger max_pixels to load_image (beyond 2 * PIL.Image.MAX_IMAGE_PIXELS also raise PIL's)."
)
_ORIENTATION = 0x0112  # the EXIF tag
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # those ImageOps.exif_transpose turns by 90 degrees: width <-> height


def as_image_list(images: "ImageInput | Sequence[ImageInput]") -> list[ImageInput]:
    """One image or a sequence of images -> a list of images."""
    if isinstance(images, (str, Path, Image.Image, np.ndarray, Tensor)):
        return [images]
    return list(images)


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB PIL image with its EXIF orientation applied; errors name the file.

    FileNotFoundError if it is missing; ValueError if it is unreadable, truncated, or its header declares more
    than `max_pixels` pixels (checked before decoding: a decompression bomb must not exhaust memory).
    """
    with _opened(path, max_pixels) as image:
        return to_rgb(ImageOps.exif_transpose(image))


def read_image_size(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) of the image as `load_image` returns it (EXIF orientation applied), without decoding
    the pixels where the format allows (PNG keeps its EXIF anywhere, so PIL decodes a PNG to find it); the
    errors of `load_image`, except those that only a full decode finds (truncated pixel data)."""
    with _opened(path, max_pixels) as image:
        width, height = image.size
        swapped = image.getexif().get(_ORIENTATION, 1) in _TRANSPOSED_ORIENTATIONS
        return (height, width) if swapped else (width, height)


@contextlib.contextmanager
def _opened(path: str | Path, max_pixels: int) -> Iterator[Image.Image]:
    """The image file opened by PIL (header read, pixels not yet decoded) after the pixel-limit check; failures
    to open it, and to decode it inside the `with` block, raise FileNotFoundError or ValueError naming the file."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height <= max_pixels:
                yield image
                return
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except Image.DecompressionBombError as error:  # PIL's own limit, 2 * PIL.Image.MAX_IMAGE_PIXELS
        raise ValueError(f"cannot read image {path}: {error} {_LIMIT_FIX}") from None
    except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for unreadable/truncated files
        raise ValueError(f"cannot read image {path}: {error}") from None
    raise ValueError(
        f"cannot read image {path}: its header declares {width}x{height} = {width * height} pixels, more than "
        f"max_pixels={max_pixels} (a decompression bomb?). {_LIMIT_FIX}"
    )


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
