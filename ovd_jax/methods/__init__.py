"""One module per training objective; `config.method` picks one through `get`.

Every method module provides the same functions, so the training loop, the evaluator and the
entry points never branch on the method:

    build_model(config, *, text_vocab_size, eot_token_id) -> flax module (random init)
    init_args(config) -> tuple of dummy inputs for `model.init`
    device_keys(config) -> names of the batch arrays the train step reads (sharded on 'batch')
    make_train_loader(exp, *, num_epochs=None) -> grain iterable of numpy batches holding at
        least `device_keys(config)` (per-process batch; `base.detection_train_loader` is the
        plain detection loader)
    train_constants(exp, variables) -> pytree of arrays the step needs besides the batch (e.g.
        concept tokens, or concept embeddings precomputed once from a frozen text tower);
        passed to the jitted step replicated, never baked into the compiled program
    train_loss(model, params, model_state, batch, constants, rng, config) -> (loss, metrics)
    eval_queries(exp, variables) -> pytree describing the evaluation vocabulary to the model
        (embeddings, or prompt tokens and positive maps); computed once per vocabulary
    predict(model, variables, images, image_hw, queries, config) -> dict of boxes [N,D,4],
        scores [N,D], classes [N,D] (index into the evaluation vocabulary), valid [N,D]

Optional: `classify_boxes(model, variables, images, boxes, queries, config) -> probs [N,M,K]`
(RegionCLIP's zero-shot protocol with ground-truth boxes); `extra_metrics(exp, variables, mesh)
-> dict` merged into the evaluation's metrics.json (GLIP's `grounding_recall@1`);
`frozen_params(config) -> tuple of parameter-path patterns` the optimizer freezes (RegionCLIP's
FREEZE_AT stages and frozen batch norms; see ovd_jax/training/optimizer.py).

Optional, for methods trained on several data types whose batches differ in size, resolution
or keys (DetCLIPv2: detection, grounding, image-text), each getting its own compiled step:
`data_types(config) -> tuple[str, ...]`, `batch_size(config, data_type) -> int` (global batch);
`device_keys` and `train_loss` then take a `data_type=` keyword, and every batch of
`make_train_loader` carries its type under `"data_type"` (a host-side string; see
`ovd_jax.data.unified.MixedLoader`). The loop runs one jitted step per type.
"""

from __future__ import annotations

from types import ModuleType

from ovd_jax.methods import clip, detclipv2, glip, regionclip, regionclip_pretrain

METHODS: dict[str, ModuleType] = {
    "regionclip": regionclip,
    "glip": glip,
    "clip": clip,  # the CLIP teacher (image-caption contrastive)
    "regionclip_pretrain": regionclip_pretrain,  # RegionCLIP region-text pretraining
    "detclipv2": detclipv2,
}


def get(name: str) -> ModuleType:
    if name not in METHODS:
        raise ValueError(f"config.method={name!r} is not one of {sorted(METHODS)}.")
    return METHODS[name]
