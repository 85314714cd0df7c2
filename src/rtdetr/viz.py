"""Drawing detections on images."""

from __future__ import annotations

import colorsys

from PIL import Image, ImageDraw, ImageFont

from .postprocess import Detections


def class_color(index: int) -> tuple[int, int, int]:
    """A bright colour per class, spread around the hue circle by the golden ratio."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: Image.Image, detections: Detections) -> Image.Image:
    """A copy of `image` with each box drawn and labelled 'name score'."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    font_size = max(12, round(min(canvas.size) / 40))
    font = ImageFont.load_default(size=font_size)
    width = max(2, round(min(canvas.size) / 300))
    for box, score, label, name in zip(
        detections.boxes.tolist(), detections.scores.tolist(), detections.labels.tolist(), detections.class_names
    ):
        color = class_color(int(label))
        draw.rectangle(box, outline=color, width=width)
        text = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((box[0], box[1]), text, font=font)
        y = box[1] - (bottom - top) - 2 if box[1] - (bottom - top) - 2 >= 0 else box[1]
        draw.rectangle((box[0], y, box[0] + right - left + 4, y + bottom - top + 2), fill=color)
        draw.text((box[0] + 2, y), text, fill=(0, 0, 0), font=font)
    return canvas
