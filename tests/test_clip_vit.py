"""CLIP ViT + text tower against Hugging Face `CLIPModel` (two small random configs saved with
save_pretrained as safetensors) and an open_clip ViT state dict, through our importer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from clip_reference import random_token_ids, randomize_, rel_err

from ovd_jax.convert import load_clip

# (text width, text heads, vision width, vision heads, image, patch, act, eos_token_id)
# eos 2 = HF's legacy argmax pooling; otherwise the first occurrence of eos_token_id.
HF_SIZES = {
    "small": (64, 4, 64, 2, 32, 8, "quick_gelu", 299),
    "other": (96, 3, 48, 3, 48, 16, "gelu", 2),
}


def _hf_model(size: str, seed: int):
    from transformers import CLIPConfig, CLIPModel

    tw, th, vw, vh, image, patch, act, eos = HF_SIZES[size]
    config = CLIPConfig(
        text_config=dict(vocab_size=300, hidden_size=tw, intermediate_size=4 * tw,
                         num_hidden_layers=2, num_attention_heads=th,
                         max_position_embeddings=12, hidden_act=act, eos_token_id=eos,
                         bos_token_id=297, pad_token_id=0),
        vision_config=dict(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=2,
                           num_attention_heads=vh, image_size=image, patch_size=patch,
                           hidden_act=act),
        projection_dim=40,
    )
    torch.manual_seed(seed)
    return randomize_(CLIPModel(config), seed), image, patch


def _tensor(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.parametrize("size", list(HF_SIZES))
def test_hf_clip_model(tmp_path, seed, rng, size):
    ref, image, patch = _hf_model(size, seed)
    ref.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model, variables = load_clip(str(tmp_path / "hf"), format="hf_clip")
    big = image + 2 * patch  # a grid other than the pretraining one: interpolated positions
    imgs = rng.standard_normal((2, 3, image, image)).astype(np.float32)
    imgs_big = rng.standard_normal((2, 3, big, big)).astype(np.float32)
    ids = random_token_ids(rng, 3, 12, 300, eot=299)

    def run(m, x, xb, t):
        return (m.encode_image(x), m.encode_text(t), m.vision.tokens(x),
                m.vision.tokens(x, project=True), m.encode_image(xb))

    nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
    ours = jax.jit(lambda v, *a: model.apply(v, *a, method=run))(
        variables, nhwc(imgs), nhwc(imgs_big), jnp.asarray(ids))
    with torch.no_grad():
        x = torch.tensor(imgs)
        hidden = ref.vision_model(pixel_values=x).last_hidden_state
        tokens = ref.vision_model.post_layernorm(hidden[:, 1:])
        g = image // patch
        refs = (
            _tensor(ref.get_image_features(pixel_values=x)),
            _tensor(ref.get_text_features(input_ids=torch.tensor(ids))),
            tokens.reshape(2, g, g, -1),
            ref.visual_projection(tokens).reshape(2, g, g, -1),
            _tensor(ref.get_image_features(pixel_values=torch.tensor(imgs_big),
                                           interpolate_pos_encoding=True)),
        )
    names = ["encode_image", "encode_text", "tokens", "tokens(project)", "encode_image(big)"]
    for name, a, b, tol in zip(names, ours, refs, [1e-5, 1e-5, 1e-4, 1e-5, 1e-5]):
        err = rel_err(a, b.numpy())
        assert err <= tol, f"hf {size} {name}: rel err {err:.2e} > {tol} (OVD_TEST_SEED={seed})"
    assert np.isclose(float(variables["params"]["logit_scale"]), float(ref.logit_scale))


def test_open_clip_vit_state_dict(tmp_path, seed, rng):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    ref = randomize_(CLIP(48, CLIPVisionCfg(layers=2, width=64, patch_size=8, image_size=32),
                          CLIPTextCfg(context_length=12, vocab_size=300, width=64, heads=1,
                                      layers=2)), seed)
    torch.save(ref.state_dict(), tmp_path / "vit.pt")
    model, variables = load_clip(str(tmp_path / "vit.pt"), format="open_clip")
    imgs = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids = random_token_ids(rng, 2, 12, 300, eot=299)
    ours = jax.jit(lambda v, x, t: model.apply(v, x, t))(
        variables, jnp.asarray(imgs.transpose(0, 2, 3, 1)), jnp.asarray(ids))
    with torch.no_grad():
        refs = ref.encode_image(torch.tensor(imgs)), ref.encode_text(torch.tensor(ids))
    for name, a, b in zip(["encode_image", "encode_text"], ours[:2], refs):
        err = rel_err(a, b.numpy())
        assert err <= 1e-5, f"open_clip ViT {name}: rel err {err:.2e} (OVD_TEST_SEED={seed})"
