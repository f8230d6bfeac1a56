"""A small synthetic open-vocabulary detection set: coloured shapes on a noisy background.

Every category is a compositional phrase "<colour> <shape>" (e.g. "red circle"). A Latin-square
of colour x shape combinations is held out as *novel*: novel objects never appear in a training
image (neither as labels nor as unlabeled objects), yet every colour word and every shape word
still occurs in at least two base names, so a detector that aligns words to regions can name a
novel combination it never saw as a label. Validation images contain all categories, with about
40% of the instances novel so that novel AP rests on enough instances.

*Caption-only* concepts test what image-text pretraining adds (RegionCLIP's claim): the words
`CAPTION_ONLY_COLOURS` and `CAPTION_ONLY_SHAPES` never occur in a box label, a detection or
grounding training image, or a training caption; they occur only in the captions of the
*image-text* split (images with captions, no boxes). Every "<colour> <shape>" phrase that uses one
of them is a caption-only category: validation carries boxes for them on extra images (ids from
200001, nothing else on those images), marked `"split": "caption_only"` in the category list and
listed under "caption_only" in the split file. The training files and the first `num_val`
validation images are the same bytes whatever the caption-only part holds (only the validation
category list and each image's `neg_category_ids` grow).

`generate(root)` writes, deterministically from a seed (same seed -> byte-identical files):

    root/manifest.json                      generation parameters + format version
    root/train/*.png, root/val/*.png        RGB images, image_size x image_size
    root/imagetext/*.png                    image-text split images (no boxes)
    root/annotations/instances_{train,val}.json   COCO instances (+ LVIS-style category fields)
    root/annotations/captions_{train,val}.json    COCO captions, 2 per image
    root/annotations/captions_imagetext.json      COCO captions of the image-text split, 3 per image
    root/annotations/grounding_train.json   MDETR/GLIP-style flattened phrase grounding
    root/annotations/grounding_val.json     the same for the first num_val validation images
    root/ovd_split.json                     {"base": [...], "novel": [...], "caption_only": [...]}
    root/vocab.txt                          BERT WordPiece vocabulary covering every text above
                                            (words new to the caption-only part are appended, so
                                            the ids of the other words do not move)

The dataset is read back through the same COCO reader users point at real data
(`ovd_jax.data.coco.load_coco_detection`), so the demo exercises the real path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

# Bump when the generated content changes for the same parameters (invalidates old datasets).
FORMAT_VERSION = 6

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Words that only captions of the image-text split teach (never a box label).
CAPTION_ONLY_COLOURS: tuple[str, ...] = ("orange", "pink")
CAPTION_ONLY_SHAPES: tuple[str, ...] = ("cross",)
ALL_COLOURS = COLOURS + CAPTION_ONLY_COLOURS
ALL_SHAPES = SHAPES + CAPTION_ONLY_SHAPES

# Nominal RGB of each colour; every object gets a per-channel jitter of +-_COLOUR_JITTER on top.
_RGB = {
    "red": (215, 45, 40),
    "green": (45, 175, 60),
    "blue": (45, 85, 220),
    "yellow": (230, 205, 40),
    "purple": (150, 60, 190),
    "orange": (240, 135, 20),
    "pink": (245, 125, 185),
}
_COLOUR_JITTER = 20

# Latin-square hold-out: colour c is novel with shape c mod |SHAPES|. Each colour keeps 3 base
# shapes and each shape keeps >= 3 base colours (circle: green/blue/yellow).
NOVEL: tuple[tuple[str, str], ...] = tuple(
    (c, SHAPES[i % len(SHAPES)]) for i, c in enumerate(COLOURS)
)

# Fraction of validation instances drawn from novel categories.
_VAL_NOVEL_FRACTION = 0.4
# Default sizes of the caption-only parts, relative to the detection splits.
_IMAGETEXT_PER_TRAIN_IMAGE = 4
_CAPTION_ONLY_VAL_FRACTION = 0.4
# Objects per image-text image: 1, 2 or 3 with these probabilities (single-object images are
# the clearest caption supervision, as close-up photos are in web data).
_IMAGETEXT_OBJECT_P = (0.5, 0.3, 0.2)
# Object sides in image-text images at 128 px: wider than the detection splits' 20-56, since
# captioned photos range from scenes to close-ups of one object.
_IMAGETEXT_SIZE_RANGE_128 = (20.0, 96.0)
# First image id of the caption-only validation images and of the image-text split.
_CAPTION_ONLY_VAL_FIRST_ID, _IMAGETEXT_FIRST_ID = 200_001, 300_001
# Object side range at image_size 128, scaled linearly with image_size.
_SIZE_RANGE_128 = (20.0, 56.0)
# Placement: a new box must overlap every earlier one by IoU < 0.3 and cover < 25% of the
# smaller of the two (so a small object is never hidden under a big one).
_MAX_IOU, _MAX_IOA, _PLACEMENT_TRIES = 0.3, 0.25, 60

# Extra words the text towers' prompt templates commonly use; added to vocab.txt so prompts like
# "a photo of a red circle." never hit [UNK]. Any other lowercase word still tokenizes through
# the single-character "##x" continuation pieces.
_PROMPT_WORDS = (
    "a an the photo picture image of this is there in with and on that object objects shaped "
    "like background dark light grey"
).split()
_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_PUNCTUATION = tuple(".,:;!?'\"()-/&")


@dataclasses.dataclass(frozen=True)
class SyntheticPaths:
    """Where `generate` put each part of the dataset (all absolute paths)."""

    root: str
    train_images: str
    val_images: str
    train_instances: str
    val_instances: str
    train_captions: str
    val_captions: str
    train_grounding: str
    split_file: str
    vocab_file: str
    imagetext_images: str
    imagetext_captions: str
    val_grounding: str


def _paths(root: str) -> SyntheticPaths:
    root = os.path.abspath(root)
    ann = os.path.join(root, "annotations")
    return SyntheticPaths(
        root=root,
        train_images=os.path.join(root, "train"),
        val_images=os.path.join(root, "val"),
        train_instances=os.path.join(ann, "instances_train.json"),
        val_instances=os.path.join(ann, "instances_val.json"),
        train_captions=os.path.join(ann, "captions_train.json"),
        val_captions=os.path.join(ann, "captions_val.json"),
        train_grounding=os.path.join(ann, "grounding_train.json"),
        split_file=os.path.join(root, "ovd_split.json"),
        vocab_file=os.path.join(root, "vocab.txt"),
        imagetext_images=os.path.join(root, "imagetext"),
        imagetext_captions=os.path.join(ann, "captions_imagetext.json"),
        val_grounding=os.path.join(ann, "grounding_val.json"),
    )


def dataset_paths(root: str) -> SyntheticPaths:
    """Where `generate(root)` puts each part (nothing is checked or written)."""
    return _paths(root)


def category_names() -> list[str]:
    """All "<colour> <shape>" names, colour-major (the order of the categories in the JSON)."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def novel_names() -> list[str]:
    """Names of the held-out (novel) categories."""
    return [f"{c} {s}" for c, s in NOVEL]


