"""ovd_jax: open-vocabulary object detection (RegionCLIP, GLIP, DetCLIPv2) in JAX/Flax."""

__version__ = "0.1.0"
