"""Writes an artifact folder from a trained workdir or checkpoint (this module needs flax).

Layout of OUT:
    manifest.json          method, format version, input canvas / resize rule / normalisation,
                           platforms, versions, function names, query settings, checksums
    config.json            the training config
    params.safetensors     {"model": variables, "constants": ...} flattened, '/'-joined keys
    encode_queries.jax_exported, detect.jax_exported   jax.export-serialised programs
    tokenizer/             the vocabulary / BPE file the experiment tokenizes with

The folder is built as OUT.tmp-<pid> and renamed into place, so OUT is complete or absent.
"""

from __future__ import annotations

import json
import os
import platform as pyplatform
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import ovd_jax
from ovd_jax.data import transforms
from ovd_jax.data.pipeline import resize_options
from ovd_jax.export import detectors, runtime

DEFAULT_PLATFORMS = ("cpu", "cuda")
_ENCODE_PER_CALL = 4096  # prompts per encode call (an LVIS vocabulary: 1203 x 81 prompts)


# ------------------------------------------------------------------------------------------
# Restoring a trained model (as eval.py does)


def load_config(workdir: str | None, checkpoint: str | None, config=None):
    """The run's config: `config` if given, else `config.json` of `workdir`, else of the
    workdir holding `checkpoint` (<workdir>/checkpoints/<step>)."""
    if config is not None:
        return config
    candidates = [workdir] if workdir else []
    if checkpoint:
        path = os.path.abspath(checkpoint)
        candidates += [os.path.dirname(os.path.dirname(path)), os.path.dirname(path), path]
    for folder in candidates:
        file = os.path.join(folder, "config.json")
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                return ml_collections.ConfigDict(json.load(f))
    raise ValueError("no config.json next to --workdir / --checkpoint; pass --workdir of a "
                     "training run or --config with the recipe it was trained with.")


def restore(config, source: str):
    """(experiment, variables as numpy, step) of the newest checkpoint under `source` (a
    workdir, its checkpoints/ folder or one step's folder)."""
    from ovd_jax.training import loop  # noqa: PLC0415
    from ovd_jax.training import sharding as shd  # noqa: PLC0415
    from ovd_jax.training.experiment import build_experiment  # noqa: PLC0415

    exp = build_experiment(config, with_train=False)
    mesh = shd.make_mesh(config.mesh.shape, config.mesh.axes)
    variables, step = loop.restore_for_eval(exp, mesh, source)
    return exp, jax.tree.map(np.asarray, jax.device_get(variables)), step


def tokenizer_source(config) -> str:
    """The file (or folder) the experiment's tokenizer is built from."""
    from ovd_jax.text import tokenizers  # noqa: PLC0415
    from ovd_jax.training.experiment import resolve_data_paths  # noqa: PLC0415

    t = config.text
    if t.tokenizer == "wordpiece":
        return t.vocab_file or resolve_data_paths(config)
    if t.tokenizer == "clip":
        path = t.vocab_file or tokenizers._default_clip_bpe()  # noqa: SLF001
        if not os.path.exists(path):
            raise ValueError(f"config.text.vocab_file={path!r} is not a local file or folder; "
                             "export needs the tokenizer files to copy into the artifact.")
        return path
    raise ValueError(f"config.text.tokenizer={t.tokenizer!r}: use 'clip' or 'wordpiece'.")


# ------------------------------------------------------------------------------------------
# Query settings and the manifest