def category_ids() -> list[int]:
    """Category ids, colour-major. Deliberately non-contiguous (gaps of 3 between colour blocks,
    starting at 1) so that any confusion of category id and class index shows up in tests."""
    return [1 + i + 3 * (i // len(SHAPES)) for i in range(len(COLOURS) * len(SHAPES))]


def caption_only_names() -> list[str]:
    """Every "<colour> <shape>" using a caption-only word, colour-major over ALL_COLOURS x
    ALL_SHAPES (the order of the caption-only categories in the validation JSON)."""
    return [f"{c} {s}" for c in ALL_COLOURS for s in ALL_SHAPES
            if c in CAPTION_ONLY_COLOURS or s in CAPTION_ONLY_SHAPES]


def caption_only_category_ids() -> list[int]:
    """Ids of the caption-only categories: 41, 43, 45, ... (odd, after the detection ids)."""
    return [41 + 2 * i for i in range(len(caption_only_names()))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _category(cid: int, colour: str, shape: str, split: str) -> dict:
    name = f"{colour} {shape}"
    return {
        "id": cid,
        "name": name,
        "supercategory": shape,
        "split": split,
        "frequency": "f" if split == "base" else "r",
        "def": f"{_article(colour)} {colour} object shaped like a {shape}",
        "synonyms": [name, f"{shape} that is {colour}"],
        "image_count": 0,
        "instance_count": 0,
    }


def _categories() -> list[dict]:
    """The detection categories (base + novel): the category list of the training files."""
    novel = set(novel_names())
    return [
        _category(cid, c, s, "novel" if f"{c} {s}" in novel else "base")
        for cid, (c, s) in zip(category_ids(), [(c, s) for c in COLOURS for s in SHAPES])
    ]


def _caption_only_categories() -> list[dict]:
    return [
        _category(cid, *name.split(" "), "caption_only")
        for cid, name in zip(caption_only_category_ids(), caption_only_names())
    ]


# ----------------------------------------------------------------------------------------------
# Rendering


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A grey background with low-frequency texture; returns (float32 [S,S,3], grey descriptor)."""
    level = float(rng.uniform(70.0, 190.0))
    coarse = rng.normal(0.0, 18.0, size=(8, 8)).astype(np.float32)
    texture = np.asarray(
        Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32
    )
    tint = rng.normal(0.0, 4.0, size=3).astype(np.float32)  # slight colour cast, stays greyish
    img = level + texture[..., None] + tint[None, None, :]
    desc = "dark grey" if level < 110 else ("light grey" if level > 150 else "grey")
    return img.astype(np.float32), desc


def _shape_polygon(shape: str, box: tuple[float, float, float, float]):
    x1, y1, x2, y2 = box
    cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
    if shape == "triangle":
        return [(x1, y2), (x2, y2), (cx, y1)]
    if shape == "cross":  # a plus sign whose arms are 40% of the side wide
        a = 0.2 * (x2 - x1)
        return [(cx - a, y1), (cx + a, y1), (cx + a, cy - a), (x2, cy - a), (x2, cy + a),
                (cx + a, cy + a), (cx + a, y2), (cx - a, y2), (cx - a, cy + a), (x1, cy + a),
                (x1, cy - a), (cx - a, cy - a)]
    if shape == "star":
        pts = []
        for k in range(10):  # 5 outer + 5 inner vertices, first one pointing up
            rad = r if k % 2 == 0 else 0.45 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def _draw_mask(shape: str, box: tuple[float, float, float, float], size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=255)
    elif shape == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=255)
    else:
        draw.polygon(_shape_polygon(shape, box), fill=255)
    return mask


def _iou_ioa(a, b) -> tuple[float, float]:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0, 0.0
    inter = iw * ih
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter), inter / min(area_a, area_b)


def _layout(rng: np.random.Generator, size: int, max_objects: int,
            count_p: tuple[float, ...] | None = None,
            size_range_128: tuple[float, float] = _SIZE_RANGE_128) -> list[tuple]:
    """Integer square boxes (x1, y1, x2, y2) for 1..max_objects objects, overlapping little.

    The object count is uniform over 1..max_objects, or drawn with probabilities `count_p`
    (of 1, 2, ... objects); sides are uniform in `size_range_128` (pixels at 128 px)."""
    lo, hi = (v * size / 128.0 for v in size_range_128)
    if count_p is None:
        want = int(rng.integers(1, max_objects + 1))
    else:
        want = 1 + int(rng.choice(len(count_p), p=count_p))
    boxes: list[tuple] = []
    for _ in range(want):
        for _ in range(_PLACEMENT_TRIES):
            side = int(round(rng.uniform(lo, hi)))
            side = max(4, min(side, size))
            x = int(rng.integers(0, size - side + 1))
            y = int(rng.integers(0, size - side + 1))
            box = (x, y, x + side, y + side)
            if all(
                iou < _MAX_IOU and ioa < _MAX_IOA for iou, ioa in (_iou_ioa(box, b) for b in boxes)
            ):
                boxes.append(box)
                break
    return boxes


def _render(
    rng: np.random.Generator, size: int, layout: list[tuple], cats: list[tuple[str, str]]
) -> tuple[np.ndarray, list[list[int]], str]:
    """Draw objects; returns (uint8 [S,S,3], tight integer xyxy boxes of the drawn shapes, bg)."""
    img, bg = _background(rng, size)
    tight = []
    for box, (colour, shape) in zip(layout, cats):
        mask = _draw_mask(shape, box, size)
        bx = mask.getbbox()  # (x1, y1, x2, y2), exclusive right/bottom = COCO pixel extent
        if bx is None:  # cannot happen for sides >= 4 px; guard keeps annotations truthful
            raise RuntimeError(f"shape {shape} at {box} rendered no pixels")
        tight.append(list(bx))
        rgb = np.asarray(_RGB[colour], np.float32) + rng.uniform(
            -_COLOUR_JITTER, _COLOUR_JITTER, size=3
        ).astype(np.float32)
        alpha = np.asarray(mask, np.float32)[..., None] / 255.0
        img = img * (1.0 - alpha) + rgb[None, None, :] * alpha
    img = img + rng.normal(0.0, 7.0, size=img.shape).astype(np.float32)  # sensor-like noise
    return np.clip(np.round(img), 0, 255).astype(np.uint8), tight, bg


# ----------------------------------------------------------------------------------------------
# Texts


def _join_phrases(phrases: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """'a red circle, a blue star and a green square' + (start, end) spans of each bare name."""
    text, spans = "", []
    for k, name in enumerate(phrases):
        if k > 0:
            text += " and " if k == len(phrases) - 1 else ", "
        text += _article(name) + " "
        spans.append((len(text), len(text) + len(name)))
        text += name
    return text, spans


def _captions(names_left_to_right: list[str], bg: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Two captions for an image; also the name spans inside the first one (for grounding)."""
    listing, spans = _join_phrases(names_left_to_right)
    first = f"{listing} on a {bg} background"
    prefix = "a picture of "
    second = f"{prefix}{listing}."
    return [first, second], spans


def _vocab_tokens(texts: list[str]) -> list[str]:
    words = set(_PROMPT_WORDS)
    for t in texts:
        words.update(re.findall(r"[a-z]+", t.lower()))
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    tokens = list(_SPECIAL_TOKENS) + sorted(words)
    tokens += [c for c in chars + list(_PUNCTUATION) if c not in words]
    tokens += [f"##{c}" for c in chars]
    return tokens


# ----------------------------------------------------------------------------------------------
# Generation


def _assign_categories(
    rng: np.random.Generator, n: int, base: list[str], novel: list[str], novel_fraction: float
) -> list[str]:
    """n category names: ceil(fraction * n) novel, the rest base; each group cycles through its
    classes (balanced) and the whole list is shuffled."""
    n_novel = int(math.ceil(novel_fraction * n)) if novel else 0
    def cycle(pool, k):
        order = list(rng.permutation(len(pool)))
        return [pool[order[j % len(pool)]] for j in range(k)]
    names = cycle(novel, n_novel) + cycle(base, n - n_novel)
    return [names[j] for j in rng.permutation(n)]


def _generate_split(
    out_dir: str, split: str, *, seed: int, num_images: int, image_size: int, max_objects: int,
    first_image_id: int, cats: list[dict],
):
    split_code = {"train": 0, "val": 1}[split]
    layouts = [
        _layout(np.random.default_rng([seed, split_code, 0, i]), image_size, max_objects)
        for i in range(num_images)
    ]
    total = sum(len(lay) for lay in layouts)
    base = [c["name"] for c in cats if c["split"] == "base"]
    novel = [c["name"] for c in cats if c["split"] == "novel"]
    assign_rng = np.random.default_rng([seed, split_code, 1])
    if split == "train":  # novel objects never appear in training images, not even unlabeled
        flat = _assign_categories(assign_rng, total, base, [], 0.0)
    else:
        flat = _assign_categories(assign_rng, total, base, novel, _VAL_NOVEL_FRACTION)
    name_to_cat = {c["name"]: c for c in cats}

    images, anns, caps, g_images, g_anns = [], [], [], [], []
    img_dir = os.path.join(out_dir, split)
    os.makedirs(img_dir, exist_ok=True)
    pos = 0
    for i, layout in enumerate(layouts):
        names = flat[pos : pos + len(layout)]
        pos += len(layout)
        image_id = first_image_id + i
        file_name = f"{split}_{image_id:08d}.png"
        pairs = [tuple(n.split(" ")) for n in names]
        pixels, tight, bg = _render(
            np.random.default_rng([seed, split_code, 2, i]), image_size, layout, pairs
        )
        # Fixed PNG settings keep the bytes identical across runs for the same pixels.
        Image.fromarray(pixels).save(
            os.path.join(img_dir, file_name), format="PNG", compress_level=6
        )
        present = sorted({name_to_cat[n]["id"] for n in names})
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "height": image_size,
                "width": image_size,
                # LVIS-style: every object is annotated, so every absent category is a verified
                # negative and no category is "not exhaustive".
                "neg_category_ids": [c["id"] for c in cats if c["id"] not in present],
                "not_exhaustive_category_ids": [],
            }
        )
        ann_ids = []
        for name, (x1, y1, x2, y2) in zip(names, tight):
            ann_id = len(anns) + 1
            ann_ids.append(ann_id)
            w, h = x2 - x1, y2 - y1
            anns.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": name_to_cat[name]["id"],
                    "bbox": [float(x1), float(y1), float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": 0,
                }
            )
        order = sorted(range(len(names)), key=lambda k: (tight[k][0] + tight[k][2], k))
        texts, spans = _captions([names[k] for k in order], bg)
        for t in texts:
            caps.append({"id": len(caps) + 1, "image_id": image_id, "caption": t})
        # Both splits: grounding_val.json measures phrase-grounding recall.
        g_images.append(
            {
                "id": image_id,
                "original_img_id": image_id,
                "file_name": file_name,
                "height": image_size,
                "width": image_size,
                "caption": texts[0],
                "tokens_positive_eval": [[list(s)] for s in spans],
            }
        )
        for span, k in zip(spans, order):
            a = dict(anns[ann_ids[k] - 1])
            a["id"] = len(g_anns) + 1
            a["tokens_positive"] = [list(span)]
            g_anns.append(a)
    return images, anns, caps, g_images, g_anns


