"""Caption and phrase-grounding readers (COCO-captions and MDETR/GLIP flattened formats).

* `load_coco_captions`: COCO captions JSON -> one record per image with all its captions
  (`image_id`, `path`, `height`, `width`, `captions`: list[str]).
* `load_grounding`: MDETR/GLIP flattened phrase grounding; defined in `ovd_jax.data.grounding`
  (with the ODVG reader) and re-exported here.
* Concept pools for region-text pretraining: `load_concept_file` (one concept per line) or
  `concept_pool_from_captions` (the captions' frequent noun phrases; spaCy noun chunks when
  spaCy and an English model are installed, else `fallback_noun_phrases`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence

from ovd_jax.data.coco import load_json

# The grounding reader lives with the other grounding formats; re-exported for old imports.
from ovd_jax.data.grounding import load_grounding

__all__ = ["concept_pool_from_captions", "load_coco_captions", "load_concept_file",
           "load_grounding", "noun_phrases"]

log = logging.getLogger(__name__)


def load_coco_captions(
    captions_json: str, image_dir: str, *, check_files: bool = True
) -> list[dict]:
    """Loads a COCO captions file; every image must have at least one non-empty caption."""
    data = load_json(captions_json, "captions")
    if not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{captions_json!r} has no 'images'/'annotations' lists; it is not a "
                         "COCO captions file.")
    caps: dict[int, list[str]] = {int(im["id"]): [] for im in data["images"]}
    for a in data["annotations"]:
        iid = a.get("image_id")
        if iid not in caps:
            raise ValueError(f"{captions_json!r}: caption id {a.get('id')} refers to image id "
                             f"{iid}, which is not in 'images'; remove it or add the image.")
        text = a.get("caption")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{captions_json!r}: caption id {a.get('id')} is empty; remove it.")
        caps[iid].append(text.strip())
    records, missing = [], []
    for im in data["images"]:
        iid = int(im["id"])
        if not caps[iid]:
            raise ValueError(f"{captions_json!r}: image id {iid} ({im.get('file_name')!r}) has no "
                             "caption; remove the image or add a caption.")
        path = os.path.join(image_dir, im["file_name"])
        if check_files and not os.path.isfile(path):
            missing.append(path)
        records.append({"image_id": iid, "path": path, "height": int(im["height"]),
                        "width": int(im["width"]), "captions": caps[iid]})
    if missing:
        raise ValueError(f"{captions_json!r}: image file {missing[0]!r} does not exist (and "
                         f"{len(missing) - 1} more); point image_dir at the image folder.")
    return records


# ---------------------------------------------------------------------------------------------
# Concept pools (RegionCLIP pretraining): one concept per line in a file, or the noun phrases of
# the captions.

# Words that end a noun phrase in the fallback parser: determiners, pronouns, prepositions,
# conjunctions, auxiliaries and a few frequent caption verbs / adverbs.
_FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every no another other such its their his her
our your my one two three four five six seven eight nine ten several many few lots lot of
in on at by for with without from to into onto over under above below behind beside besides
between near next inside outside around through across along against among up down off out
and or but nor so yet while where when which who whom whose what how why there here then than
is are was were be been being am has have had having do does did done can could will would
shall should may might must it they he she we you i me him them us as not very also just
only too all both either neither about after before during until upon within beneath toward
towards like picture photo image shows showing shown view close
""".split())


def load_concept_file(path: str) -> list[str]:
    """One concept per line (blank lines and lines starting with '#' skipped) -> list[str].

    Raises ValueError when the file is missing, empty or lists a concept twice.
    """
    if not os.path.isfile(path):
        raise ValueError(f"concept file {path!r} does not exist; fix config.image_text."
                         "concepts_file (one concept per line) or leave it empty to extract "
                         "concepts from the captions.")
    with open(path, encoding="utf-8") as f:
        concepts = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    if not concepts:
        raise ValueError(f"concept file {path!r} lists no concept; write one per line.")
    twice = sorted({c for c in concepts if concepts.count(c) > 1})
    if twice:
        raise ValueError(f"concept file {path!r} lists {twice[:5]} more than once; keep one.")
    return concepts


