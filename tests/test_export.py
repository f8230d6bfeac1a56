"""Checkpoint export (export.py) and artifact inference (detect.py, ovd_jax/export/runtime.py).

Per method, a randomly initialised smoke model is saved as an orbax checkpoint in a workdir
(what training leaves; the train step itself is covered elsewhere), exported for the CPU, and:
* the artifact's detections equal the in-process `predict` on the synthetic validation images
  (boxes within 1e-4, same classes, same valid slots), with its own vocabulary encoding;
* every exported parameter is bit-identical to the saved one;
* a fresh process where importing flax (and ovd_jax.models / methods / training) fails loads
  every artifact and runs one.
The error cases (missing / partial / corrupt / wrong-platform artifact, unreadable image, empty
query list) each exit non-zero with their message and leave no file in OUT.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import REPO, smoke_config

from ovd_jax.data.transforms import decode_image, image_example
from ovd_jax.export import artifact, cli, runtime
from ovd_jax.training import checkpoint as ckpt
from ovd_jax.training import sharding as shd
from ovd_jax.training import train_step as ts
from ovd_jax.training.experiment import build_experiment
from ovd_jax.training.loop import checkpoint_meta

RECIPES = {"regionclip": "smoke", "glip": "glip,smoke", "detclipv2": "detclipv2,smoke"}
NUM_IMAGES = 3


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data") / "syn")


def _saved_run(config, workdir: str, seed: int):
    """A workdir as train.py leaves it: config.json and an orbax checkpoint (step 1) of a
    randomly initialised train state. Returns (experiment, saved params + model state)."""
    exp = build_experiment(config, with_train=False)
    mesh = shd.make_mesh(config.mesh.shape, config.mesh.axes)
    state, _, _ = ts.create_train_state(exp, mesh, jax.random.key(seed))
    saver = ckpt.Checkpointer(ckpt.checkpoint_dir(workdir))
    saver.save(1, state, {}, checkpoint_meta(exp, state))
    saver.close()
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=1))
    return exp, jax.tree.map(np.asarray, jax.device_get(state.variables()))


@pytest.fixture(scope="module")
def build(data_root, tmp_path_factory):
    """method -> its saved run and artifact, made once per module (the CLI exports
    RegionCLIP's, the library call the others')."""
    cache = {}

    def make(method):
        if method not in cache:
            base = tmp_path_factory.mktemp(method)
            workdir, art = str(base / "run"), str(base / "artifact")
            config = smoke_config(data_root, "demo", RECIPES[method])
            if method == "regionclip":
                # The RoI head in chunks of 24 of the 64 proposals (lax.map, a padded last
                # chunk) must export with the symbolic batch like the full-size recipes' 32.
                config.eval.rois_per_chunk = 24
            exp, saved = _saved_run(config, workdir, seed=len(method))
            if method == "regionclip":
                manifest = cli.export_main(["--workdir", workdir, "--out", art,
                                            "--platforms", "cpu"])
            else:
                manifest = artifact.export_run(art, workdir=workdir, platforms=("cpu",))
            cache[method] = {"method": method, "exp": exp, "saved": saved, "workdir": workdir,
                             "artifact": art, "manifest": manifest}
        return cache[method]

    return make


@pytest.fixture(params=sorted(RECIPES))
def run(request, build):
    return build(request.param)


def _vocabulary(exp) -> list[str]:
    """The texts the method embeds for its evaluation vocabulary (DetCLIPv2: enriched with
    definitions when the dataset has them), as a user would type them."""
    texts = getattr(exp.method, "vocabulary_texts", None)
    return list(texts(exp)) if texts else list(exp.eval_vocab.class_names)


def _val_images(exp):
    records = exp.val_data.records[:NUM_IMAGES]
    return records, [decode_image(r["path"]) for r in records]


def test_artifact_equals_inprocess_predict(run):
    exp = run["exp"]
    config = exp.config
    variables = run["saved"]  # equal to the restored ones (test_export_keeps_parameters...)
    det = runtime.load_artifact(run["artifact"], cache_dir="")
    records, images = _val_images(exp)
    # The runtime's resize + pad is the evaluation transform.
    examples = [image_example(r, image_size=config.data.image_size, flip=False)[0]
                for r in records]
    batch = np.stack([e["image"] for e in examples])
    hw = np.stack([e["image_hw"] for e in examples])
    for image, e in zip(images, examples):
        x, scale, size = runtime.preprocess(image, det.manifest["input"])
        np.testing.assert_array_equal(x, e["image"])
        np.testing.assert_array_equal(size, e["image_hw"])
        assert scale == pytest.approx(float(e["scale"]), rel=1e-6)

    queries = exp.method.eval_queries(exp, variables)
    ref = jax.jit(lambda v, im, s, q: exp.method.predict(exp.model, v, im, s, q, config))(
        variables, batch, hw, queries)
    ref = jax.tree.map(np.asarray, ref)
    out = det.detect_arrays(images, det.encode(_vocabulary(exp)))
    assert ref["valid"].any()
    np.testing.assert_array_equal(out["valid"], ref["valid"])
    v = ref["valid"]
    np.testing.assert_array_equal(out["classes"][v], ref["classes"][v])
    np.testing.assert_allclose(out["boxes"][v], ref["boxes"][v], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["scores"][v], ref["scores"][v], atol=1e-5, rtol=0)
    if det.regions_fn is not None:  # every detection is one of the class-agnostic regions
        reg = det.regions(images)
        for i in range(len(images)):
            boxes = reg["boxes"][i][reg["valid"][i]]
            gap = np.abs(boxes[None] - ref["boxes"][i][v[i]][:, None]).max(-1).min(-1)
            assert (gap <= 1e-4).all(), gap.max()
        norms = np.linalg.norm(reg["embeddings"][reg["valid"]], axis=-1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-4)


def test_export_keeps_parameters_bit_exact(run):
    from safetensors.numpy import load_file

    flat = load_file(os.path.join(run["artifact"], runtime.PARAMS))
    expected = artifact.flatten({"model": run["saved"]})
    assert sorted(flat) == sorted(expected)
    for key, value in expected.items():
        assert flat[key].dtype == value.dtype, key
        np.testing.assert_array_equal(flat[key], value, err_msg=key)
    assert run["manifest"]["params_sha256"] == runtime.sha256_file(
        os.path.join(run["artifact"], runtime.PARAMS))
    # Batch (and query count) stay symbolic in the exported detect.
    with open(os.path.join(run["artifact"], "detect.jax_exported"), "rb") as f:
        detect = jax.export.deserialize(bytearray(f.read()))
    images = jax.tree.leaves(detect.in_avals)
    assert any(not isinstance(a.shape[0], int) and a.ndim == 4 for a in images)
    assert detect.platforms == ("cpu",)


_NO_FLAX = """
import importlib.abc, json, os, sys
import jax
# The parent process compiled the same programs for the same batch: reuse them.
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("flax", "optax", "orbax") or name.startswith(
                ("ovd_jax.models", "ovd_jax.training", "ovd_jax.methods")):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
