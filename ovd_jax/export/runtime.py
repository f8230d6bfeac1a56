"""Loads an exported artifact and runs it: needs jax, numpy, safetensors, Pillow and the
tokenizer (ovd_jax.text), never flax nor ovd_jax's model or training code.

    det = load_artifact("runs/demo_artifact")
    queries = det.encode(["red circle", "blue square"])     # cached per vocabulary
    results = det.detect([image_uint8_hwc, ...], queries)    # boxes in original pixels

`Detector` is also what `detect.py --workdir` runs, with jitted in-process functions in place
of the deserialised ones (ovd_jax/export/inprocess.py), so both paths share this host code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from PIL import Image, ImageOps

from ovd_jax.export import queries as qlib

FORMAT = "ovd_jax.export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARAMS = "params.safetensors"
FUNCTIONS = ("encode_queries", "detect")
TOKENIZER_DIR = "tokenizer"
_REQUIRED = ("method", "query_kind", "input", "queries", "tokenizer", "platforms", "functions",
             "files")


class ArtifactError(ValueError):
    """A missing, partial, corrupt or incompatible artifact (one message saying which)."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def current_platform() -> str:
    """The jax.export platform name of the default backend: cpu, cuda, rocm or tpu."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
    return "rocm" if "rocm" in version else "cuda"


# ------------------------------------------------------------------------------------------
# Pre-processing (the evaluation transform: resize, normalise, pad bottom/right)


def resize_scale(h: int, w: int, resize: dict) -> tuple[float, int, int]:
    """(scale, new h, new w) of the evaluation resize rule `resize` (a manifest entry):
    {"rule": "longest_side", "size": S} or {"rule": "shortest_edge", "min_size", "max_size"},
    rounded as training rounded them."""
    if resize["rule"] == "longest_side":
        scale = resize["size"] / max(h, w)
        return scale, max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    if resize["rule"] == "shortest_edge":
        scale = float(resize["min_size"]) / min(h, w)
        if max(h, w) * scale > resize["max_size"]:
            scale = float(resize["max_size"]) / max(h, w)
        return scale, max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    raise ArtifactError(f"unknown resize rule {resize['rule']!r} in the manifest.")


def preprocess(image: np.ndarray, input_info: dict) -> tuple[np.ndarray, float, np.ndarray]:
    """uint8 [H, W, 3] -> (float32 [S, S, 3] normalised and zero-padded, scale (input px =
    original px * scale), int32 [2] resized (h, w))."""
    h, w = image.shape[:2]
    scale, nh, nw = resize_scale(h, w, input_info["resize"])
    if (nh, nw) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR), np.uint8)
    size = int(input_info["canvas"])
    out = np.zeros((size, size, 3), np.float32)
    mean = np.asarray(input_info["pixel_mean"], np.float32)
    inv_std = 1.0 / np.asarray(input_info["pixel_std"], np.float32)
    out[:nh, :nw] = (image.astype(np.float32) - mean) * inv_std
    return out, float(scale), np.asarray((nh, nw), np.int32)


def read_image(path: str) -> np.ndarray:
    """uint8 RGB [H, W, 3] of an image file as displayed, decoded as training decodes it: EXIF
    orientation applied, 16-bit greyscale scaled to 8 bits, any mode to RGB. ValueError naming
    the file when it is missing or unreadable."""
    try:
        with Image.open(path) as img:
            img.load()  # the full decode now, so a truncated file fails here
            if img.getexif().get(0x0112, 1) not in (1, None):  # 0x0112: EXIF Orientation
                img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I;16") or (img.mode == "I" and img.getextrema()[1] > 255):
                arr = np.asarray(img).astype(np.float64) * (255.0 / 65535.0)
                img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
            return np.asarray(img.convert("RGB"), np.uint8)
    except FileNotFoundError as e:
        raise ValueError(f"image {path!r} does not exist.") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"image {path!r} is unreadable or not an image "
                         f"({type(e).__name__}: {e}).") from e


# ------------------------------------------------------------------------------------------
# The detector


@dataclasses.dataclass
class Detector:
    """Host-side driver of the two inference functions.

    Attributes:
      manifest: the artifact's manifest (also built for in-process use).
      params: the parameter pytree both functions take first.
      encode_fn: (params, tokens, mask) -> query embeddings.
      detect_fn: (params, images, image_hw, queries) -> dict of boxes [N,D,4] (input px),
        scores / classes / valid [N,D].
      tokenizer: FixedLengthTokenizer.
      cache_dir: where query embeddings are cached per vocabulary ('' = no cache).
      regions_fn: (params, images, image_hw) -> class-agnostic boxes [N,R,4], embeddings
        [N,R,D], valid [N,R]; None for methods without text-independent region embeddings.
    """

    manifest: dict
    params: object
    encode_fn: Callable
    detect_fn: Callable
    tokenizer: object
    cache_dir: str = ""
    regions_fn: Callable | None = None

    def vocabulary_key(self, names: Sequence[str]) -> str:
        """Cache key of a vocabulary: its queries and the parameters' checksum."""
        blob = json.dumps([self.manifest.get("params_sha256", ""), list(names)])
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def encode(self, names: Sequence[str]) -> dict:
        """Free-text queries -> the `queries` pytree detect takes (cached per vocabulary)."""
        names = [str(n).strip() for n in names if str(n).strip()]
        if not names:
            raise ValueError("the query list is empty: give at least one query.")
        path = ""
        if self.cache_dir:
            path = os.path.join(self.cache_dir, f"queries_{self.vocabulary_key(names)}.npz")
            if os.path.exists(path):
                with np.load(path) as z:
                    return {k: z[k] for k in z.files}
        out = self._encode(names)
        if path:
            os.makedirs(self.cache_dir, exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}.npz"
            np.savez(tmp, **out)
            os.replace(tmp, path)
        return out

    def _encode(self, names: list[str]) -> dict:
        q = self.manifest["queries"]
        per_call = int(q["per_call"])
        if self.manifest["query_kind"] == "concepts":
            tok = qlib.concept_tokens(self.tokenizer, names, q["templates"], q["clean_names"])
            parts = [np.asarray(self.encode_fn(self.params, tok["tokens"][s:s + per_call],
                                               tok["mask"][s:s + per_call]))
                     for s in range(0, len(names), per_call)]
            return qlib.pad_concepts(np.concatenate(parts), int(q["bucket"]))
        chunks = qlib.chunk_tokens(self.tokenizer, names, int(q["context_length"]),
                                   q.get("max_per_chunk"), int(q["chunk_classes"]))
        ids, mask = chunks.pop("token_ids"), chunks.pop("token_mask")
        text = [np.asarray(self.encode_fn(self.params, ids[s:s + per_call],
                                          mask[s:s + per_call]))
                for s in range(0, len(ids), per_call)]
        return {"text": np.concatenate(text), "token_mask": mask, **chunks}

    def detect_arrays(self, images: Sequence[np.ndarray], queries: dict) -> dict:
        """uint8 images -> raw outputs (input pixels) plus "scale" [N] and "image_hw" [N,2]."""
        inputs = [preprocess(im, self.manifest["input"]) for im in images]
        batch = np.stack([x[0] for x in inputs])
        hw = np.stack([x[2] for x in inputs])
        out = self.detect_fn(self.params, batch, hw, queries)
        out = {k: np.asarray(v) for k, v in out.items()}
        out["scale"] = np.asarray([x[1] for x in inputs], np.float32)
        out["image_hw"] = hw
        return out

    def regions(self, images: Sequence[np.ndarray]) -> dict:
        """uint8 images -> class-agnostic regions: boxes [N,R,4] (input pixels), embeddings
        [N,R,D] (compare with `encode(...)["emb"]` by dot product), valid [N,R], plus "scale"
        [N] and "image_hw" [N,2]. ValueError for methods without them (GLIP)."""
        if self.regions_fn is None:
            raise ValueError(f"{self.manifest['method']} has no text-independent region "
                             "embeddings (its boxes depend on the queries); use detect().")
        inputs = [preprocess(im, self.manifest["input"]) for im in images]
        hw = np.stack([x[2] for x in inputs])
        out = self.regions_fn(self.params, np.stack([x[0] for x in inputs]), hw)
        out = {k: np.asarray(v) for k, v in out.items()}
        out["scale"] = np.asarray([x[1] for x in inputs], np.float32)
        out["image_hw"] = hw
        return out

    def detect(self, images: Sequence[np.ndarray], queries: dict,
               threshold: float = 0.0) -> list[dict]:
        """uint8 [H, W, 3] images -> per image {"boxes" [n,4] x1,y1,x2,y2 in original pixels,
        "scores" [n], "classes" [n] (query index)}, best first, scores >= `threshold`."""
        out = self.detect_arrays(images, queries)
        results = []
        for i, image in enumerate(images):
            keep = out["valid"][i] & (out["scores"][i] >= threshold)
            h, w = image.shape[:2]
            boxes = out["boxes"][i][keep] / out["scale"][i]
            boxes = np.clip(boxes, 0.0, np.asarray([w, h, w, h], np.float32))
            order = np.argsort(-out["scores"][i][keep], kind="stable")
            results.append({"boxes": boxes[order], "scores": out["scores"][i][keep][order],
                            "classes": out["classes"][i][keep][order].astype(np.int64)})
        return results


