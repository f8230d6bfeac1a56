"""An annotated image: detections drawn over the input, with class names and scores."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw


def _colour(k: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(
    image: Image.Image | np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    class_names: Sequence[str],
    *,
    score_threshold: float = 0.3,
    ground_truth: np.ndarray | None = None,
    upscale: int = 1,
) -> Image.Image:
    """Draws detections (boxes [D,4] x1,y1,x2,y2 in `image` pixels, scores [D], classes [D]
    indexing `class_names`) with score >= `score_threshold`; ground-truth boxes [G,4], if
    given, in thin white. `upscale` enlarges small images so labels stay readable."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    img = img.convert("RGB")
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    if ground_truth is not None:
        for b in np.asarray(ground_truth, np.float64) * upscale:
            draw.rectangle(list(b), outline=(255, 255, 255), width=1)
    order = [i for i in np.argsort(-np.asarray(scores)) if scores[i] >= score_threshold]
    for i in order:
        b = np.asarray(boxes[i], np.float64) * upscale
        draw.rectangle(list(b), outline=_colour(int(classes[i])), width=2)
    # Labels after all boxes (no outline crosses a label), best score first, each moved down
    # in 11 px steps until it overlaps no earlier label: touching boxes keep readable labels.
    placed: list[tuple[float, float, float, float]] = []
    for i in order:
        b = np.asarray(boxes[i], np.float64) * upscale
        c = _colour(int(classes[i]))
        label = f"{class_names[int(classes[i])]} {scores[i]:.2f}"
        tw = draw.textlength(label)
        y = max(b[1] - 11, 0)
        for _ in range(64):
            if not any(b[0] < r[2] and r[0] < b[0] + tw + 2 and y < r[3] and r[1] < y + 11
                       for r in placed):
                break
            y += 11
        placed.append((b[0], y, b[0] + tw + 2, y + 11))
        draw.rectangle([b[0], y, b[0] + tw + 2, y + 11], fill=c)
        draw.text((b[0] + 1, y), label, fill=(0, 0, 0))
    return img
