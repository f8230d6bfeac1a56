"""TFDS `array_record` detection datasets (e.g. `coco/2017` prepared by the user) as records.

Reads through `tfds.data_source(name, split=..., data_dir=...)` - random access, no TensorFlow
needed - and converts each TFDS COCO-style example

    image            encoded image (kept encoded here; decoded later in the grain workers)
    image/id         int64
    objects/bbox     float32 [n, 4] normalised (ymin, xmin, ymax, xmax)
    objects/label    int64 [n] ClassLabel index
    objects/is_crowd bool [n]

into the record dict of `ovd_jax.data.coco` (`image_id`, `height`, `width`, `boxes` xyxy pixels,
`category_ids`, `iscrowd`) with the encoded bytes under `image` instead of a `path`. TFDS COCO
has no dataset category ids, only ClassLabel indices, so here category id == class index
(`cat_ids = [0..K-1]`). Records are produced lazily on indexing (only the image header is read
for its size), so the grain pipeline's threads do the decoding.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ovd_jax.data.coco import DetectionDataset


def _image_size(data: bytes, name: str) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            w, h = img.size
    except Exception as e:  # PIL raises several types for bad headers
        raise ValueError(f"TFDS example {name} holds an undecodable image ({e}); the prepared "
                         "dataset is corrupt - re-run download_and_prepare.") from e
    return h, w


def _read_image(example: dict, key: str, name: str) -> tuple[bytes | np.ndarray, int, int]:
    """The image feature `key` of one TFDS example -> (image, height, width): encoded bytes
    (only the header is read for the size) or an already decoded uint8 [H, W, 3] array (a data
    source without SkipDecoding), returned as is. `name` labels the example in errors."""
    data = example[key]
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 3:
        h, w = data.shape[:2]
        return data, int(h), int(w)
    if isinstance(data, bytes | bytearray):
        h, w = _image_size(data, name)
        return bytes(data), int(h), int(w)
    raise ValueError(f"TFDS example {name}: {key!r} is {type(data).__name__}; expected encoded "
                     "image bytes or a uint8 [H, W, 3] array.")


def _open_source(name: str, split: str, data_dir: str | None, image_key: str):
    """`tfds.data_source` over a prepared array_record split, images left encoded; nothing is
    downloaded. A missing or unprepared dataset is a ValueError saying how to prepare it."""
    import tensorflow_datasets as tfds  # optional dependency: imported only when used

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                decoders={image_key: tfds.decode.SkipDecoding()})
    except Exception as e:  # TFDS raises a variety of errors for absent/unprepared datasets
        raise ValueError(
            f"cannot open TFDS dataset {name!r} split {split!r} in data_dir={data_dir!r} ({e}). "
            f"Prepare it first in array_record format (e.g. `tfds build {name} "
            "--file_format=array_record`) and point data_dir at it."
        ) from e


def convert_example(
    example: dict,
    *,
    image_key: str = "image",
    id_key: str = "image/id",
    objects_key: str = "objects",
    name: str = "",
) -> dict:
    """One TFDS COCO-style example (image kept as encoded bytes) -> a detection record."""
    image, h, w = _read_image(example, image_key, name)
    objects = example[objects_key]
    bbox = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
    if bbox.size and (bbox.min() < -1e-3 or bbox.max() > 1 + 1e-3):
        raise ValueError(f"TFDS example {name}: objects/bbox {bbox.tolist()} is not normalised "
                         "to [0, 1] (ymin, xmin, ymax, xmax).")
    boxes = np.stack([bbox[:, 1] * w, bbox[:, 0] * h, bbox[:, 3] * w, bbox[:, 2] * h], axis=1)
    labels = np.asarray(objects["label"], np.int64).reshape(-1)
    crowd = objects.get("is_crowd")
    crowd = np.zeros(len(labels), bool) if crowd is None else np.asarray(crowd, bool).reshape(-1)
    if not len(boxes) == len(labels) == len(crowd):
        raise ValueError(f"TFDS example {name}: objects/bbox, label and is_crowd differ in length.")
    return {
        "image_id": int(example[id_key]),
        "image": image,
        "height": h,
        "width": w,
        "boxes": boxes.astype(np.float32),
        "category_ids": labels,
        "iscrowd": crowd,
    }


class TfdsRecords(Sequence):
    """A lazy, index-addressable sequence of detection records over a TFDS data source."""

    def __init__(self, source, *, name: str, image_key: str = "image",
                 id_key: str = "image/id", objects_key: str = "objects"):
        self._source = source
        self._name = name
        self._keys = dict(image_key=image_key, id_key=id_key, objects_key=objects_key)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return convert_example(self._source[index], name=f"{self._name}[{index}]", **self._keys)

    # grain pickles sources for worker processes; the TFDS data source pickles itself.
    def __repr__(self) -> str:
        return f"TfdsRecords({self._name}, {len(self)} examples)"


def load_tfds_detection(
    name: str,
    *,
    split: str,
    data_dir: str | None = None,
    image_key: str = "image",
    id_key: str = "image/id",
    objects_key: str = "objects",
    with_gt: bool = False,
) -> DetectionDataset:
    """Opens a prepared TFDS detection dataset in array_record format.

    Args:
      name: TFDS name, e.g. "coco/2017".
      split: e.g. "train", "validation", "validation[:500]".
      data_dir: TFDS data dir (default: TFDS's, ~/tensorflow_datasets). Nothing is downloaded.
      image_key, id_key, objects_key: feature names (TFDS COCO's by default).
      with_gt: also build a COCO-format `gt` dict (one pass over the split, headers only) for
        the evaluator; otherwise `gt` is None.

    Returns:
      A `DetectionDataset` whose `records` is a lazy `TfdsRecords` sequence (category id = the
      ClassLabel index; class names from the ClassLabel feature).
    """
    source = _open_source(name, split, data_dir, image_key)
    features = source.dataset_info.features
    try:
        class_names = list(features[objects_key]["label"].names)
    except (KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"TFDS dataset {name!r} has no {objects_key}/label ClassLabel feature; "
                         "pass objects_key= naming its objects feature.") from e
    if not class_names:
        raise ValueError(f"TFDS dataset {name!r} has no class names: set config.data.class_names.")
    categories = [{"id": k, "name": n} for k, n in enumerate(class_names)]
    records = TfdsRecords(source, name=f"{name}:{split}", image_key=image_key, id_key=id_key,
                          objects_key=objects_key)
    gt = _coco_gt(records, categories) if with_gt else None
    return DetectionDataset(
        records=records,
        categories=categories,
        class_names=class_names,
        cat_ids=list(range(len(class_names))),
        cat_id_to_index={k: k for k in range(len(class_names))},
        gt=gt,
    )


def _coco_gt(records: Sequence[dict], categories: list[dict]) -> dict:
    images, anns = [], []
    for rec in records:
        images.append({"id": rec["image_id"], "height": rec["height"], "width": rec["width"],
                       "file_name": f"{rec['image_id']}"})
        for box, cid, crowd in zip(rec["boxes"], rec["category_ids"], rec["iscrowd"]):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            anns.append({"id": len(anns) + 1, "image_id": rec["image_id"],
                         "category_id": int(cid), "bbox": [float(box[0]), float(box[1]), w, h],
                         "area": w * h, "iscrowd": int(crowd)})
    return {"images": images, "annotations": anns, "categories": categories}


# ---------------------------------------------------------------------------------------------
# Image-text pairs (web-scale caption sets such as CC3M prepared as TFDS array_record).


def _texts(value, name: str) -> list[str]:
    """A TFDS caption feature (str / bytes, a list of them, or coco_captions' {"text": [...]})
    -> non-empty caption strings."""
    if isinstance(value, dict):
        if "text" not in value:
            raise ValueError(f"TFDS example {name}: the caption feature is a dict without 'text' "
                             f"(keys {sorted(value)}); pass caption_key naming the text.")
        value = value["text"]
    if isinstance(value, bytes | str | np.bytes_ | np.str_):
        value = [value]
    out = []
    for v in np.asarray(value, dtype=object).reshape(-1):
        text = v.decode("utf-8") if isinstance(v, bytes | np.bytes_) else str(v)
        if text.strip():
            out.append(text.strip())
    if not out:
        raise ValueError(f"TFDS example {name} has no non-empty caption; filter the dataset or "
                         "pass caption_key naming the caption feature.")
    return out


class TfdsCaptionRecords(Sequence):
    """Lazy caption records (`load_coco_captions` layout with the encoded bytes under `image`)
    over a TFDS data source; the image id is `id_key`'s value, or the example index."""

    def __init__(self, source, *, name: str, image_key: str, caption_key: str,
                 id_key: str | None):
        self._source, self._name = source, name
        self._image_key, self._caption_key, self._id_key = image_key, caption_key, id_key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index = index % len(self)
        name = f"{self._name}[{index}]"
        ex = self._source[index]
        image, h, w = _read_image(ex, self._image_key, name)
        return {
            "image_id": int(ex[self._id_key]) if self._id_key else int(index),
            "image": image, "height": h, "width": w,
            "captions": _texts(ex[self._caption_key], name),
        }

    def __repr__(self) -> str:
        return f"TfdsCaptionRecords({self._name}, {len(self)} examples)"


def load_tfds_captions(
    name: str,
    *,
    split: str,
    data_dir: str | None = None,
    image_key: str = "image",
    caption_key: str = "caption",
    id_key: str | None = None,
) -> TfdsCaptionRecords:
    """Opens a prepared TFDS image-text dataset (array_record) as lazy caption records.

    Args:
      name: TFDS name of a dataset with an image feature and a caption feature (a string, a
        list of strings, or TFDS coco_captions' `captions` with a `text` field).
      split: e.g. "train" or "train[:1%]".
      data_dir: TFDS data dir (default TFDS's). Nothing is downloaded.
      image_key, caption_key: the feature names; id_key: an integer id feature (default: the
        example index).
    Returns:
      records usable by `ovd_jax.data.pipeline.make_caption_loader` (image bytes decoded in the
      grain workers).
    """
    source = _open_source(name, split, data_dir, image_key)
    features = source.dataset_info.features
    for key in (image_key, caption_key, *([id_key] if id_key else [])):
        if key not in features:
            raise ValueError(f"TFDS dataset {name!r} has no feature {key!r} (features: "
                             f"{sorted(features.keys())}); pass image_key / caption_key / id_key.")
    return TfdsCaptionRecords(source, name=f"{name}:{split}", image_key=image_key,
                              caption_key=caption_key, id_key=id_key)