# ------------------------------------------------------------------------------------------
# Loading


def read_manifest(path: str) -> dict:
    """The manifest of the artifact folder `path`; ArtifactError when missing or unreadable."""
    if not os.path.isdir(path):
        raise ArtifactError(f"artifact {path!r} does not exist; run export.py --out {path}.")
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise ArtifactError(f"artifact {path!r} is partial: it has no {MANIFEST}; re-run "
                            "export.py.")
    try:
        with open(file, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"artifact {path!r} is corrupt: {MANIFEST} is unreadable "
                            f"({e}); re-run export.py.") from e
    if not isinstance(manifest, dict):
        raise ArtifactError(f"artifact {path!r} is corrupt: {MANIFEST} is not a JSON object; "
                            "re-run export.py.")
    found = manifest.get("format"), manifest.get("format_version")
    if found != (FORMAT, FORMAT_VERSION):
        raise ArtifactError(f"artifact {path!r} has format {found[0]!r} version {found[1]!r}; "
                            f"this runtime reads {FORMAT!r} version {FORMAT_VERSION}: re-export "
                            "it.")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing or any(f not in manifest["functions"] for f in FUNCTIONS):
        raise ArtifactError(f"artifact {path!r} is corrupt: its {MANIFEST} lacks "
                            f"{missing or list(FUNCTIONS)}; re-run export.py.")
    return manifest


