"""Everything a config describes besides the training state: data, vocabularies, tokenizer, model.

Shared by `train.py` (ovd_jax/training/loop.py) and `eval.py` (ovd_jax/training/evaluate.py).
"""

from __future__ import annotations

import dataclasses
import logging
from types import ModuleType

import numpy as np

from ovd_jax import methods
from ovd_jax.data import coco, lvis, synthetic
from ovd_jax.data.vocabulary import Vocabulary, drop_annotations_outside, restrict_dataset
from ovd_jax.text import prompts, tokenizers


@dataclasses.dataclass
class Experiment:
    """Attributes:
    config: the ml_collections config.
    method: the method module (ovd_jax/methods/<name>.py).
    train_data / val_data: DetectionDataset (train_data None for evaluation-only use).
    train_classes: training vocabulary (class names); train labels index into it.
    train_cat_id_to_index: dataset category id -> training-vocabulary index.
    eval_vocab: the evaluation Vocabulary (names, base/novel, category ids).
    tokenizer: FixedLengthTokenizer.
    train_tokens / eval_tokens: [K * T, L] int32 concept-prompt tokens.
    model: the flax module.
    """

    config: object
    method: ModuleType
    train_data: object
    val_data: object
    train_classes: list[str]
    train_cat_id_to_index: dict[int, int]
    eval_vocab: Vocabulary
    tokenizer: object
    train_tokens: np.ndarray
    eval_tokens: np.ndarray
    model: object


def resolve_data_paths(config) -> str:
    """Generates the synthetic set when `config.data.synthetic` and points the config at it.

    Returns the WordPiece vocabulary written with the synthetic set ('' for real data).
    """
    d = config.data
    if not d.synthetic:
        return ""
    paths = synthetic.generate(
        d.root, seed=d.synthetic_seed, num_train=d.synthetic_num_train,
        num_val=d.synthetic_num_val, image_size=d.synthetic_image_size,
    )
    with config.unlocked():
        d.train_instances, d.train_images = paths.train_instances, paths.train_images
        d.val_instances, d.val_images = paths.val_instances, paths.val_images
        if not d.split_file:
            d.split_file = paths.split_file
    return paths.vocab_file


def load_detection(config, which: str):
    d = config.data
    if d.kind == "tfds":  # a prepared TFDS array_record dataset (e.g. coco/2017), read lazily
        from ovd_jax.data.tfds_source import load_tfds_detection  # noqa: PLC0415 (optional)

        if not d.tfds_name:
            raise ValueError("config.data.kind='tfds' needs config.data.tfds_name "
                             "(e.g. 'coco/2017').")
        split = d.tfds_train_split if which == "train" else d.tfds_val_split
        return load_tfds_detection(d.tfds_name, split=split, data_dir=d.tfds_data_dir or None,
                                   with_gt=which != "train")
    instances, images = (
        (d.train_instances, d.train_images) if which == "train" else (d.val_instances, d.val_images)
    )
    loader = {"coco": coco.load_coco_detection, "lvis": lvis.load_lvis_detection}.get(d.kind)
    if loader is None:
        raise ValueError(f"config.data.kind={d.kind!r}: use 'coco', 'lvis' or 'tfds'.")
    return loader(instances, images)


def build_tokenizer(config, synthetic_vocab: str):
    t = config.text
    if t.tokenizer == "wordpiece":
        vocab = t.vocab_file or synthetic_vocab
        if not vocab:
            raise ValueError(
                "config.text.tokenizer='wordpiece' needs config.text.vocab_file (a BERT vocab.txt)."
            )
        return tokenizers.load_wordpiece_tokenizer(vocab, t.context_length)
    if t.tokenizer == "clip":
        return tokenizers.load_clip_tokenizer(t.vocab_file or None, t.context_length)
    raise ValueError(f"config.text.tokenizer={t.tokenizer!r}: use 'clip' or 'wordpiece'.")


def _select(names: list[str], wanted, what: str) -> list[str]:
    wanted = list(wanted)
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise ValueError(
            f"{what} names {unknown} are not categories of the dataset; known: {names[:20]}..."
        )
    return wanted


