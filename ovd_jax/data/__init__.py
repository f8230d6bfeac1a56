"""ovd_jax.data: dataset readers, the synthetic open-vocabulary set and the grain pipelines."""

from ovd_jax.data.captions import load_coco_captions, load_grounding
from ovd_jax.data.coco import DetectionDataset, load_coco_detection
from ovd_jax.data.lvis import load_lvis_detection
from ovd_jax.data.pipeline import make_caption_loader, make_detection_loader
from ovd_jax.data.synthetic import COLOURS, SHAPES, SyntheticPaths, category_names, generate
from ovd_jax.data.tfds_source import load_tfds_detection
from ovd_jax.data.transforms import CLIP_MEAN, CLIP_STD
from ovd_jax.data.vocabulary import Vocabulary

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "COLOURS",
    "SHAPES",
    "DetectionDataset",
    "SyntheticPaths",
    "Vocabulary",
    "category_names",
    "generate",
    "load_coco_captions",
    "load_coco_detection",
    "load_grounding",
    "load_lvis_detection",
    "load_tfds_detection",
    "make_caption_loader",
    "make_detection_loader",
]
