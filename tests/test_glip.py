"""GLIP detector and method: alignment-logit formula and init constants (vs NumPy), every recipe
initialises, chunked inference merges chunks exactly, caption helpers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import glip as glip_configs
from ovd_jax.methods import glip as glip_method
from ovd_jax.models.glip import LOGIT_CLAMP, GLIPDetector
from ovd_jax.text import grounding as gtext
from ovd_jax.text import tokenizers

VOCAB = 60


def _tiny_config(**model):
    c = glip_configs.get_config("glip_t,smoke")
    for k, v in model.items():
        c.model[k] = v
    return c


def _init(config, rng, n=2, vocab=VOCAB):
    model = glip_method.build_model(config, text_vocab_size=vocab, eot_token_id=None)
    s, length = config.data.image_size, config.text.context_length
    images = jnp.asarray(rng.normal(size=(n, s, s, 3)), jnp.float32)
    ids = jnp.asarray(rng.integers(5, vocab, size=(n, length)), jnp.int32)
    mask = jnp.asarray(np.arange(length)[None] < rng.integers(4, length, size=(n, 1)))
    variables = jax.jit(model.init)(jax.random.key(int(rng.integers(1 << 30))), images, ids, mask)
    return model, jax.tree.map(np.asarray, nn_unbox(variables)), images, ids, mask


def nn_unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


def test_init_constants(seed):
    rng = np.random.default_rng(seed)
    _, variables, *_ = _init(_tiny_config(), rng)
    p = variables["params"]
    np.testing.assert_array_equal(p["log_scale"], [0.0])
    np.testing.assert_array_equal(p["bias_lang"], np.zeros(16))
    np.testing.assert_allclose(p["bias0"], [-math.log((1 - 0.01) / 0.01)], rtol=1e-6)
    for k in range(3):  # one Scale per level, init 1
        np.testing.assert_array_equal(p[f"scales_{k}"]["scale"], [1.0])
    # Upstream names: the tower and the head live where a key mapping expects them.
    for name in ("backbone", "fpn", "language_backbone", "fuse_0", "lang_layers_0", "dyconv_0",
                 "bbox_pred", "centerness", "dot_product_projection_text"):
        assert name in p, (name, sorted(p))


def _numpy_logits(visual, text, kernel, bias, log_scale, bias_lang, bias0):
    visual, text = np.float64(visual), np.float64(text)
    t = text / np.linalg.norm(text, axis=-1, keepdims=True)
    proj = (t / 2.0) @ np.float64(kernel) + np.float64(bias)
    dot = np.einsum("nac,nlc->nal", visual, proj)
    out = dot / np.exp(np.float64(log_scale[0])) + (t @ np.float64(bias_lang) + bias0[0])[:, None]
    return np.clip(out, -50000.0, 50000.0)


@pytest.mark.parametrize("log_scale", [None, -12.0])
def test_alignment_logits_match_numpy(seed, log_scale):
    """logits = v . Linear(norm(t)/2) / exp(log_scale) + (norm(t) . bias_lang + bias0), clamped;
    image features are not normalised. Head parameters are randomised so every term counts;
    log_scale=-12 drives the logits into the +-50000 clamp."""
    rng = np.random.default_rng(seed)
    model, variables, images, ids, mask = _init(_tiny_config(), rng)
    p = dict(variables["params"])
    p["log_scale"] = np.float32([rng.normal() if log_scale is None else log_scale])
    p["bias_lang"] = rng.normal(size=p["bias_lang"].shape).astype(np.float32)
    p["bias0"] = np.float32([rng.normal()])
    variables = {**variables, "params": p}

    @jax.jit
    def pieces(variables, images, ids, mask):
        levels = model.apply(variables, images, method=GLIPDetector.visual_features)
        text = model.apply(variables, ids, mask, method=GLIPDetector.encode_text)
        return model.apply(variables, levels, text, mask, return_features=True,
                           method=GLIPDetector.head)

    out = pieces(variables, images, ids, mask)
    proj = p["dot_product_projection_text"]
    ref = _numpy_logits(out["visual"], out["text"], proj["kernel"], proj["bias"],
                        p["log_scale"], p["bias_lang"], p["bias0"])
    got = np.asarray(out["logits"])
    a = sum(h * w for h, w in glip_method.level_shapes(_tiny_config()))
    assert got.shape == (2, a, ids.shape[1])
    np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-3 * max(1.0, np.abs(ref).mean()),
                               err_msg=f"seed {seed}")
    if log_scale is not None:
        assert np.abs(got).max() == LOGIT_CLAMP, f"seed {seed}: the clamp was not reached"
    # The full forward gives the same logits as the three pieces.
    full = jax.jit(model.apply)(variables, images, ids, mask)
    np.testing.assert_allclose(full["logits"], got, rtol=1e-5, atol=1e-4)
    assert full["box_deltas"].shape == (2, a, 4) and full["centerness"].shape == (2, a)


@pytest.mark.parametrize("arg,layers", [("glip_t", 6), ("glip_l", 8), ("glip_t,lvis", 6),
                                        ("glip_t,smoke", 1), ("glip_l,smoke", 1)])
def test_every_recipe_initialises(arg, layers):
    config = glip_configs.get_config(arg)
    if "lvis" in arg:  # an evaluation variant: the same detector as glip_t (checked there)
        assert config.model.to_dict() == glip_configs.get_config("glip_t").model.to_dict()
        assert config.eval.metric == "lvis" and config.data.eval_chunk_size == 40
        return
    model = glip_method.build_model(config, text_vocab_size=30522, eot_token_id=None)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *glip_method.init_args(config))
    p = nn_unbox(shapes["params"])
    assert f"dyconv_{layers - 1}" in p and f"dyconv_{layers}" not in p
    assert f"fuse_{layers - 1}" in p and f"lang_layers_{layers - 1}" in p
    n_params = sum(x.size for x in jax.tree.leaves(p))
    if "smoke" not in arg:
        # BERT-base (~109M) + Swin-T (~28M) / Swin-L (~197M) + FPN/DyHead/fusion.
        assert n_params > (300e6 if "glip_l" in arg else 150e6), n_params
        assert p["language_backbone"]["word_embeddings"]["embedding"].shape == (30522, 768)
    a, per_level = glip_method.anchors(config)
    assert sum(per_level) == a.shape[0]
    # One square anchor per location, side 8 x stride.
    sides = a[:, 2] - a[:, 0]
    starts = np.cumsum([0, *per_level[:-1]])
    for st, stride in zip(starts, config.model.strides):
        assert np.allclose(sides[st], 8 * stride)


def _context_free_model(config, rng, vocab):
    """A GLIP whose token features depend on the token id only (no fusion, no BERT layer, zero
    position embeddings): a class's scores then cannot depend on which chunk it is in."""
    config.model.early_fusion = False
    config.model.bert.num_hidden_layers = 0
    model, variables, *_ = _init(config, rng, n=1, vocab=vocab)
    lang = dict(variables["params"]["language_backbone"])
    lang["position_embeddings"] = {"embedding": np.zeros_like(
        lang["position_embeddings"]["embedding"])}
    variables = {**variables, "params": {**variables["params"], "language_backbone": lang}}
    return model, variables


