"""ovd_jax.data: dataset readers, the synthetic open-vocabulary set and the grain pipelines."""

from ovd_jax.data.coco import DetectionDataset, load_coco_detection
from ovd_jax.data.lvis import load_lvis_detection
from ovd_jax.data.pipeline import make_detection_loader
from ovd_jax.data.synthetic import COLOURS, SHAPES, SyntheticPaths, category_names, generate
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
    "load_coco_detection",
    "load_lvis_detection",
    "make_detection_loader",
]
