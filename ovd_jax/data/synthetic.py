"""A small synthetic open-vocabulary detection set: coloured shapes on a noisy background.

Every category is a compositional phrase "<colour> <shape>" (e.g. "red circle"). A Latin-square
of colour x shape combinations is held out as *novel*: novel objects never appear in a training
image (neither as labels nor as unlabeled objects), yet every colour word and every shape word
still occurs in at least two base names, so a detector that aligns words to regions can name a
novel combination it never saw as a label. Validation images contain all categories, with about
40% of the instances novel so that novel AP rests on enough instances.

`generate(root)` writes, deterministically from a seed (same seed -> byte-identical files):

    root/manifest.json                      generation parameters + format version
    root/train/*.png, root/val/*.png        RGB images, image_size x image_size
    root/annotations/instances_{train,val}.json   COCO instances (+ LVIS-style category fields)
    root/annotations/captions_{train,val}.json    COCO captions, 2 per image
    root/annotations/grounding_train.json   MDETR/GLIP-style flattened phrase grounding
    root/ovd_split.json                     {"base": [names], "novel": [names]}
    root/vocab.txt                          BERT WordPiece vocabulary covering every text above

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
FORMAT_VERSION = 1

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

# Nominal RGB of each colour; every object gets a per-channel jitter of +-_COLOUR_JITTER on top.
_RGB = {
    "red": (215, 45, 40),
    "green": (45, 175, 60),
    "blue": (45, 85, 220),
    "yellow": (230, 205, 40),
    "purple": (150, 60, 190),
}
_COLOUR_JITTER = 20

# Latin-square hold-out: colour c is novel with shape c mod |SHAPES|. Each colour keeps 3 base
# shapes and each shape keeps >= 3 base colours (circle: green/blue/yellow).
NOVEL: tuple[tuple[str, str], ...] = tuple(
    (c, SHAPES[i % len(SHAPES)]) for i, c in enumerate(COLOURS)
)

# Fraction of validation instances drawn from novel categories.
_VAL_NOVEL_FRACTION = 0.4
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
    )


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


def _categories() -> list[dict]:
    novel = set(novel_names())
    cats = []
    for cid, (colour, shape) in zip(
        category_ids(), [(c, s) for c in COLOURS for s in SHAPES]
    ):
        name = f"{colour} {shape}"
        is_novel = name in novel
        cats.append(
            {
                "id": cid,
                "name": name,
                "supercategory": shape,
                "split": "novel" if is_novel else "base",
                "frequency": "r" if is_novel else "f",
                "def": f"a {colour} object shaped like a {shape}",
                "synonyms": [name, f"{shape} that is {colour}"],
                "image_count": 0,
                "instance_count": 0,
            }
        )
    return cats


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


def _layout(rng: np.random.Generator, size: int, max_objects: int) -> list[tuple]:
    """Integer square boxes (x1, y1, x2, y2) for 1..max_objects objects, overlapping little."""
    lo, hi = (v * size / 128.0 for v in _SIZE_RANGE_128)
    want = int(rng.integers(1, max_objects + 1))
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
        text += "a "
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
        if split == "train":
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
    out: str, *, seed: int, num_train: int, num_val: int, image_size: int, max_objects: int
) -> None:
    cats = _categories()
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
    for split in ("train", "val"):
        images, anns, caps, g_images, g_anns = splits[split]
        split_cats = _with_counts(cats, images, anns)
        _dump(getattr(p, f"{split}_instances"),
              {"info": info, "images": images, "annotations": anns, "categories": split_cats})
        _dump(getattr(p, f"{split}_captions"),
              {"info": info, "images": images, "annotations": caps})
        texts += [c["caption"] for c in caps]
        if split == "train":
            _dump(p.train_grounding,
                  {"info": info, "images": g_images, "annotations": g_anns,
                   "categories": split_cats})
    _dump(p.split_file,
          {"base": [c["name"] for c in cats if c["split"] == "base"],
           "novel": [c["name"] for c in cats if c["split"] == "novel"]})
    for c in cats:
        texts += [c["name"], c["def"], *c["synonyms"]]
    with open(p.vocab_file, "w", encoding="utf-8") as f:
        f.write("\n".join(_vocab_tokens(texts)) + "\n")


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
             p.train_grounding, p.split_file, p.vocab_file]
    if not all(os.path.isfile(f) for f in files):
        return False
    params = manifest["params"]
    for d, n in ((p.train_images, params["num_train"]), (p.val_images, params["num_val"])):
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
      force: regenerate even when a matching dataset exists.

    Generation is atomic: files are written into a temporary sibling directory which is then
    renamed to `root`, so an interrupted run never leaves a half-written dataset.
    """
    for name, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1),
                             ("image_size", image_size, 32), ("max_objects", max_objects, 1)):
        if int(value) != value or value < low:
            raise ValueError(f"synthetic.generate: {name}={value!r} must be an integer >= {low}.")
    params = {"seed": int(seed), "num_train": int(num_train), "num_val": int(num_val),
              "image_size": int(image_size), "max_objects": int(max_objects)}
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
