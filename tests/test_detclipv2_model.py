"""DetCLIPv2 detector: alignment-logit formula and concept pooling vs NumPy, init constants,
anchors for both resolutions, and the deformable conv that lets classification gradients reach
the regression tower."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import detclipv2 as recipes
from ovd_jax.methods import detclipv2 as method
from ovd_jax.models.detclipv2 import DetCLIPv2Detector

VOCAB = 50


def _setup(seed, **model):
    c = recipes.get_config("smoke")
    for k, v in model.items():
        c.model[k] = v
    rng = np.random.default_rng(seed)
    m = method.build_model(c, text_vocab_size=VOCAB, eot_token_id=None)
    n, k, length, s = 2, 3, c.text.context_length, c.data.image_size
    images = jnp.asarray(rng.normal(size=(n, s, s, 3)), jnp.float32)
    ids = jnp.asarray(rng.integers(5, VOCAB, size=(n, k, length)), jnp.int32)
    mask = jnp.asarray(np.arange(length)[None, None] < rng.integers(2, length, size=(n, k, 1)))
    v = nn.meta.unbox(jax.jit(m.init)(jax.random.key(int(rng.integers(1 << 30))), images, ids,
                                      mask))
    return c, m, v, images, ids, mask, rng


def test_init_constants_and_logits_formula(seed):
    c, m, v, images, ids, mask, rng = _setup(seed)
    p = v["params"]
    np.testing.assert_allclose(p["logit_scale"], [math.log(c.model.logit_scale_init)], rtol=1e-6)
    np.testing.assert_allclose(p["bias0"], [-math.log(0.99 / 0.01)], rtol=1e-6)
    assert not np.any(np.asarray(p["head"]["cls_offset"]["kernel"]))  # DCN starts as a conv
    # Perturb the learnable scalars so the check sees them.
    p = dict(p, logit_scale=p["logit_scale"] + 0.3, bias0=p["bias0"] - 0.2)
    v = dict(v, params=p)
    out = jax.jit(m.apply)(v, images, ids, mask)
    region = np.float64(out["region_emb"])
    concept = np.float64(out["concept_emb"])
    np.testing.assert_allclose(np.linalg.norm(region, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(concept, axis=-1), 1.0, rtol=1e-5)
    want = (np.einsum("nad,nkd->nak", region, concept) * np.exp(float(p["logit_scale"][0]))
            + float(p["bias0"][0]))
    np.testing.assert_allclose(np.asarray(out["logits"]), want, rtol=1e-5, atol=1e-5,
                               err_msg=f"seed={seed}")


def test_concept_embedding_is_masked_mean_of_text_tokens(seed):
    _, m, v, _, ids, mask, rng = _setup(seed)
    encode = jax.jit(lambda v, i, k: m.apply(v, i, k, method=DetCLIPv2Detector.encode_concepts))
    emb = np.asarray(encode(v, ids, mask))
    flat_ids, flat_mask = ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1])
    hidden = np.float64(jax.jit(lambda v, i, k: m.apply(
        v, i, k,
        method=lambda mod, i, k: mod.text_encoder(i, k.astype(jnp.int32))["last_hidden_state"])
    )(v, flat_ids, flat_mask))
    mk = np.asarray(flat_mask, np.float64)[..., None]
    mean = (hidden * mk).sum(1) / mk.sum(1)
    want = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
    np.testing.assert_allclose(emb.reshape(want.shape), want, rtol=1e-5, atol=1e-6)
    # Tokens after the mask are ignored: a concept's embedding does not depend on its padding.
    garbage = jnp.where(mask, ids, jnp.asarray(rng.integers(5, VOCAB, size=ids.shape)))
    again = np.asarray(encode(v, garbage, mask))
    np.testing.assert_allclose(again, emb, rtol=1e-5, atol=1e-6)


def test_anchor_count_matches_model_at_both_resolutions(seed):
    c, m, v, *_ = _setup(seed)
    for size in (c.data.image_size, c.image_text.image_size):
        imgs = jnp.zeros((1, size, size, 3))
        out = jax.eval_shape(lambda v, x: m.apply(v, x, method=DetCLIPv2Detector.regions),
                             v, imgs)
        a, per_level = method.anchors(c, size)
        assert out["region_emb"].shape[1] == a.shape[0] == sum(per_level), size
        assert np.all(a[:, 2] > a[:, 0])


def _reg_tower_grad(seed, deform):
    c, m, v, images, ids, mask, rng = _setup(seed, deform_cls=deform)
    target = jnp.asarray(rng.normal(size=(images.shape[0], 1, 16)), jnp.float32)
    if deform:  # a trained offset conv (zero at init, where offsets ignore their input)
        head = dict(v["params"]["head"])
        kernel = head["cls_offset"]["kernel"]
        head["cls_offset"] = dict(head["cls_offset"], kernel=jnp.asarray(
            rng.normal(size=kernel.shape) * 0.1, jnp.float32))
        v = dict(v, params=dict(v["params"], head=head))

    def f(params):
        out = m.apply(dict(v, params=params), images, method=DetCLIPv2Detector.regions)
        return jnp.sum(out["region_emb"] * target)  # depends on the classification branch only

    g = jax.jit(jax.grad(f))(v["params"])["head"]
    return {k: float(sum(np.abs(np.asarray(x)).sum() for x in jax.tree.leaves(sub)))
            for k, sub in g.items()}


def test_classification_gradient_reaches_regression_tower_only_through_deform_conv(seed):
    with_dcn = _reg_tower_grad(seed, True)
    without = _reg_tower_grad(seed, False)
    assert with_dcn["reg_convs_0"] > 0 and with_dcn["cls_offset"] > 0, with_dcn
    assert without["reg_convs_0"] == 0.0, without
    assert "cls_offset" not in without