def build_experiment(config, *, with_train: bool = True) -> Experiment:
    """Loads and validates data, builds vocabularies, tokenizer and model from `config`."""
    method = methods.get(config.method)
    if config.model.get("teacher") and not config.model.get("init_checkpoint"):
        # Distillation from a frozen teacher (config.model.teacher): the student's towers start
        # from the teacher's, as RegionCLIP's pretraining initialises the student from CLIP.
        with config.unlocked():
            config.model.init_checkpoint = config.model.teacher
    if config.method == "regionclip" and config.model.get("init_checkpoint") and \
            config.text.trainable:
        # A RegionCLIP detector started from pretrained towers (a converted CLIP / RegionCLIP
        # checkpoint or a pretraining workdir) keeps its text tower frozen, as upstream does.
        logging.warning("config.model.init_checkpoint is set: the text tower is frozen "
                        "(config.text.trainable -> False).")
        with config.unlocked():
            config.text.trainable = False
    synthetic_vocab = resolve_data_paths(config)
    val_data = load_detection(config, "val")
    split = config.data.split_file or None
    builtin = config.data.get("split") or None  # a split named in vocabulary.BUILTIN_SPLITS
    eval_vocab = Vocabulary.from_categories(
        val_data.categories, split_file=split, rare_as_novel=config.data.kind == "lvis",
        split=builtin,
    )
    if builtin:  # e.g. COCO OVD: 65 of the 80 categories, as the OVD evaluation file holds
        val_data = restrict_dataset(val_data, eval_vocab.cat_ids)
    if config.data.eval_classes:
        keep = _select(list(eval_vocab.class_names), config.data.eval_classes,
                       "config.data.eval_classes")
        idx = [eval_vocab.class_names.index(n) for n in keep]
        eval_vocab = Vocabulary(
            tuple(keep),
            tuple(i for i, k in enumerate(idx) if k in eval_vocab.base_indices),
            tuple(i for i, k in enumerate(idx) if k in eval_vocab.novel_indices),
            tuple(eval_vocab.cat_ids[k] for k in idx),
            caption_only_indices=tuple(
                i for i, k in enumerate(idx) if k in eval_vocab.caption_only_indices),
        )

    train_data, train_classes, train_map = None, [], {}
    if with_train:
        train_data = load_detection(config, "train")
        train_vocab = Vocabulary.from_categories(
            train_data.categories, split_file=split, rare_as_novel=config.data.kind == "lvis",
            split=builtin,
        )
        if config.data.train_classes:
            train_classes = _select(list(train_vocab.class_names), config.data.train_classes,
                                    "config.data.train_classes")
        else:
            train_classes = list(train_vocab.base_names)
        by_name = {c["name"]: c["id"] for c in train_data.categories}
        train_map = {by_name[n]: i for i, n in enumerate(train_classes)}
        outside = sorted({
            int(c) for r in train_data.records for c in r["category_ids"] if int(c) not in train_map
        })
        if outside and config.data.get("drop_non_base_annotations"):
            train_data, _ = drop_annotations_outside(train_data, list(train_map),
                                                     novel_names=train_vocab.novel_names)
        elif outside:
            names = [c["name"] for c in train_data.categories if c["id"] in outside]
            raise ValueError(
                f"training annotations use categories {names[:10]} that are not in the training "
                "vocabulary (base classes); add them to config.data.train_classes or remove them "
                "from the training annotations (OVD training sees base classes only), or set "
                "config.data.drop_non_base_annotations=True."
            )

    tokenizer = build_tokenizer(config, synthetic_vocab)
    templates = tuple(config.text.templates)
    train_tokens = (
        prompts.tokenize_concepts(tokenizer, train_classes, templates) if with_train else None
    )
    eval_tokens = prompts.tokenize_concepts(tokenizer, list(eval_vocab.class_names), templates)
    model = method.build_model(
        config, text_vocab_size=tokenizer.vocab_size, eot_token_id=tokenizer.eot_token_id
    )
    return Experiment(config, method, train_data, val_data, train_classes, train_map, eval_vocab,
                      tokenizer, train_tokens, eval_tokens, model)
