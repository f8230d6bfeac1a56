"""Per-image transforms: decode, flip, resize, normalise, pad, fixed-size targets.

Two resize rules, both ending on a static S x S canvas (padding bottom/right):
* long side = S (`resize_longest_side`, the default);
* detectron2's `ResizeShortestEdge` (`resize_shortest_edge`): shorter side = `min_size`,
  unless that makes the longer side exceed `max_size`, in which case longer side = `max_size`
  (RegionCLIP: 800 / 1333 at test, a random choice of 640..800 / 1333 in training). The canvas
  S must be >= max_size; the recipes use max_size rounded up to a multiple of 32.

All functions are pure numpy/PIL and deterministic given their arguments (randomness, e.g. the
flip decision, is decided by the caller). Conventions:

* images are HWC; uint8 until normalisation, float32 after (with `image_transfer="uint8"` the
  example keeps the resized uint8 pixels, zero-padded, and the normalisation runs on the
  accelerator: `ovd_jax.data.device_image`);
* boxes are x1, y1, x2, y2 in pixels of the image they accompany;
* `scale` maps original pixels to input pixels: input = original * scale (same for x and y; the
  resized size is rounded to whole pixels, so the image may differ from W*scale by < 0.5 px);
* padding goes to the bottom/right and is 0 *after* normalisation (i.e. the mean colour).
"""

from __future__ import annotations

import io
import logging
import threading

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# OpenAI CLIP's normalisation, in 0-255 units.
CLIP_MEAN = tuple(v * 255.0 for v in (0.48145466, 0.4578275, 0.40821073))
CLIP_STD = tuple(v * 255.0 for v in (0.26862954, 0.26130258, 0.27577711))


log = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("error", "skip")
# How an example carries its image: normalised float32 (host-side normalisation), or the
# resized uint8 pixels (a quarter of the bytes per host->device copy; normalised on device).
IMAGE_TRANSFERS = ("float32", "uint8")


class BadImageError(ValueError):
    """An image file that is missing, truncated, corrupt, or not of its annotated size
    (`config.data.on_bad_image = "skip"` skips exactly these)."""