def _caption_only_val_split(
    out_dir: str, *, seed: int, num_images: int, image_size: int, max_objects: int,
    first_ann_id: int, first_caption_id: int, cats: list[dict],
):
    """Validation images holding caption-only objects only (ids from 200001, files in val/).

    Returns (images, annotations, captions) continuing the ids of the detection validation set.
    """
    layouts = [_layout(np.random.default_rng([seed, 2, 0, i]), image_size, max_objects)
               for i in range(num_images)]
    pool = [c["name"] for c in cats]
    flat = _assign_categories(np.random.default_rng([seed, 2, 1]),
                              sum(len(lay) for lay in layouts), pool, [], 0.0)
    name_to_id = {c["name"]: c["id"] for c in cats}
    images, anns, caps = [], [], []
    pos = 0
    for i, layout in enumerate(layouts):
        names = flat[pos : pos + len(layout)]
        pos += len(layout)
        image_id = _CAPTION_ONLY_VAL_FIRST_ID + i
        file_name = f"val_{image_id:08d}.png"
        tight, texts = _write_image(
            os.path.join(out_dir, "val", file_name), np.random.default_rng([seed, 2, 2, i]),
            image_size, layout, names,
        )
        images.append({"id": image_id, "file_name": file_name, "height": image_size,
                       "width": image_size, "neg_category_ids": [],
                       "not_exhaustive_category_ids": []})
        for name, (x1, y1, x2, y2) in zip(names, tight):
            w, h = x2 - x1, y2 - y1
            anns.append({"id": first_ann_id + len(anns), "image_id": image_id,
                         "category_id": name_to_id[name],
                         "bbox": [float(x1), float(y1), float(w), float(h)],
                         "area": float(w * h), "iscrowd": 0})
        for t in texts:
            caps.append({"id": first_caption_id + len(caps), "image_id": image_id, "caption": t})
    return images, anns, caps