def _check_files(path: str, manifest: dict) -> None:
    for name, digest in manifest["files"].items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise ArtifactError(f"artifact {path!r} is partial: {name} is missing; re-run "
                                "export.py.")
        if sha256_file(file) != digest:
            raise ArtifactError(f"artifact {path!r} is corrupt: {name} does not match the "
                                "checksum in the manifest; re-run export.py.")


def unflatten(flat: dict) -> dict:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}}."""
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def load_params(file: str) -> dict:
    """The parameter pytree of a params.safetensors file (numpy arrays)."""
    from safetensors.numpy import load_file  # noqa: PLC0415

    return unflatten(load_file(file))


def _deserialize(path: str, name: str):
    file = os.path.join(path, f"{name}.jax_exported")
    with open(file, "rb") as f:
        data = f.read()
    try:
        return jax.export.deserialize(bytearray(data))
    except Exception as e:  # noqa: BLE001 - any decoding failure means a corrupt blob
        raise ArtifactError(f"artifact {path!r} is corrupt: {name}.jax_exported does not "
                            f"deserialise ({type(e).__name__}: {e}); re-run export.py.") from e


def load_artifact(path: str, *, cache_dir: str | None = None, verify: bool = True) -> Detector:
    """Loads the artifact folder `path` (checksums verified unless `verify` is False).

    cache_dir: where query embeddings are cached (default: <path>/query_cache when writable,
    else ~/.cache/ovd_jax/queries; '' disables). Raises ArtifactError for a missing, partial,
    corrupt artifact, or one exported for other platforms than the current backend.
    """
    manifest = read_manifest(path)
    platform = current_platform()
    if platform not in manifest["platforms"]:
        raise ArtifactError(f"artifact {path!r} was exported for {manifest['platforms']}, but "
                            f"this process runs on {platform!r}; re-export with "
                            f"--platforms={platform} (or run on a matching device).")
    if verify:
        _check_files(path, manifest)
    fns = {name: _deserialize(path, name) for name in manifest["functions"]}
    params = load_params(os.path.join(path, PARAMS))
    tokenizer = qlib.load_tokenizer(os.path.join(path, TOKENIZER_DIR), manifest["tokenizer"])
    if cache_dir is None:
        cache_dir = os.path.join(path, "query_cache")
        if not os.access(path, os.W_OK):
            cache_dir = os.path.expanduser("~/.cache/ovd_jax/queries")
    params = jax.device_put(params)
    regions = fns["regions"].call if "regions" in fns else None
    return Detector(manifest, params, fns["encode_queries"].call, fns["detect"].call, tokenizer,
                    cache_dir, regions)