def test_predict_merges_chunks_exactly(seed, tmp_path):
    """A vocabulary split into 3 prompts gives the same detections as one prompt holding it all
    (model made context-free so that the prompt split cannot change a class's scores)."""
    rng = np.random.default_rng(seed)
    config = _tiny_config()
    tok = tokenizers.load_wordpiece_tokenizer(_vocab(tmp_path), config.text.context_length)
    names = ["red circle", "blue square", "green star", "yellow triangle", "purple circle",
             "red star", "blue circle"]
    model, variables = _context_free_model(config, rng, tok.vocab_size)
    a = glip_method.anchors(config)[0].shape[0]
    config.eval.pre_nms_topk = a * len(names)  # every candidate enters NMS in both cases
    config.eval.max_detections = 30
    config.eval.score_threshold = 0.0
    s = config.data.image_size
    images = jnp.asarray(rng.normal(size=(2, s, s, 3)), jnp.float32)
    hw = jnp.asarray([[s, s], [s - 8, s]], jnp.int32)

    def run(chunk):
        chunks = gtext.vocabulary_chunks(names, tok, config.text.context_length, chunk)
        q = glip_method.encode_chunks(model, variables, chunks)
        out = jax.jit(lambda v, im, h, q: glip_method.predict(model, v, im, h, q, config))(
            variables, images, hw, q)
        return len(chunks["prompts"]), jax.tree.map(np.asarray, out)

    c1, one = run(None)
    c3, three = run(3)
    assert (c1, c3) == (1, 3)
    assert one["valid"].sum() > 10
    np.testing.assert_array_equal(one["valid"], three["valid"])
    np.testing.assert_allclose(one["scores"], three["scores"], rtol=1e-5, atol=1e-6,
                               err_msg=f"seed {seed}")
    # Equal scores may swap places; compare (class, box) sets per image at each score.
    for i in range(2):
        a_set = {(int(c), *np.round(b, 2)) for c, b, v in
                 zip(one["classes"][i], one["boxes"][i], one["valid"][i]) if v}
        b_set = {(int(c), *np.round(b, 2)) for c, b, v in
                 zip(three["classes"][i], three["boxes"][i], three["valid"][i]) if v}
        assert a_set == b_set, f"seed {seed}"
    assert np.all(one["boxes"][..., 2] <= s) and np.all(one["boxes"][1, :, 3] <= s - 8)
    assert np.all(np.diff(one["scores"], axis=1) <= 1e-7)  # sorted, best first


def _vocab(tmp_path):
    words = ("red green blue yellow purple circle square star triangle".split())
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *words]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n")
    return str(path)


def test_noun_phrases_and_flip():
    cap = "a red circle, a blue star and a green square on a dark grey background"
    assert [cap[s:e] for s, e in glip_method.noun_phrases(cap)] == [
        "red circle", "blue star", "green square", "dark grey background"]
    cap = "the cup left of the dog and the right hand"
    spans = [[list(sp)] for sp in glip_method.noun_phrases(cap)] + [None]
    new, moved = glip_method.swap_left_right(cap, spans)
    assert new == "the cup right of the dog and the left hand"
    old_words = [cap[s:e].replace("left", "L").replace("right", "left").replace("L", "right")
                 for [[s, e]] in spans[:-1]]
    assert [new[s:e] for [[s, e]] in moved[:-1]] == old_words
    assert moved[-1] is None