def _imagetext_split(out_dir: str, *, seed: int, num_images: int, image_size: int):
    """The image-text split: every colour x shape (caption-only words included) drawn uniformly,
    1-3 objects per image of sides 20-96 px at 128 (from scenes to close-ups), no boxes
    written. Three captions each, of two levels of detail as web captions have: the two of the
    detection splits (colour + shape, with / without the background) and one naming the shapes
    only. Returns (images, captions)."""
    img_dir = os.path.join(out_dir, "imagetext")
    os.makedirs(img_dir, exist_ok=True)
    images, caps = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, 3, 0, i])
        layout = _layout(rng, image_size, len(_IMAGETEXT_OBJECT_P), _IMAGETEXT_OBJECT_P,
                         _IMAGETEXT_SIZE_RANGE_128)
        names = [f"{ALL_COLOURS[rng.integers(len(ALL_COLOURS))]} "
                 f"{ALL_SHAPES[rng.integers(len(ALL_SHAPES))]}" for _ in layout]
        image_id = _IMAGETEXT_FIRST_ID + i
        file_name = f"imagetext_{image_id:08d}.png"
        _, texts = _write_image(os.path.join(img_dir, file_name),
                                np.random.default_rng([seed, 3, 2, i]), image_size, layout, names,
                                shape_caption=True)
        images.append({"id": image_id, "file_name": file_name, "height": image_size,
                       "width": image_size})
        for t in texts:
            caps.append({"id": len(caps) + 1, "image_id": image_id, "caption": t})
    return images, caps