from ovd_jax.export import runtime
jobs = json.loads(sys.argv[1])
counts = []
for job in jobs:
    det = runtime.load_artifact(job["artifact"], cache_dir="")
    if not job["run"]:  # loading and tokenizing is what differs between methods
        det.tokenizer.encode(job["queries"])
        continue
    images = [runtime.read_image(p) for p in job["images"]]
    res = det.detect(images, det.encode(job["queries"]))
    counts.append([len(r["scores"]) for r in res])
try:
    import flax  # noqa: F401
    raise SystemExit("flax imported")
except ImportError:
    pass
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("flax", "optax", "orbax"))
print(json.dumps({"n": counts, "heavy": heavy}))
"""


def test_artifacts_run_where_flax_cannot_be_imported(build):
    """All three artifacts load (programs, parameters, tokenizer) without flax; RegionCLIP's
    also encodes queries and detects (the runtime code after loading is method-agnostic, and
    each compile costs tens of seconds on a busy 2-core machine)."""
    jobs = []
    for method in sorted(RECIPES):
        run = build(method)
        records, _ = _val_images(run["exp"])
        jobs.append({"artifact": run["artifact"], "queries": _vocabulary(run["exp"]),
                     "images": [r["path"] for r in records], "run": method == "regionclip"})
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
    proc = subprocess.run([sys.executable, "-c", _NO_FLAX, json.dumps(jobs)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [] and [len(n) for n in report["n"]] == [NUM_IMAGES]


# ------------------------------------------------------------------------------------------
# detect.py and its errors (one method suffices: the host code is shared)


@pytest.fixture
def regionclip_run(build):
    run = build("regionclip")
    return run["exp"], run["artifact"], run["workdir"]


def test_detect_cli_writes_results_and_pictures(regionclip_run, tmp_path, capsys):
    exp, art = regionclip_run[:2]
    folder = os.path.dirname(exp.val_data.records[0]["path"])
    images = tmp_path / "images"
    images.mkdir()
    for r in exp.val_data.records[:3]:
        shutil.copy(r["path"], images)
    qfile = tmp_path / "q.txt"
    qfile.write_text("red circle\n\nblue square\n")
    out = tmp_path / "out"
    res = cli.detect_main(["--artifact", art, "--image", str(images), "--queries", f"@{qfile}",
                           "--threshold", "0", "--batch", str(NUM_IMAGES), "--out", str(out),
                           "--no_progress"])
    table = capsys.readouterr().out
    assert "red circle" in table or "blue square" in table
    files = sorted(os.listdir(out))
    assert "detections.json" in files and "index.json" in files
    assert sum(f.endswith(".png") for f in files) == 3
    results = json.loads((out / "detections.json").read_text())
    index = json.loads((out / "index.json").read_text())
    assert [c["name"] for c in index["categories"]] == ["red circle", "blue square"]
    assert len(results) == len(res["results"]) > 0
    sizes = {im["id"]: (im["width"], im["height"]) for im in index["images"]}
    for d in results:  # xywh inside the original image
        w, h = sizes[d["image_id"]]
        x, y, bw, bh = d["bbox"]
        assert 0 <= x and 0 <= y and bw >= 0 and bh >= 0
        assert x + bw <= w + 0.01 and y + bh <= h + 0.01
        assert d["category_id"] in (1, 2)
    # The query embeddings were cached for this vocabulary (and are reused).
    cache = os.listdir(os.path.join(art, "query_cache"))
    assert len(cache) == 1
    assert os.path.isdir(folder)
    # --workdir runs the flax model in-process through the same host code: same detections.
    workdir = regionclip_run[2]
    out2 = tmp_path / "out_inprocess"
    cli.detect_main(["--workdir", workdir, "--image", str(images), "--queries", f"@{qfile}",
                     "--threshold", "0", "--batch", str(NUM_IMAGES), "--out", str(out2),
                     "--no_progress", "--no_visualize"])
    inproc = json.loads((out2 / "detections.json").read_text())
    assert [(d["image_id"], d["category_id"]) for d in inproc] == \
        [(d["image_id"], d["category_id"]) for d in results]
    np.testing.assert_allclose([d["bbox"] for d in inproc], [d["bbox"] for d in results],
                               atol=0.02)


def _detect_error(args, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        cli.detect_main([*args, "--no_progress"])
    assert info.value.code not in (0, None)
    return capsys.readouterr().err


def _copy_artifact(art, dst, edit=None):
    shutil.copytree(art, dst, ignore=shutil.ignore_patterns("query_cache"))
    if edit:
        edit(str(dst))
    return str(dst)


def _set_manifest(path, **changes):
    file = os.path.join(path, runtime.MANIFEST)
    with open(file) as f:
        m = json.load(f)
    m.update(changes)
    with open(file, "w") as f:
        json.dump(m, f)


def _flip_byte(file, offset=-100):
    data = bytearray(open(file, "rb").read())
    data[offset] ^= 0xFF
    open(file, "wb").write(bytes(data))


def _garbage_blob(path):
    file = os.path.join(path, "detect.jax_exported")
    open(file, "wb").write(b"not a flatbuffer" * 10)
    m = json.load(open(os.path.join(path, runtime.MANIFEST)))
    m["files"]["detect.jax_exported"] = runtime.sha256_file(file)
    json.dump(m, open(os.path.join(path, runtime.MANIFEST), "w"))


def test_detect_errors_are_clear_and_leave_nothing(regionclip_run, tmp_path, capsys):
    exp, art = regionclip_run[:2]
    image = exp.val_data.records[0]["path"]
    bad_image = tmp_path / "broken.png"
    bad_image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 50)
    cases = {
        "missing": (str(tmp_path / "nope"), image, "a", "does not exist"),
        "no manifest": (_copy_artifact(art, tmp_path / "a1", lambda p: os.remove(
            os.path.join(p, runtime.MANIFEST))), image, "a", "partial"),
        "no blob": (_copy_artifact(art, tmp_path / "a2", lambda p: os.remove(
            os.path.join(p, "detect.jax_exported"))), image, "a", "detect.jax_exported is "
                                                                   "missing"),
        "checksum": (_copy_artifact(art, tmp_path / "a3", lambda p: _flip_byte(
            os.path.join(p, runtime.PARAMS))), image, "a", "checksum"),
        "undecodable": (_copy_artifact(art, tmp_path / "a4", _garbage_blob), image, "a",
                        "does not deserialise"),
        "platform": (_copy_artifact(art, tmp_path / "a5", lambda p: _set_manifest(
            p, platforms=["tpu"])), image, "a", "exported for ['tpu']"),
        "image": (art, str(bad_image), "a", "broken.png"),
        "empty queries": (art, image, " , ,", "query list is empty"),
    }
    for name, (path, img, queries, message) in cases.items():
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        err = _detect_error(["--artifact", path, "--image", img, "--queries", queries,
                             "--out", str(out)], capsys)
        assert message in err, (name, err)
        assert not out.exists() or not os.listdir(out), name
        assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p], name


def test_export_errors_leave_no_artifact(tmp_path, capsys):
    out = tmp_path / "art"
    with pytest.raises(SystemExit) as info:
        cli.export_main(["--workdir", str(tmp_path / "none"), "--out", str(out)])
    assert info.value.code == 1
    assert "config.json" in capsys.readouterr().err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_labels_of_touching_boxes_stay_visible():
    from ovd_jax import visualize

    # Two boxes with the same top-left corner: both labels must remain on the picture.
    boxes = np.asarray([[10, 30, 60, 80], [10, 30, 70, 90]], np.float32)
    img = np.asarray(visualize.draw_detections(
        np.full((100, 100, 3), 128, np.uint8), boxes, np.asarray([0.9, 0.8]),
        np.asarray([0, 1]), ["aaaa", "bbbb"]))
    for k in (0, 1):
        colour = np.asarray(visualize._colour(k))  # noqa: SLF001
        # Its visible box outline alone is ~200 px; its label adds ~300 (a covered one: 0).
        assert (img == colour).all(-1).sum() > 350, k


def test_runtime_reads_images_as_training_does(tmp_path, rng):
    from PIL import Image

    base = rng.integers(0, 256, (20, 30, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: displayed 30 x 20
    rotated = tmp_path / "rotated.jpg"
    Image.fromarray(base).save(rotated, exif=exif.tobytes())
    deep = tmp_path / "deep.png"
    Image.fromarray(rng.integers(0, 65536, (12, 9), np.uint16)).save(deep)
    for path in (rotated, deep):
        np.testing.assert_array_equal(runtime.read_image(str(path)), decode_image(str(path)))
    assert runtime.read_image(str(rotated)).shape == (30, 20, 3)