def query_settings(config, spec: detectors.Spec) -> dict:
    """How the runtime tokenizes queries for this config (see ovd_jax/export/queries.py)."""
    length = int(config.text.context_length)
    if spec.kind == "chunks":
        per_chunk = int(config.data.get("eval_chunk_size", 0) or 0) or None
        # A query costs at least one token plus a separator token, so a prompt of L tokens
        # ([start] ... [end]) holds at most (L - 1) // 2 of them.
        most = (length - 1) // 2
        return {"context_length": length, "max_per_chunk": per_chunk,
                "chunk_classes": min(per_chunk or most, most), "per_call": 16}
    templates, clean = spec.prompts(config)
    return {"templates": templates, "clean_names": clean, "bucket": detectors.QUERY_BUCKET,
            "per_call": max(1, _ENCODE_PER_CALL // len(templates)), "context_length": length}


def input_settings(config) -> dict:
    size = int(config.data.image_size)
    opts = resize_options(config.data, train=False)
    resize = ({"rule": "shortest_edge", "min_size": int(opts["min_size"]),
               "max_size": int(opts["max_size"])} if opts
              else {"rule": "longest_side", "size": size})
    return {"canvas": size, "resize": resize, "layout": "NHWC float32, padded bottom/right",
            "pixel_mean": [float(v) for v in transforms.CLIP_MEAN],
            "pixel_std": [float(v) for v in transforms.CLIP_STD]}


def make_manifest(config, spec: detectors.Spec, tokenizer_info: dict, platforms) -> dict:
    return {
        "format": runtime.FORMAT, "format_version": runtime.FORMAT_VERSION,
        "method": config.method, "query_kind": spec.kind, "query_input": "tokens",
        "input": input_settings(config), "queries": query_settings(config, spec),
        "tokenizer": tokenizer_info, "platforms": list(platforms),
        "functions": {name: f"{name}.jax_exported" for name in runtime.FUNCTIONS
                      + (("regions",) if spec.regions else ())},
        "eval": {"max_detections": int(config.eval.max_detections),
                 "score_threshold": float(config.eval.score_threshold)},
        "versions": {"jax": jax.__version__, "ovd_jax": ovd_jax.__version__,
                     "python": pyplatform.python_version()},
    }


# ------------------------------------------------------------------------------------------
# In-process functions (what `detect.py --workdir` and the tests run) and their export


def export_params(config, variables) -> dict:
    spec = detectors.get_spec(config.method)
    constants = spec.constants(config) if spec.constants else {}
    params = {"model": variables}
    if constants:
        params["constants"] = jax.tree.map(np.asarray, jax.device_get(constants))
    return params


def functions(model, config):
    """(encode_queries, detect, regions or None), jitted, for the config's method."""
    spec = detectors.get_spec(config.method)
    regions = jax.jit(spec.regions(model, config)) if spec.regions else None
    return jax.jit(spec.encode(model, config)), jax.jit(spec.detect(model, config)), regions


def _spec_of(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


def export_functions(model, config, params, manifest: dict, platforms) -> dict:
    """{name: jax.export.Exported}: encode_queries with a symbolic query count, detect (and
    regions) with a symbolic batch (detect's query count: multiples of the bucket, or
    chunks)."""
    encode, detect, regions = functions(model, config)
    pspec = _spec_of(params)
    q = manifest["queries"]
    length = int(q["context_length"])
    n, = jax.export.symbolic_shape("q")
    if manifest["query_kind"] == "concepts":
        shape = (n, len(q["templates"]), length)
    else:
        shape = (n, length)
    tokens = jax.ShapeDtypeStruct(shape, jnp.int32)
    mask = jax.ShapeDtypeStruct(shape, jnp.bool_)
    exp_encode = jax.export.export(encode, platforms=platforms)(pspec, tokens, mask)
    emb = exp_encode.out_avals[0]
    b, k = jax.export.symbolic_shape(f"b, {q.get('bucket', 1)}*k")
    size = int(manifest["input"]["canvas"])
    images = jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32)
    image_hw = jax.ShapeDtypeStruct((b, 2), jnp.int32)
    if manifest["query_kind"] == "concepts":
        qspec = {"emb": jax.ShapeDtypeStruct((k, emb.shape[-1]), emb.dtype),
                 "valid": jax.ShapeDtypeStruct((k,), jnp.bool_)}
    else:
        kc = int(q["chunk_classes"])
        qspec = {"text": jax.ShapeDtypeStruct((k, length, emb.shape[-1]), emb.dtype),
                 "token_mask": jax.ShapeDtypeStruct((k, length), jnp.bool_),
                 "class_token_map": jax.ShapeDtypeStruct((k, kc, length), jnp.float32),
                 "class_index": jax.ShapeDtypeStruct((k, kc), jnp.int32)}
    out = {"encode_queries": exp_encode,
           "detect": jax.export.export(detect, platforms=platforms)(pspec, images, image_hw,
                                                                   qspec)}
    if regions is not None:
        out["regions"] = jax.export.export(regions, platforms=platforms)(pspec, images, image_hw)
    return out


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested dicts -> {"a/b/c": array}."""
    out = {}
    for key, value in tree.items():
        if "/" in str(key):
            raise ValueError(f"parameter name {key!r} contains '/', which flat keys reserve.")
        name = f"{prefix}{key}"
        if isinstance(value, dict) or hasattr(value, "items"):
            out.update(flatten(dict(value), name + "/"))
        else:
            out[name] = np.ascontiguousarray(np.asarray(value))
    return out


def _copy_tokenizer(config, folder: str) -> dict:
    source = tokenizer_source(config)
    os.makedirs(folder)
    t = config.text
    if os.path.isdir(source):
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(os.path.join(source, name), os.path.join(folder, name))
        name = "."
    else:
        name = os.path.basename(source)
        shutil.copy(source, os.path.join(folder, name))
    return {"kind": t.tokenizer, "file": name, "context_length": int(t.context_length),
            "lowercase": True}


def write_artifact(out: str, config, model, variables, *, platforms=DEFAULT_PLATFORMS,
                   source: dict | None = None) -> dict:
    """Exports `model` with `variables` (numpy pytree) to the folder `out` (replaced
    atomically when it exists). Returns the manifest."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    spec = detectors.get_spec(config.method)
    platforms = tuple(platforms)
    out = os.path.abspath(out)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        tok = _copy_tokenizer(config, os.path.join(tmp, runtime.TOKENIZER_DIR))
        manifest = make_manifest(config, spec, tok, platforms)
        manifest["source"] = source or {}
        params = export_params(config, variables)
        start = time.perf_counter()
        exported = export_functions(model, config, params, manifest, platforms)
        manifest["export_seconds"] = round(time.perf_counter() - start, 2)
        for name, fn in exported.items():
            with open(os.path.join(tmp, f"{name}.jax_exported"), "wb") as f:
                f.write(fn.serialize())
        save_file(flatten(params), os.path.join(tmp, runtime.PARAMS))
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=1))
        files = [runtime.PARAMS, "config.json", *manifest["functions"].values()]
        files += [os.path.join(runtime.TOKENIZER_DIR, n)
                  for n in sorted(os.listdir(os.path.join(tmp, runtime.TOKENIZER_DIR)))]
        manifest["files"] = {n: runtime.sha256_file(os.path.join(tmp, n)) for n in files}
        manifest["params_sha256"] = manifest["files"][runtime.PARAMS]
        with open(os.path.join(tmp, runtime.MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
        if os.path.exists(out):
            old = f"{out}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def export_run(out: str, *, workdir: str | None = None, checkpoint: str | None = None,
               config=None, platforms=DEFAULT_PLATFORMS) -> dict:
    """export.py: restores the newest checkpoint of `workdir` (or `checkpoint`) and writes the
    artifact `out`. Returns the manifest."""
    source = checkpoint or workdir
    if not source:
        raise ValueError("export.py needs --workdir (newest checkpoint) or --checkpoint.")
    config = load_config(workdir, checkpoint, config)
    detectors.get_spec(config.method)  # fail before the (slow) restore
    exp, variables, step = restore(config, source)
    return write_artifact(out, exp.config, exp.model, variables, platforms=platforms,
                          source={"checkpoint": os.path.abspath(source), "step": int(step)})


def inprocess_detector(workdir: str | None = None, checkpoint: str | None = None, config=None,
                       cache_dir: str = "") -> runtime.Detector:
    """The same `Detector` the artifact gives, running the flax model in-process."""
    config = load_config(workdir, checkpoint, config)
    spec = detectors.get_spec(config.method)
    source = checkpoint or workdir
    exp, variables, step = restore(config, source)
    tok = {"kind": config.text.tokenizer, "context_length": int(config.text.context_length)}
    manifest = make_manifest(exp.config, spec, tok, (runtime.current_platform(),))
    # Query-cache key of this checkpoint (an artifact uses its parameters' checksum).
    manifest["params_sha256"] = f"{os.path.abspath(source)}@{step}"
    encode, detect, regions = functions(exp.model, exp.config)
    params = jax.device_put(export_params(exp.config, variables))
    return runtime.Detector(manifest, params, encode, detect, exp.tokenizer, cache_dir, regions)