def _write_image(path: str, rng, image_size: int, layout: list[tuple], names: list[str],
                 shape_caption: bool = False):
    """Renders and saves one image; returns (tight boxes, its captions): the two of
    `_captions`, plus with `shape_caption` a third naming only the shapes ("a picture of a
    cross and a star.")."""
    pixels, tight, bg = _render(rng, image_size, layout, [tuple(n.split(" ")) for n in names])
    Image.fromarray(pixels).save(path, format="PNG", compress_level=6)
    order = sorted(range(len(names)), key=lambda k: (tight[k][0] + tight[k][2], k))
    texts, _ = _captions([names[k] for k in order], bg)
    if shape_caption:
        shapes, _ = _join_phrases([names[k].split(" ")[1] for k in order])
        texts.append(f"a picture of {shapes}.")
    return tight, texts


def _with_counts(cats: list[dict], images: list[dict], anns: list[dict]) -> list[dict]:
    out = [dict(c) for c in cats]
    by_id = {c["id"]: c for c in out}
    seen: dict[int, set] = {c["id"]: set() for c in out}
    for a in anns:
        by_id[a["category_id"]]["instance_count"] += 1
        seen[a["category_id"]].add(a["image_id"])
    for cid, ims in seen.items():
        by_id[cid]["image_count"] = len(ims)
    return out