def fallback_noun_phrases(caption: str) -> list[str]:
    """Noun phrases of one caption without a parser: the maximal runs of words that are not
    function words (`_FUNCTION_WORDS`: determiners, prepositions, conjunctions, auxiliaries,
    pronouns, numerals and generic words like "picture"), split at punctuation.

    "a red circle, a blue star and a cat on a grey sofa" -> ["red circle", "blue star", "cat",
    "grey sofa"]. Verbs are not recognised ("man riding" stays one phrase); install spaCy with
    an English model for real noun chunks.
    """
    phrases = []
    for clause in re.split(r"[^a-z0-9' -]+", caption.lower()):
        run: list[str] = []
        for word in clause.replace("-", " ").split():
            word = word.strip("'")
            if not word or word in _FUNCTION_WORDS or word.isdigit():
                if run:
                    phrases.append(" ".join(run))
                run = []
            else:
                run.append(word)
        if run:
            phrases.append(" ".join(run))
    return phrases


def _spacy_noun_phrases(nlp, captions: Sequence[str]) -> list[list[str]]:
    """spaCy noun chunks of each caption, lower-cased, leading determiners / pronouns /
    numerals dropped."""
    out = []
    for doc in nlp.pipe(list(captions)):
        phrases = []
        for chunk in doc.noun_chunks:
            words = [t for t in chunk]
            while words and words[0].pos_ in ("DET", "PRON", "NUM"):
                words = words[1:]
            text = " ".join(t.text.lower() for t in words).strip()
            if text:
                phrases.append(text)
        out.append(phrases)
    return out


def load_parser(parser: str = "auto", model: str = "en_core_web_sm"):
    """The noun-phrase parser: "spacy" (spaCy with `model`; an error when not installed),
    "fallback" (`fallback_noun_phrases`), or "auto" (spaCy when it and the model load, else the
    fallback). Returns a spaCy `Language` or None for the fallback."""
    if parser not in ("auto", "spacy", "fallback"):
        raise ValueError(f"config.image_text.concept_parser={parser!r}: use 'auto', 'spacy' or "
                         "'fallback'.")
    if parser == "fallback":
        return None
    try:
        import spacy  # noqa: PLC0415 (optional dependency)

        return spacy.load(model, disable=["ner", "lemmatizer"])
    except (ImportError, OSError) as e:
        if parser == "spacy":
            raise ValueError(f"concept_parser='spacy' needs spaCy and its {model!r} model "
                             f"({type(e).__name__}: {e}); `pip install spacy` and `python -m "
                             f"spacy download {model}`, or use concept_parser='fallback'.") from e
        log.info("spaCy/%s not available (%s): using the fallback noun-phrase parser", model, e)
        return None


def noun_phrases(captions: Sequence[str], parser=None) -> list[list[str]]:
    """Noun phrases of each caption: spaCy noun chunks with a `load_parser` result, else the
    fallback parser."""
    if parser is None:
        return [fallback_noun_phrases(c) for c in captions]
    return _spacy_noun_phrases(parser, captions)


def concept_pool_from_captions(
    captions: Sequence[str], *, parser=None, min_count: int = 1, max_concepts: int = 0,
) -> list[str]:
    """The concept pool of a caption corpus: its noun phrases seen at least `min_count` times,
    most frequent first (ties alphabetical), at most `max_concepts` (0: all).

    Raises ValueError when no phrase is frequent enough.
    """
    counts: dict[str, int] = {}
    for phrases in noun_phrases(captions, parser):
        for p in phrases:
            counts[p] = counts.get(p, 0) + 1
    pool = sorted((p for p, n in counts.items() if n >= min_count), key=lambda p: (-counts[p], p))
    if max_concepts:
        pool = pool[: int(max_concepts)]
    if not pool:
        raise ValueError(f"no noun phrase occurs >= {min_count} times in the {len(captions)} "
                         "captions; lower config.image_text.min_concept_count or give a concept "
                         "file (config.image_text.concepts_file).")
    return pool
