"""The CLIP teacher stage (config.method = "clip"): its loss against NumPy, the RPN side loss
leaving the towers alone, the zipped image-text + detection loader, and its 8-device step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import one_train_step, smoke_config

from ovd_jax.methods import clip as clip_method
from ovd_jax.training import sharding as shd
from ovd_jax.training import train_step as ts
from ovd_jax.training.experiment import build_experiment
from ovd_jax.training.loop import make_train_loader


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    config = smoke_config(str(tmp_path_factory.mktemp("data") / "syn"), arg="teacher,smoke")
    return build_experiment(config)


@pytest.fixture(scope="module")
def batch(exp):
    return next(iter(make_train_loader(exp)))


def test_loader_zips_image_text_and_detection_batches(exp, batch):
    c = exp.config
    b_it, b_det = c.image_text.batch_size, c.train.batch_size
    assert batch["image"].shape == (b_it, 64, 64, 3) and batch["caption_tokens"].shape == (b_it, 24)
    assert batch["det_image"].shape == (b_det, 64, 64, 3) and batch["det_boxes"].shape[0] == b_det
    assert set(clip_method.device_keys(c)) <= set(batch)
    # Caption tokens decode back to one of that image's captions (no truncation at 24).
    records = {r["image_id"]: r for r in clip_method.image_text.image_text_records(c)}
    vocab = {i: t for t, i in exp.tokenizer.hf.get_vocab().items()}
    for iid, row in zip(batch["image_id"], batch["caption_tokens"]):
        words = [vocab[int(t)] for t in row if int(t) not in (exp.tokenizer.pad_token_id,
                                                               exp.tokenizer.sot_token_id,
                                                               exp.tokenizer.eot_token_id)]
        text = " ".join(words).replace(" ##", "").replace(" ,", ",").replace(" .", ".")
        assert text in records[int(iid)]["captions"], (text, records[int(iid)]["captions"])
    # The zipped iterator resumes exactly (both parts).
    it = iter(make_train_loader(exp))
    next(it)
    state = it.get_state()
    want = next(it)
    again = iter(make_train_loader(exp))
    again.set_state(state)
    got = next(again)
    for k in ("image_id", "det_image_id"):
        np.testing.assert_array_equal(got[k], want[k])


def test_clip_loss_matches_numpy_and_rpn_leaves_towers_alone(exp, batch, seed):
    rng = np.random.default_rng(seed)
    mesh = shd.make_mesh((-1, 1, 1), devices=jax.devices()[:1])
    state, _, _ = ts.create_train_state(exp, mesh, jax.random.key(seed))
    params = jax.tree.map(lambda x: x, state.params)
    params["logit_scale"] = jnp.asarray(rng.uniform(1.0, 4.0), jnp.float32)
    keys = clip_method.device_keys(exp.config)
    b = {k: jnp.asarray(batch[k]) for k in keys}
    valid = np.asarray(batch["valid"]).copy()
    valid[-1] = False  # a padding entry: no row, no negative
    b["valid"] = jnp.asarray(valid)

    def loss(p, part):
        out = clip_method.train_loss(exp.model, p, state.model_state, b, {},
                                     jax.random.key(1), exp.config)[1]
        return out[part] if part != "rpn" else out["rpn_cls"] + out["rpn_box"]

    got = float(loss(params, "clip_loss"))
    variables = {"params": params, **state.model_state}
    img = np.asarray(clip_method.image_embeddings(exp.model, variables, b["image"], exp.config),
                     np.float64)
    np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1.0, rtol=1e-5)
    txt = np.asarray(exp.model.apply(variables, b["caption_tokens"],
                                     method=clip_method.RegionCLIPDetector.encode_text), np.float64)
    txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
    keep = np.flatnonzero(valid)
    logits = np.exp(float(params["logit_scale"])) * img[keep] @ txt[keep].T

    def ce(lg):
        lg = lg - lg.max(-1, keepdims=True)
        return np.mean(np.log(np.exp(lg).sum(-1)) - np.diagonal(lg))

    want = 0.5 * (ce(logits) + ce(logits.T))
    np.testing.assert_allclose(got, want, rtol=2e-4, err_msg=f"seed={seed}")
    # The RPN is trained on stop-gradient res4: its loss moves the RPN head only.
    grads = jax.grad(lambda p: loss(p, "rpn"))(params)
    assert float(jnp.abs(jax.tree.leaves(grads["rpn_head"])[0]).max()) > 0
    for tower in ("vision", "text"):
        assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads[tower])), tower
    # And the temperature is capped at 100 (CLIP's clamp): no gradient above it.
    params["logit_scale"] = jnp.asarray(5.0)
    g = jax.grad(lambda p: loss(p, "clip_loss"))(params)["logit_scale"]
    assert float(g) == 0.0


def test_teacher_step_eight_devices_equals_one(exp, batch):
    assert jax.device_count() == 8

    def one_step(devices):
        params, metrics, _, dev_batch = one_train_step(exp, devices, batch)
        return params, metrics, dev_batch

    p8, m8, b8 = one_step(jax.devices())
    p1, m1, _ = one_step(jax.devices()[:1])
    assert len(b8["image"].sharding.device_set) == 8
    assert len(b8["det_image"].sharding.device_set) == 8
    for k in ("loss", "clip_loss", "rpn_cls"):
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for path, a in jax.tree_util.tree_leaves_with_path(p8):
        b = p1
        for key in path:
            b = b[key.key]
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))