def _dump(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, separators=(",", ":"))


def _write_all(
    out: str, *, seed: int, num_train: int, num_val: int, image_size: int, max_objects: int,
    num_imagetext: int, num_val_caption_only: int,
) -> None:
    cats = _categories()
    co_cats = _caption_only_categories()
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    info = {"description": f"ovd_jax synthetic colour-shape set, seed {seed}", "version": "1"}
    splits = {}
    for split, n, first_id in (("train", num_train, 1), ("val", num_val, 100_001)):
        splits[split] = _generate_split(
            out, split, seed=seed, num_images=n, image_size=image_size,
            max_objects=max_objects, first_image_id=first_id, cats=cats,
        )
    p = _paths(out)
    texts = []
    new_texts = []  # texts of the caption-only part: their new words go last in vocab.txt
    for split in ("train", "val"):
        images, anns, caps, g_images, g_anns = splits[split]
        split_cats = _with_counts(cats, images, anns)
        texts += [c["caption"] for c in caps]
        if split == "val":
            co_images, co_anns, co_caps = _caption_only_val_split(
                out, seed=seed, num_images=num_val_caption_only, image_size=image_size,
                max_objects=max_objects, first_ann_id=len(anns) + 1,
                first_caption_id=len(caps) + 1, cats=co_cats,
            )
            # Every image is exhaustively annotated: all absent categories are negatives.
            all_ids = [c["id"] for c in cats + co_cats]
            for im in images + co_images:
                present = {a["category_id"] for a in anns + co_anns if a["image_id"] == im["id"]}
                im["neg_category_ids"] = [c for c in all_ids if c not in present]
            images, anns, caps = images + co_images, anns + co_anns, caps + co_caps
            split_cats = _with_counts(cats + co_cats, images, anns)
            new_texts += [c["caption"] for c in co_caps]
        _dump(getattr(p, f"{split}_instances"),
              {"info": info, "images": images, "annotations": anns, "categories": split_cats})
        _dump(getattr(p, f"{split}_captions"),
              {"info": info, "images": images, "annotations": caps})
        _dump(getattr(p, f"{split}_grounding"),
              {"info": info, "images": g_images, "annotations": g_anns,
               "categories": split_cats})
    it_images, it_caps = _imagetext_split(out, seed=seed, num_images=num_imagetext,
                                          image_size=image_size)
    _dump(p.imagetext_captions, {"info": info, "images": it_images, "annotations": it_caps})
    new_texts += [c["caption"] for c in it_caps]
    _dump(p.split_file,
          {"base": [c["name"] for c in cats if c["split"] == "base"],
           "novel": [c["name"] for c in cats if c["split"] == "novel"],
           "caption_only": [c["name"] for c in co_cats]})
    for c in cats:
        texts += [c["name"], c["def"], *c["synonyms"]]
    for c in co_cats:
        new_texts += [c["name"], c["def"], *c["synonyms"]]
    tokens = _vocab_tokens(texts)
    known = set(tokens)
    new_words = sorted({w for t in new_texts for w in re.findall(r"[a-z]+", t.lower())} - known)
    with open(p.vocab_file, "w", encoding="utf-8") as f:
        f.write("\n".join(tokens + new_words) + "\n")