class SkippedImages:
    """Images skipped under `on_bad_image="skip"`: each file is logged once (a warning with the
    reason and the running count) and counted; thread-safe (grain reads in threads)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reasons: dict[str, str] = {}  # file -> first error message
        self.visits = 0  # skips including repeats (one file in several epochs)

    def add(self, name: str, error: Exception) -> None:
        with self._lock:
            self.visits += 1
            if name in self.reasons:
                return
            self.reasons[name] = str(error)
            count = len(self.reasons)
        log.warning("on_bad_image='skip': skipping %s (%d bad image(s) so far): %s",
                    name, count, error)

    def __len__(self) -> int:
        return len(self.reasons)


# Every loader built with on_bad_image="skip" records here; read it for the totals.
SKIPPED_IMAGES = SkippedImages()


def check_bad_image_policy(policy: str) -> str:
    if policy not in BAD_IMAGE_POLICIES:
        raise ValueError(f"config.data.on_bad_image={policy!r}; use 'error' (stop at the first "
                         "bad image file) or 'skip' (log it once, count it and go on).")
    return policy


def check_image_transfer(value: str) -> str:
    if value not in IMAGE_TRANSFERS:
        raise ValueError(f"config.data.image_transfer={value!r}; use 'float32' (images "
                         "normalised on the host) or 'uint8' (resized uint8 pixels sent to the "
                         "device and normalised there).")
    return value


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16-bit greyscale ("I;16*", or "I" holding 16-bit values) is
    scaled by 255/65535; PIL's own conversion would clip it to 255 (an all-white image)."""
    if img.mode.startswith("I;16") or (img.mode == "I" and img.getextrema()[1] > 255):
        arr = np.asarray(img).astype(np.float64)
        arr = np.clip(np.rint(arr * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)  # uint8 [H, W] -> mode "L"
    return img.convert("RGB")


def decode_image(source, *, name: str | None = None) -> np.ndarray:
    """Decodes an image to uint8 RGB [H, W, 3] as displayed.

    Greyscale, palette, RGBA (alpha dropped), CMYK and 16-bit images become 8-bit RGB. An EXIF
    orientation tag is applied (as image viewers and detectron2 do), so height, width and boxes
    in the annotations must refer to the displayed orientation - which is what COCO's
    annotation tools record.

    Args:
      source: a file path, encoded bytes, a PIL image, or an HWC/HW uint8 array.
      name: how to refer to the image in errors (defaults to the path).

    Raises BadImageError (a ValueError) naming the file when it is missing or cannot be decoded.
    """
    label = name or (source if isinstance(source, str) else "<in-memory image>")
    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
            raise ValueError(f"image {label!r} has shape {arr.shape}; expected [H, W, 3].")
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        return np.ascontiguousarray(arr[..., :3].astype(np.uint8, copy=False))
    try:
        if isinstance(source, Image.Image):
            img = source
        elif isinstance(source, bytes | bytearray | memoryview):
            img = Image.open(io.BytesIO(bytes(source)))
        else:
            img = Image.open(source)
        img.load()  # force the full decode here so truncated files fail now, with the name
        if img.getexif().get(0x0112, 1) not in (1, None):  # 0x0112: EXIF Orientation
            img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
    except FileNotFoundError as e:
        raise BadImageError(f"image file {label!r} does not exist; check the image folder (or "
                            "set config.data.on_bad_image='skip').") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as e:
        raise BadImageError(
            f"image file {label!r} is corrupt or not an image ({type(e).__name__}: {e}); "
            "re-download or remove it from the annotations (or set "
            "config.data.on_bad_image='skip')."
        ) from e
    return np.asarray(img, dtype=np.uint8)


def resize_longest_side(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Resizes uint8 [H,W,3] so that its longer side is `size` (bilinear, antialiased).

    Returns (resized uint8 [h', w', 3], scale) with h' = round(H * scale), w' = round(W * scale)
    and scale = size / max(H, W).
    """
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    if (nh, nw) == (h, w):
        return image, float(scale)
    out = Image.fromarray(image).resize((nw, nh), Image.BILINEAR)
    return np.asarray(out, dtype=np.uint8), float(scale)


def shortest_edge_scale(h: int, w: int, min_size: float, max_size: float) -> float:
    """detectron2 `ResizeShortestEdge.get_output_shape` as one scale factor: s = min_size /
    min(h, w), lowered to max_size / max(h, w) when the longer side would exceed max_size."""
    scale = float(min_size) / min(h, w)
    if max(h, w) * scale > max_size:
        scale = float(max_size) / max(h, w)
    return scale


def resize_shortest_edge(
    image: np.ndarray, min_size: int, max_size: int
) -> tuple[np.ndarray, float]:
    """Resizes uint8 [H,W,3] with detectron2's shortest-edge rule (bilinear, PIL).

    Returns (resized uint8 [h', w', 3], scale) with scale = `shortest_edge_scale(...)`,
    h' = int(H * scale + 0.5), w' = int(W * scale + 0.5) (detectron2's rounding).
    """
    h, w = image.shape[:2]
    scale = shortest_edge_scale(h, w, min_size, max_size)
    nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    if (nh, nw) == (h, w):
        return image, scale
    out = Image.fromarray(image).resize((nw, nh), Image.BILINEAR)
    return np.asarray(out, dtype=np.uint8), scale


def normalize_and_pad(image: np.ndarray, size: int, mean, std) -> np.ndarray:
    """(image - mean) / std (0-255 units), zero-padded bottom/right to float32 [size, size, 3]."""
    h, w = image.shape[:2]
    if h > size or w > size:
        raise ValueError(f"image of size {h}x{w} does not fit the {size}x{size} input.")
    out = np.zeros((size, size, 3), np.float32)
    mean = np.asarray(mean, np.float32)
    inv_std = 1.0 / np.asarray(std, np.float32)
    out[:h, :w] = (image.astype(np.float32) - mean) * inv_std
    return out


def pad_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [h,w,3] zero-padded bottom/right to uint8 [size, size, 3] (no normalisation)."""
    h, w = image.shape[:2]
    if h > size or w > size:
        raise ValueError(f"image of size {h}x{w} does not fit the {size}x{size} input.")
    out = np.zeros((size, size, 3), np.uint8)
    out[:h, :w] = image
    return out


def hflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirrors uint8 [H,W,3] and its xyxy boxes [n,4] (pixel extents: x -> W - x)."""
    width = image.shape[1]
    flipped = boxes.copy()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return np.ascontiguousarray(image[:, ::-1]), flipped


def pad_targets(
    boxes: np.ndarray,
    category_ids: np.ndarray,
    iscrowd: np.ndarray,
    cat_id_to_index: dict[int, int],
    max_boxes: int,
    *,
    truncate: bool = False,
    name: str = "",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drops crowd regions, maps category ids to class indices and pads to `max_boxes`.

    Returns (boxes float32 [M,4], labels int32 [M] with -1 padding, mask bool [M]).
    Raises ValueError when an image has more than M non-crowd boxes (unless `truncate`, which
    keeps the first M in annotation order) or a category id is missing from `cat_id_to_index`.
    """
    keep = ~np.asarray(iscrowd, bool)
    boxes, category_ids = boxes[keep], np.asarray(category_ids)[keep]
    n = len(boxes)
    if n > max_boxes:
        if not truncate:
            raise ValueError(
                f"image {name!r} has {n} boxes but config.data.max_boxes is {max_boxes}; raise "
                "config.data.max_boxes (or pass truncate=True to keep only the first ones)."
            )
        boxes, category_ids, n = boxes[:max_boxes], category_ids[:max_boxes], max_boxes
    labels = np.full((max_boxes,), -1, np.int32)
    for k, cid in enumerate(category_ids.tolist()):
        if cid not in cat_id_to_index:
            raise ValueError(
                f"image {name!r} has a box of category id {cid}, which is not in the loader's "
                "cat_id_to_index; remove those annotations or add the category to the vocabulary."
            )
        labels[k] = cat_id_to_index[cid]
    out_boxes = np.zeros((max_boxes, 4), np.float32)
    out_boxes[:n] = boxes
    mask = np.zeros((max_boxes,), bool)
    mask[:n] = True
    return out_boxes, labels, mask


def image_example(
    record: dict,
    *,
    image_size: int,
    flip: bool,
    mean=CLIP_MEAN,
    std=CLIP_STD,
    boxes: np.ndarray | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
    image_transfer: str = "float32",
) -> tuple[dict, np.ndarray | None]:
    """Decodes, optionally flips, resizes and normalises one record's image.

    The record supplies its pixels as `image` (array/bytes/PIL) or else `path`. The decoded
    size must equal the record's height/width, since annotations are in those pixels.
    Resize: long side = `image_size`, or with `min_size` and `max_size` the shortest-edge rule;
    either way the result is padded to the `image_size` square canvas.
    `image_transfer`: "float32" normalises here ((x - mean) / std, float32); "uint8" keeps the
    resized pixels as uint8 (zero padding) for `device_image.normalize_images` on the device.

    Returns (example dict with image/image_id/scale/image_hw/orig_hw/flipped/valid, `boxes`
    [n,4] original px -> flipped and scaled input px, or None when no boxes are given).
    """
    name = record.get("path") or f"image_id {record.get('image_id')}"
    image = decode_image(record["image"] if "image" in record else record["path"], name=name)
    h, w = image.shape[:2]
    if (h, w) != (int(record["height"]), int(record["width"])):
        rotated = (w, h) == (int(record["height"]), int(record["width"]))
        raise BadImageError(
            f"image {name!r} decodes to {h}x{w} (HxW) but its annotation says "
            f"{record['height']}x{record['width']}; the boxes would be misplaced - fix the "
            "image size in the annotation file"
            + (" (the file has an EXIF rotation: sizes and boxes must refer to the displayed, "
               "rotated image)." if rotated else ".")
        )
    if flip:
        empty = np.zeros((0, 4), np.float32)
        image, boxes_f = hflip(image, empty if boxes is None else boxes)
        boxes = None if boxes is None else boxes_f
    if min_size is not None:
        if max_size is None or max_size > image_size:
            raise ValueError(
                f"shortest-edge resize needs max_size <= the canvas image_size={image_size}; got "
                f"max_size={max_size} (set config.data.max_size and config.data.image_size)."
            )
        image, scale = resize_shortest_edge(image, min_size, max_size)
    else:
        image, scale = resize_longest_side(image, image_size)
    example = {
        "image": (pad_uint8(image, image_size) if image_transfer == "uint8"
                  else normalize_and_pad(image, image_size, mean, std)),
        "image_id": np.int32(record["image_id"]),
        "scale": np.float32(scale),
        "image_hw": np.asarray(image.shape[:2], np.int32),
        "orig_hw": np.asarray((h, w), np.int32),
        "flipped": np.bool_(flip),
        "valid": np.bool_(True),
    }
    return example, None if boxes is None else boxes * np.float32(scale)


def detection_example(
    record: dict,
    *,
    image_size: int,
    max_boxes: int,
    cat_id_to_index: dict[int, int],
    flip: bool,
    mean=CLIP_MEAN,
    std=CLIP_STD,
    truncate: bool = False,
    min_size: int | None = None,
    max_size: int | None = None,
    image_transfer: str = "float32",
) -> dict:
    """One record -> one fixed-shape example (see `ovd_jax.data.pipeline` for the keys)."""
    boxes = np.asarray(record["boxes"], np.float32).reshape(-1, 4)
    example, boxes = image_example(
        record, image_size=image_size, flip=flip, mean=mean, std=std, boxes=boxes,
        min_size=min_size, max_size=max_size, image_transfer=image_transfer,
    )
    out_boxes, labels, mask = pad_targets(
        boxes, record["category_ids"], record["iscrowd"], cat_id_to_index, max_boxes,
        truncate=truncate, name=record.get("path") or f"image_id {record.get('image_id')}",
    )
    example.update(boxes=out_boxes, labels=labels, box_mask=mask)
    return example


def padding_example(image_size: int, max_boxes: int, image_transfer: str = "float32") -> dict:
    """A placeholder example for filling the last eval batch: image_id -1, valid False (its
    image is zeros of the `image_transfer` dtype)."""
    return {
        "image": np.zeros((image_size, image_size, 3), np.dtype(image_transfer)),
        "boxes": np.zeros((max_boxes, 4), np.float32),
        "labels": np.full((max_boxes,), -1, np.int32),
        "box_mask": np.zeros((max_boxes,), bool),
        "image_id": np.int32(-1),
        "scale": np.float32(1.0),
        "image_hw": np.zeros((2,), np.int32),
        "orig_hw": np.zeros((2,), np.int32),
        "flipped": np.bool_(False),
        "valid": np.bool_(False),
    }
