"""Our checkpoint format, the convert CLI, mismatch reporting and EOT pooling."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from clip_reference import small_open_clip_rn

from ovd_jax.convert import CheckpointMismatchError, load_clip
from ovd_jax.convert.__main__ import main as convert_main
from ovd_jax.convert.common import flatten
from ovd_jax.models.clip import clip_config
from ovd_jax.models.clip_text import TextTransformer


@pytest.fixture
def open_clip_pt(tmp_path, seed):
    ref = small_open_clip_rn(seed, quick_gelu=True)
    path = tmp_path / "rn.pt"
    torch.save(ref.state_dict(), path)
    return ref, str(path)


def test_cli_round_trip(tmp_path, open_clip_pt, capsys):
    _, path = open_clip_pt
    out = str(tmp_path / "converted")
    assert convert_main(["--format", "open_clip", "--input", path, "--output", out,
                         "--model", "RN-tiny-quickgelu"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "variables.msgpack"]
    model, variables = load_clip(path, format="open_clip", model="RN-tiny-quickgelu")
    again, restored = load_clip(out)
    assert clip_config(again) == clip_config(model)
    a, b = flatten(variables), flatten(restored)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # Overwriting goes through a temporary folder: nothing left beside the output.
    assert convert_main(["--format", "open_clip", "--input", path, "--output", out]) == 0
    assert sorted(os.listdir(tmp_path)) == ["converted", "rn.pt"]
    assert convert_main(["--format", "hf_clip", "--input", str(tmp_path / "nope"),
                         "--output", out]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_mismatch_lists_keys(tmp_path, open_clip_pt):
    ref, _ = open_clip_pt
    sd = ref.state_dict()
    del sd["visual.layer2.1.bn2.running_mean"]
    sd["visual.attnpool.extra_proj.weight"] = torch.zeros(3, 3)
    sd["transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(100, 128)
    path = tmp_path / "broken.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_clip(str(path), format="openai_clip")
    msg = str(info.value)
    assert "missing (1): batch_stats/vision/layer2_1/bn2/mean" in msg
    assert "visual.attnpool.extra_proj.weight" in msg
    assert "params/text/transformer/resblocks_1/c_fc/kernel" in msg and "shape mismatch" in msg
    assert "Traceback" not in msg


def test_eot_pooling(seed, rng):
    """eot_token_id pools at the first occurrence of that id even when larger ids are present;
    None pools at the argmax (OpenAI)."""
    kw = dict(vocab_size=50, context_length=8, width=32, heads=2, layers=1, output_dim=16)
    ids = rng.integers(10, 50, (3, 8))
    first = rng.integers(0, 8, 3)
    ids[np.arange(3), first] = 3
    model = TextTransformer(eot_token_id=3, **kw)
    variables = jax.jit(model.init)(jax.random.key(seed), jnp.asarray(ids))
    fn = jax.jit(lambda v, t: (model.apply(v, t),
                               model.apply(v, t, method="encode_tokens")))
    pooled, states = fn(variables, jnp.asarray(ids))
    proj = variables["params"]["text_projection"].value
    want = np.asarray(states)[np.arange(3), first] @ np.asarray(proj)
    np.testing.assert_allclose(pooled, want, rtol=1e-5, atol=1e-6,
                               err_msg=f"OVD_TEST_SEED={seed}")
    argmax_model = TextTransformer(**kw)
    other = jax.jit(argmax_model.apply)(variables, jnp.asarray(ids))
    assert not np.allclose(other, pooled)
    with pytest.raises(ValueError, match="context_length"):
        model.apply(variables, jnp.zeros((1, 9), jnp.int32))