def _manifest(params: dict) -> dict:
    return {"format_version": FORMAT_VERSION, "generator": "ovd_jax.data.synthetic",
            "params": params}


def _is_complete(root: str, manifest: dict) -> bool:
    path = os.path.join(root, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            if json.load(f) != manifest:
                return False
    except (OSError, ValueError):
        return False
    p = _paths(root)
    files = [p.train_instances, p.val_instances, p.train_captions, p.val_captions,
             p.train_grounding, p.split_file, p.vocab_file, p.imagetext_captions,
             p.val_grounding]
    if not all(os.path.isfile(f) for f in files):
        return False
    params = manifest["params"]
    for d, n in ((p.train_images, params["num_train"]),
                 (p.val_images, params["num_val"] + params["num_val_caption_only"]),
                 (p.imagetext_images, params["num_imagetext"])):
        if not os.path.isdir(d) or sum(1 for e in os.scandir(d) if e.name.endswith(".png")) != n:
            return False
    return True


def generate(
    root: str,
    *,
    seed: int = 0,
    num_train: int = 600,
    num_val: int = 150,
    image_size: int = 128,
    max_objects: int = 4,
    num_imagetext: int | None = None,
    num_val_caption_only: int | None = None,
    force: bool = False,
) -> SyntheticPaths:
    """Write the synthetic dataset under `root` (or reuse it) and return its paths.

    Args:
      root: output directory. If it already holds a dataset generated with the same parameters
        (see manifest.json) nothing is written. Otherwise it must be absent, empty, or an older
        synthetic dataset (which is replaced).
      seed: generation seed; the same seed gives byte-identical files.
      num_train, num_val: number of images per split (>= 1).
      image_size: square image side in pixels (>= 32); object sides scale as 20..56 px at 128.
      max_objects: objects per image are drawn from 1..max_objects (fewer if they do not fit).
      num_imagetext: image-text split size (default 4 x num_train; 0 writes an empty split).
      num_val_caption_only: extra validation images holding caption-only objects (default
        ceil(0.4 x num_val); 0 leaves the caption-only categories without ground truth).
      force: regenerate even when a matching dataset exists.

    Generation is atomic: files are written into a temporary sibling directory which is then
    renamed to `root`, so an interrupted run never leaves a half-written dataset.
    """
    if num_imagetext is None:
        num_imagetext = _IMAGETEXT_PER_TRAIN_IMAGE * num_train
    if num_val_caption_only is None:
        num_val_caption_only = int(math.ceil(_CAPTION_ONLY_VAL_FRACTION * num_val))
    for name, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1),
                             ("image_size", image_size, 32), ("max_objects", max_objects, 1),
                             ("num_imagetext", num_imagetext, 0),
                             ("num_val_caption_only", num_val_caption_only, 0)):
        if int(value) != value or value < low:
            raise ValueError(f"synthetic.generate: {name}={value!r} must be an integer >= {low}.")
    params = {"seed": int(seed), "num_train": int(num_train), "num_val": int(num_val),
              "image_size": int(image_size), "max_objects": int(max_objects),
              "num_imagetext": int(num_imagetext),
              "num_val_caption_only": int(num_val_caption_only)}
    manifest = _manifest(params)
    paths = _paths(root)
    root = paths.root
    if not force and _is_complete(root, manifest):
        return paths
    if os.path.exists(root) and os.listdir(root):
        if not os.path.isfile(os.path.join(root, "manifest.json")):
            raise ValueError(
                f"synthetic.generate: {root!r} exists, is not empty and holds no synthetic "
                "dataset (no manifest.json); refusing to overwrite it. Pass an empty or new "
                "directory as the dataset root (e.g. config.data.root)."
            )
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
    try:
        _write_all(tmp, **params)
        _dump(os.path.join(tmp, "manifest.json"), manifest)  # written last: marks completeness
        if os.path.exists(root):
            # Move the stale dataset aside first so the swap itself is a single rename.
            trash = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.old-", dir=parent)
            os.rename(root, os.path.join(trash, "d"))
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process (e.g. a second host on the same filesystem) won the race.
            if not _is_complete(root, manifest):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths
