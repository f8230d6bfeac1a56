"""On-device image normalisation for `config.data.image_transfer = "uint8"`.

With "uint8" the input pipelines ship the resized pixels as uint8 [B,S,S,3] (zero padding
bottom/right), a quarter of the bytes of the normalised float32 image, and the jitted train step
and evaluation normalise them here. The arithmetic is the host path's
(`transforms.normalize_and_pad`: float32 `(x - mean) * (1 / std)`), and the padding outside each
image's `image_hw` is exactly 0, so a batch normalised here equals the float32 pipeline's batch.

An image array is the key `image` or any key ending in `_image` (e.g. `det_image` of a zipped
loader); its valid size is the key + `_hw` (`image_hw`, `det_image_hw`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ovd_jax.data.transforms import CLIP_MEAN, CLIP_STD, check_image_transfer


def is_image_key(key: str) -> bool:
    return key == "image" or key.endswith("_image")


def transfer_keys(keys, image_transfer: str) -> tuple[str, ...]:
    """`keys` (what a train step reads) plus, with "uint8", every image key's `<key>_hw` that
    the on-device normalisation needs."""
    keys = tuple(keys)
    if check_image_transfer(image_transfer) == "float32":
        return keys
    extra = tuple(f"{k}_hw" for k in keys if is_image_key(k) and f"{k}_hw" not in keys)
    return keys + extra


def normalize_images(images, image_hw, *, mean=CLIP_MEAN, std=CLIP_STD, dtype=jnp.float32):
    """Normalises uint8 images on the device.

    Args:
      images: uint8 [B,S,S,3], resized pixels padded bottom/right (any padding value).
      image_hw: int [B,2], each image's resized (h, w) inside the S x S canvas.
      mean, std: per-channel normalisation in 0-255 units (the pipeline's, default CLIP's).
      dtype: the result's dtype (the model's compute dtype).

    Returns `dtype` [B,S,S,3]: (x - mean) / std inside each image's h x w, exactly 0 elsewhere.
    """
    if images.dtype != jnp.uint8:
        raise ValueError(f"normalize_images takes uint8 images, got {images.dtype}; with "
                         "config.data.image_transfer='float32' images arrive normalised.")
    size_h, size_w = images.shape[1:3]
    # float32 constants exactly as the host path (normalize_and_pad) computes them.
    mean32 = np.asarray(mean, np.float32)
    inv_std32 = np.float32(1.0) / np.asarray(std, np.float32)
    x = (images.astype(jnp.float32) - mean32) * inv_std32
    hw = image_hw.astype(jnp.int32)
    rows = jnp.arange(size_h)[None, :, None] < hw[:, 0, None, None]
    cols = jnp.arange(size_w)[None, None, :] < hw[:, 1, None, None]
    x = jnp.where((rows & cols)[..., None], x, jnp.float32(0))
    return x.astype(dtype)


def normalize_batch(batch: dict, *, keys=None, dtype=jnp.float32, mean=CLIP_MEAN,
                    std=CLIP_STD) -> dict:
    """`batch` with every uint8 image key normalised (`normalize_images`, with its `<key>_hw`).

    Float images are returned untouched (the float32 pipeline). `keys`: the keys to return
    (e.g. the method's device keys; `<key>_hw` arrays added only for normalisation are
    dropped); None keeps all.
    """
    out = dict(batch)
    for k, v in batch.items():
        if is_image_key(k) and v.dtype == jnp.uint8:
            hw = batch.get(f"{k}_hw")
            if hw is None:
                raise ValueError(f"the uint8 batch key {k!r} arrived without {k}_hw, which "
                                 "its on-device normalisation needs (image_transfer='uint8').")
            out[k] = normalize_images(v, hw, mean=mean, std=std, dtype=dtype)
    if keys is not None:
        out = {k: out[k] for k in keys}
    return out
