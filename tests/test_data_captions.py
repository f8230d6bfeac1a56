"""Caption / grounding readers and the caption loader, on the synthetic set."""

import json

import numpy as np
import pytest
from transformers import BertTokenizerFast

from ovd_jax.data import (
    load_coco_captions,
    load_grounding,
    make_caption_loader,
    synthetic,
)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return synthetic.generate(str(tmp_path_factory.mktemp("synth") / "ds"), seed=11,
                              num_train=10, num_val=5)


def test_caption_reader_and_loader(synth, seed):
    recs = load_coco_captions(synth.train_captions, synth.train_images)
    raw = json.loads(open(synth.train_captions).read())
    assert len(recs) == 10 and all(len(r["captions"]) == 2 for r in recs)
    assert recs[0]["captions"] == [a["caption"] for a in raw["annotations"]
                                   if a["image_id"] == recs[0]["image_id"]]
    tok = BertTokenizerFast(vocab=synth.vocab_file)

    def tokenize(text):
        out = tok(text, padding="max_length", max_length=32, truncation=True)
        return {"input_ids": np.asarray(out["input_ids"], np.int32),
                "attention_mask": np.asarray(out["attention_mask"], bool)}

    kw = dict(batch_size=4, image_size=64, tokenize=tokenize, seed=seed)
    by_id = {r["image_id"]: r for r in recs}
    batches = [b for _, b in zip(range(5), make_caption_loader(recs, train=True, **kw))]
    b = batches[0]
    assert b["image"].shape == (4, 64, 64, 3) and b["input_ids"].shape == (4, 32)
    assert b["input_ids"].dtype == np.int32 and b["attention_mask"].dtype == bool
    chosen = set()
    for batch in batches:
        for k, iid in enumerate(batch["image_id"].tolist()):
            n = int(batch["attention_mask"][k].sum())
            text = tok.decode(batch["input_ids"][k, 1 : n - 1])
            assert text in by_id[iid]["captions"], (text, by_id[iid]["captions"], seed)
            chosen.add(text)
    assert len(chosen) > 10, f"seed={seed}: captions never vary"  # both captions get used
    # Eval: first caption, every image once, padding entries zeroed.
    ev = list(make_caption_loader(recs, train=False, **kw))
    ids = np.concatenate([x["image_id"] for x in ev])
    valid = np.concatenate([x["valid"] for x in ev])
    assert ids[valid].tolist() == [r["image_id"] for r in recs] and (~valid).sum() == 2
    last = ev[-1]
    assert (last["input_ids"][~last["valid"]] == 0).all()
    # Resume.
    it = iter(make_caption_loader(recs, train=True, **kw))
    next(it)
    state = it.get_state()
    want = next(it)
    fresh = iter(make_caption_loader(recs, train=True, **kw))
    fresh.set_state(state)
    got = next(fresh)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k], err_msg=f"seed={seed} key={k}")


def test_grounding_reader(synth, tmp_path):
    ds = load_grounding(synth.train_grounding, synth.train_images)
    names = {c["id"]: c["name"] for c in ds.categories}
    for rec in ds.records:
        assert len(rec["tokens_positive"]) == len(rec["boxes"]) >= 1
        for cid, spans in zip(rec["category_ids"].tolist(), rec["tokens_positive"]):
            (s, e), = spans
            assert rec["caption"][s:e] == names[cid]
    data = json.loads(open(synth.train_grounding).read())
    data["annotations"][0]["tokens_positive"] = [[5, 500]]
    bad = tmp_path / "g.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotation id 1 has tokens_positive=\[\[5, 500\]\]"):
        load_grounding(str(bad), synth.train_images)
    caps = json.loads(open(synth.val_captions).read())
    caps["annotations"] = [a for a in caps["annotations"] if a["image_id"] != 100003]
    bad.write_text(json.dumps(caps))
    with pytest.raises(ValueError, match="image id 100003 .* has no caption"):
        load_coco_captions(str(bad), synth.val_images)
